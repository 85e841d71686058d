"""The agent's ctypes view of the maps (layout.LAYOUTS) is checked by
the compile child against the types BCC derives from bpf/layout.h; these
cases show the check catches a drifted layout (the kernel tests compile the
real program, where it must find none)."""

from __future__ import annotations

import ctypes

from tidegate.kernel.layout import LAYOUTS, tg_cidr_val, tg_ctl, tg_state_key
from tidegate.kernel.pinned_maps import layout_mismatch

u8, u16, u32, u64 = ctypes.c_ubyte, ctypes.c_ushort, ctypes.c_uint, ctypes.c_ulonglong


def _struct(name, fields):
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def test_identical_types_match():
    assert layout_mismatch("tg_state", tg_state_key, LAYOUTS["tg_state"][1]) is None
    assert layout_mismatch("tg_ctl", u32, tg_ctl) is None
    # implicit padding BCC spells out as __pad_N fields is not a difference
    padded = _struct("tg_ctl", [("sel", u32), ("state_layout", u32), ("__pad_0", u8 * 0)])
    assert layout_mismatch("tg_ctl", u32, padded) is None


def test_a_moved_field_a_new_field_and_another_size_are_caught():
    moved = _struct("tg_cidr_val", [("flags", u32), ("pad", u32), ("rule_mask", u64)])
    why = layout_mismatch("tg_cidrs4", LAYOUTS["tg_cidrs4"][0], moved)
    assert why and "map tg_cidrs4 value" in why and "rule_mask" in why
    grown = _struct("tg_ctl", [("sel", u32), ("state_layout", u32), ("extra", u64)])
    assert "16 in the program" in layout_mismatch("tg_ctl", u32, grown)
    assert "map tg_ports key" in layout_mismatch("tg_ports", u64, u64)
    nested = _struct("k", [("prefixlen", u32), ("slot", u32), ("addr", u16), ("pad", u16)])
    assert layout_mismatch("tg_cidrs4", nested, tg_cidr_val) is not None
