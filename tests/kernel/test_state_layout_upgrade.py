"""An upgrade whose program changes the layout of the per-source state map
(bpf/layout.h struct tg_src): the new program gets a new tg_state map, the
rule set and the other maps are kept, and the filter keeps deciding.

Without this, BCC reuses the old pinned map and the verifier refuses the
new program (its loads reach past the old, shorter value)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.kernel import bpfsys
from tidegate.kernel.layout import STATE_LAYOUT, tg_ctl, tg_src, tg_state_key
from tidegate.kernel.loader import pinned_map_info
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f

RULES = """
defaults:
  limit: {pps: 1000, burst: 1000}
rules:
  - name: dns
    protocol: udp
    dst_ports: [53]
    limit: {pps: 100, burst: 100}
"""

# an older program's per-source map: the same key, a 72-byte value (the layout before the
# classification cache), created and pinned by BCC in a child like the compile child does
OLD_STATE = r"""
import sys
from bcc import BPF
src = '''
struct key { u64 hi; u64 lo; u32 epoch; u8 rule; u8 kind; u16 pad; };
struct old_src { u64 f[9]; };
BPF_TABLE_PINNED("lru_hash", struct key, struct old_src, tg_state, 65536, "%s");
int f(struct xdp_md *ctx) { struct key k = {}; return tg_state.lookup(&k) ? 1 : 2; }
''' % sys.argv[1]
BPF(text=src).load_func(b"f", BPF.XDP)
"""


def _state_layout(pin_dir: str) -> tg_ctl:
    fd = bpfsys.obj_get(os.path.join(pin_dir, "tg_ctl"))
    try:
        ctl = tg_ctl()
        bpfsys.map_lookup(fd, ctypes.c_uint32(0), ctl)
        return ctl
    finally:
        os.close(fd)


def _forget_layout(pin_dir: str) -> None:
    fd = bpfsys.obj_get(os.path.join(pin_dir, "tg_ctl"))
    try:
        ctl = _state_layout(pin_dir)
        ctl.state_layout = 0
        bpfsys.map_update(fd, ctypes.c_uint32(0), ctl)
    finally:
        os.close(fd)


def _drop_program_pins(pin_dir: str) -> None:
    for name in os.listdir(pin_dir):
        if name.startswith("prog_"):
            os.unlink(os.path.join(pin_dir, name))



def _loaded_with_one_source(name: str):
    """A filter on pins of its own, rule set 7 applied, one source seen."""
    cfg = FilterConfig(interface=None, pin_name=f"{name}-{os.getpid()}", max_sources=65536)
    kf = KernelFilter(cfg)
    kf.load()
    rs = parse_rule_set(RULES, "<test>")
    kf.apply(rs, 7)
    kf.test_run(f.udp("198.51.100.7", 53))
    return cfg, kf, rs


def _sizes(path: str) -> tuple[int, int]:
    info = pinned_map_info(path)
    return info.key_size, info.value_size


@pytest.mark.kernel
def test_a_state_map_of_an_older_layout_is_made_anew_and_the_rule_set_kept():
    cfg, kf, rs = _loaded_with_one_source("test-upgrade")
    try:
        kf.close()
        # what an older agent left: its program (another digest) and its state map
        state = os.path.join(cfg.pin_dir, "tg_state")
        _drop_program_pins(cfg.pin_dir)
        os.unlink(state)
        subprocess.run([sys.executable, "-c", OLD_STATE, state], check=True, capture_output=True, timeout=120)
        assert _sizes(state) == (ctypes.sizeof(tg_state_key), 72)

        kf = KernelFilter(cfg)
        res = kf.load()
        assert res.compiled and not res.fresh_maps
        assert _sizes(state) == (ctypes.sizeof(tg_state_key), ctypes.sizeof(tg_src))
        assert kf.active_version() == 7, "the rule set and its selection are kept"
        kf.bind_names(7, rs)  # what the agent does from its store
        before = kf.counters().rules["dns"].pass_packets
        verdict, _ = kf.test_run(f.udp("198.51.100.7", 53))
        assert verdict == 2 and kf.counters().rules["dns"].pass_packets == before + 1
        assert kf.read_sources().count == 1, "the new map holds the new entry only"
    finally:
        kf.close()
        kf.remove_pins()


@pytest.mark.kernel
def test_a_state_map_of_another_layout_of_the_same_size_is_made_anew_and_kept_across_restarts():
    cfg, kf, rs = _loaded_with_one_source("test-relayout")
    state = os.path.join(cfg.pin_dir, "tg_state")
    try:
        assert _state_layout(cfg.pin_dir).state_layout == STATE_LAYOUT
        first = pinned_map_info(state).id
        kf.close()

        # a restart, and a new program of the same state layout, keep the entries
        for drop_program in (False, True):
            if drop_program:
                _drop_program_pins(cfg.pin_dir)
            kf = KernelFilter(cfg)
            res = kf.load()
            assert res.compiled == drop_program
            assert pinned_map_info(state).id == first and kf.read_sources().count == 1
            kf.close()

        sel = _state_layout(cfg.pin_dir).sel
        # this build's program pinned but the layout not recorded (an agent stopped in between):
        # the program's own map is kept, and the layout recorded
        _forget_layout(cfg.pin_dir)
        kf = KernelFilter(cfg)
        assert not kf.load().compiled
        assert pinned_map_info(state).id == first and kf.read_sources().count == 1
        assert _state_layout(cfg.pin_dir).state_layout == STATE_LAYOUT
        kf.close()

        # what an agent before the layout was kept left: the same sizes, state_layout 0
        _forget_layout(cfg.pin_dir)
        _drop_program_pins(cfg.pin_dir)

        kf = KernelFilter(cfg)
        res = kf.load()
        assert res.compiled and not res.fresh_maps
        assert pinned_map_info(state).id != first, "entries of another layout are not read as this one"
        assert _sizes(state) == (ctypes.sizeof(tg_state_key), ctypes.sizeof(tg_src))
        ctl = _state_layout(cfg.pin_dir)
        assert (ctl.sel, ctl.state_layout) == (sel, STATE_LAYOUT), "the selection kept, the layout recorded"
        assert kf.active_version() == 7 and kf.read_sources().count == 0
        kf.bind_names(7, rs)
        verdict, _ = kf.test_run(f.udp("198.51.100.7", 53))
        assert verdict == 2 and kf.read_sources().count == 1
    finally:
        kf.close()
        kf.remove_pins()
