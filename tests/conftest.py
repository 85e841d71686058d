"""Suite-wide: kernel and end-to-end tests need root, and without it they
fail, loudly, instead of being skipped: a non-root `make test` that ran the
unit tests alone must not look green. `make test-unit` runs what needs no
root."""

import os
from pathlib import Path

import pytest

_ROOT_DIRS = {"kernel", "e2e"}
_NEEDS_ROOT = ("needs root: kernel and end-to-end tests load the real XDP program and create network "
               "namespaces (run `sudo make test`, or `make test-unit` for the tests that need no root)")  # fmt: skip


def needs_root(item) -> bool:
    """Kernel and e2e tests, by marker or by the directory they live in (a
    test that forgot its marker is still one)."""
    if "kernel" in item.keywords or "e2e" in item.keywords:
        return True
    return bool(_ROOT_DIRS & set(Path(str(item.fspath)).parts[-3:-1]))


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    n = sum(needs_root(item) for item in items)
    if n:
        config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"NOT ROOT: {n} kernel/e2e tests will FAIL: {_NEEDS_ROOT}", red=True, bold=True
        )


def pytest_runtest_setup(item):
    if os.geteuid() != 0 and needs_root(item):
        pytest.fail(_NEEDS_ROOT, pytrace=False)
