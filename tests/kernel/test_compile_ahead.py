"""A compile started ahead (compiler.start_ahead with the program): on a
first start the compile child compiles and loads the program while the
agent still imports its modules, its maps pinned only in a bpffs of its
own. Nothing appears in the real pin dir before the go (compile_in_child);
then the maps and the program are pinned where BCC pins them. A start that
stops before leaves nothing, a go for another program or a pin dir that
is no longer empty is compiled again in the real bpffs."""

from __future__ import annotations

import json
import os
import time

import pytest

from tidegate.kernel import bpfsys, compiler, loader, program
from tidegate.kernel.filter import FilterConfig
from tidegate.kernel.layout import LAYOUTS

pytestmark = pytest.mark.kernel


@pytest.fixture
def config():
    cfg = FilterConfig(interface=None, pin_name=f"test-ahead-{os.getpid()}", max_sources=65536)
    loader.ensure_bpffs()
    yield cfg
    compiler.cancel_ahead()
    loader.remove_pins(cfg.pin_dir)


def _job(cfg: FilterConfig) -> tuple[str, list[str], str]:
    source, flags = loader.program_source(), loader.cflags(cfg)
    return source, flags, program.prog_pin_path(cfg.pin_dir, program.program_digest(source, flags))


def _compiled_ahead() -> int:
    """Wait for the child's line: compiled and loaded; the program's id."""
    line = json.loads(compiler._ahead.stdout.readline())
    assert line["ahead"] == "compiled", line
    return line["prog_id"]


def _gone(prog_id: int, within: float = 10) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.close(bpfsys.prog_fd_by_id(prog_id))
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_compiled_ahead_nothing_is_pinned_before_the_go_and_everything_after(config):
    source, flags, prog_pin = _job(config)
    compiler.start_ahead(source, flags, prog_pin)
    prog_id = _compiled_ahead()
    assert not os.path.exists(config.pin_dir), "the compile ahead pinned in the real bpffs"
    os.makedirs(config.pin_dir, mode=0o700)  # what the agent's load does before it asks for the program
    res = compiler.compile_in_child(source, flags, prog_pin)
    assert res["ahead"] and res["compiled_ahead"] and "unusable" not in res
    assert res["prog_id"] == prog_id, "the program loaded ahead is the one answered"
    fd = bpfsys.obj_get(prog_pin)
    try:
        assert bpfsys.prog_info(fd).id == prog_id
        assert program._uses_pinned_maps(fd, config.pin_dir), "the program uses the maps pinned in the real bpffs"
    finally:
        os.close(fd)
    pins = set(os.listdir(config.pin_dir))
    assert pins == set(LAYOUTS) - {"tg_clock"} | {os.path.basename(prog_pin)}, "pinned where BPF_TABLE_PINNED pins"
    assert res["record"] and {m["pin"] for m in res["record"]["maps"].values()} == {
        os.path.join(config.pin_dir, n) for n in set(LAYOUTS) - {"tg_clock"}}, "the cache entry names the real pins"


@pytest.mark.parametrize("how", ["cancelled", "the agent exited"])
def test_a_start_that_stops_before_the_go_leaves_nothing(config, how):
    compiler.start_ahead(*_job(config))
    proc = compiler._ahead
    prog_id = _compiled_ahead()
    if how == "cancelled":
        compiler.cancel_ahead()
    else:  # its end of the pipe closes with the agent
        proc.stdin.close()
        proc.wait(timeout=60)
        compiler._ahead = compiler._ahead_job = None
    assert proc.returncode is not None and not os.path.exists(config.pin_dir)
    assert _gone(prog_id), "the program compiled ahead outlived its child"


def test_a_go_for_another_program_is_compiled_in_the_real_bpffs(config):
    compiler.start_ahead(*_job(config))
    ahead_id = _compiled_ahead()
    bigger = FilterConfig(interface=None, pin_name=config.pin_name, max_sources=131072)
    source, flags, prog_pin = _job(bigger)
    os.makedirs(config.pin_dir, mode=0o700)
    res = compiler.compile_in_child(source, flags, prog_pin)
    assert res["unusable"] == "the start asked for another program" and not res["compiled_ahead"]
    assert res["prog_id"] != ahead_id and _gone(ahead_id)
    fd = bpfsys.obj_get(os.path.join(config.pin_dir, "tg_state"))
    try:
        assert bpfsys.map_info(fd).max_entries == 131072, "the maps are those of the program asked for"
    finally:
        os.close(fd)


def test_a_map_pinned_before_the_go_is_used_and_nothing_of_the_ahead_compile_kept(config):
    """Someone pinned a map in the meantime: BCC would use it, so the
    program is compiled again in the real bpffs, against it."""
    source, flags, prog_pin = _job(config)
    compiler.start_ahead(source, flags, prog_pin)
    _compiled_ahead()
    os.makedirs(config.pin_dir, mode=0o700)
    fd = bpfsys.map_create(6, 4, 8, 2, 0, b"tg_lru")  # the per-CPU array BCC makes for tg_lru
    try:
        bpfsys.obj_pin(fd, os.path.join(config.pin_dir, "tg_lru"))
        theirs = bpfsys.map_info(fd).id
    finally:
        os.close(fd)
    res = compiler.compile_in_child(source, flags, prog_pin)
    assert "tg_lru is pinned already" in res["unusable"] and not res["compiled_ahead"]
    fd = bpfsys.obj_get(prog_pin)
    try:
        assert theirs in bpfsys.prog_map_ids(fd), "the compile in the real bpffs used the pinned map"
        assert program._uses_pinned_maps(fd, config.pin_dir)
    finally:
        os.close(fd)
