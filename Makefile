# The two set-up commands (as root): `make install`, `make test`.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: install test test-unit test-kernel proto lab bench lint clean vagrant-box vagrant-e2e

install:
	bash scripts/install.sh

test:
	$(PY) -m pytest -q tests

test-unit:
	$(PY) -m pytest -q tests/unit

test-kernel:
	$(PY) -m pytest -q tests/kernel

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
	shellcheck scripts/*.sh .ci/run $(wildcard vagrant/*.sh) $(wildcard bench/*.sh)

clean:
	rm -rf $(VENV) control/tidegate/v1 control/*.egg-info
