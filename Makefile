# The two set-up commands (as root): `make install`, `make test`.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: install test test-unit test-kernel test-package deb proto lab bench lint clean vagrant-box vagrant-e2e \
	mutants mutmut

install:
	bash scripts/install.sh

test:
	$(PY) -m pytest -q tests

test-unit:
	$(PY) -m pytest -q tests/unit

test-kernel:
	$(PY) -m pytest -q tests/kernel

# dist/tidegate_<version>_<arch>.deb (packaging/build-deb.sh)
deb:
	bash packaging/build-deb.sh

# the .deb installed, run, removed and purged in a clean debootstrap root (not part of `make test`)
test-package: deb
	TIDEGATE_DEB="$$(ls -t dist/tidegate_*.deb | head -1)" $(PY) -m pytest -q tests/package

# named mutants of the safety properties (as root; not part of `make test`)
mutants:
	$(PY) tests/mutants/run.py

# mutmut on the pure logic the unit tests drive (not part of `make test`)
mutmut:
	$(PY) -m pip install -q "mutmut>=3.8,<4"
	$(PY) tests/mutants/mutmut_run.py

proto:
	bash scripts/gen_proto.sh $(PY)

lab:
	$(VENV)/bin/tidegate lab

bench:
	bash bench/run_all.sh

vagrant-box:
	bash vagrant/build-box.sh

vagrant-e2e:
	bash vagrant/e2e.sh

lint:
	shellcheck scripts/*.sh packaging/*.sh .ci/run $(wildcard vagrant/*.sh) $(wildcard bench/*.sh)

clean:
	rm -rf $(VENV) control/tidegate/v1 control/*.egg-info dist
