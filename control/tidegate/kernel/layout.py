"""The kernel contract, Python side: the only Python copy of bpf/layout.h
and bpf/maps.h.

Limits, slot numbers, rule indexes, reason names, flag bits, the structs
the maps hold (as ctypes, which also give numpy dtypes) and the maps
themselves. tests/unit/test_layout_contract.py reads the C headers as text
and fails when any of these disagree; the compile child (compiler.py) also
checks the structs against the types BCC derives from the C source, at
every compile. Everything else in the package imports these names from
here and never writes the numbers again.

Also here: the address encoding every map key uses (bpf/layout.h
"Addresses are kept as 16 bytes"): IPv6 as is, IPv4 as ::ffff:a.b.c.d,
loaded by the program as two little-endian u64 halves.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

# ---------------------------------------------------------------- constants
PROG_NAME = "tidegate_xdp"  # the XDP function in bpf/tidegate.c (the kernel keeps its first 15 characters)
SLOTS = 3  # TG_SLOTS: one active, one shadow, one to stage the next apply
NO_SLOT = 0xFF  # TG_NO_SLOT

MAX_RULES = 64  # TG_MAX_RULES: user rules per rule set
RULE_DEFAULT = 64  # TG_RULE_DEFAULT and the other pseudo-rules: indexes after the user rules
RULE_DENYLIST = 65
RULE_ALLOWLIST = 66
RULE_EXTHDR = 67  # IPv6 packets whose extension headers the parser did not walk to the end
RULE_IDX = 68  # TG_RULE_IDX: rule indexes per slot
# the pseudo-rules' names, as counters and the rule-set model call them
PSEUDO_RULES = {RULE_DEFAULT: "default", RULE_DENYLIST: "deny-list", RULE_ALLOWLIST: "allow-list",
                RULE_EXTHDR: "ipv6-ext"}  # fmt: skip

UNIT = 1_000_000_000  # TG_UNIT: bucket units per packet or byte

# the program's per-reason counters (tg_stats), in TG_R_* order
REASONS = ("pass", "allow", "deny", "rate", "prefix", "blocked", "unparsed", "noconfig", "ipv6-ext-pass",
           "ipv6-ext-drop")  # fmt: skip
DROP_REASONS = ("deny", "rate", "prefix", "blocked", "ipv6-ext-drop")  # the reasons whose verdict is drop
# a rule's drops split by reason: tg_rule_count.drop_<reason>
RULE_DROP_REASONS = ("rate", "prefix", "blocked", "deny")

ACT_LIMIT, ACT_PASS, ACT_DROP = 0, 1, 2  # TG_ACT_*: tg_rule_cfg.action
RF_PKT, RF_BYTES, RF_PREFIX, RF_PFX_BYTES = 1, 2, 4, 8  # TG_RF_*: tg_rule_cfg.flags
# TG_LINK_*: tg_rule_cfg.shadow_link, the active slot + 1, then per family where the rule keeps its state
LINK_SLOT, LINK_STATE4, LINK_PFX4, LINK_STATE6, LINK_PFX6 = 3, 4, 8, 16, 32
CF_ALLOW, CF_DENY = 1, 2  # TG_CF_*: tg_cidr_val.flags
SET_HAS_TRIE, SET_HAS_PORTS, SET_EXT_DEFAULT = 1, 2, 4  # TG_SET_*: tg_set_cfg.flags
KIND_SOURCE, KIND_PREFIX = 0, 1  # TG_KIND_*: tg_state_key.kind
SF_BLOCKED, SF_CLS_MASK, SF_LENT = 1, 2, 4  # TG_SF_*: tg_src.flags
STATE_LAYOUT = 4  # TG_STATE_LAYOUT: the tg_src layout, kept in tg_ctl.state_layout
CREDIT_SHIFT = 28  # TG_CREDIT_SHIFT: prefix credit windows are now >> CREDIT_SHIFT ns (about 268 ms)
LRU_INSERTS, LRU_FAILS, LRU_COUNTERS = 0, 1, 2  # TG_LRU_*: tg_lru indexes

PORT_RANGE = 2 * 65536  # port-table entries per slot: (is_udp << 16 | port), TG_PORT_IDX
PORT_ENTRIES = SLOTS * PORT_RANGE  # TG_PORT_ENTRIES

# map sizes the agent passes as -D flags; these are bpf/maps.h's defaults
MAX_SOURCES = 1 << 20  # TG_MAX_SOURCES: per-source LRU entries
MAX_CIDRS = 3 * 131072  # TG_MAX_CIDRS: entries of each family's trie, all three slots
SLOT_CIDRS = MAX_CIDRS // SLOTS  # the CIDR entries one rule set may use

# bpf/classify.h: the de Bruijn multiplier that finds a mask's lowest bit; tg_debruijn is its table
DEBRUIJN = 0x022FDD63CC95386D

# --------------------------------------------------------------- the structs
u8, u16, u32, u64 = ctypes.c_ubyte, ctypes.c_ushort, ctypes.c_uint, ctypes.c_ulonglong


class tg_ctl(ctypes.Structure):
    _fields_ = [("sel", u32), ("state_layout", u32)]


class tg_mask(ctypes.Structure):
    _fields_ = [("hi", u64), ("lo", u64)]


class tg_limit(ctypes.Structure):
    _fields_ = [("rate", u64), ("burst", u64), ("fill_ns", u64), ("brate", u64), ("bburst", u64), ("bfill_ns", u64)]


class tg_rule_cfg(ctypes.Structure):
    _fields_ = [("action", u32), ("flags", u16), ("shadow_link", u8), ("pad", u8), ("block_ns", u64),
                ("src", tg_limit), ("pfx", tg_limit), ("pfx4", tg_mask), ("pfx6", tg_mask)]  # fmt: skip


class tg_set_cfg(ctypes.Structure):
    _fields_ = [("version", u64), ("epoch", u32), ("flags", u32), ("any_src_mask", u64), ("proto_mask", u64 * 256),
                ("key4", tg_mask), ("key6", tg_mask), ("same_match_as", u32), ("pad", u32)]  # fmt: skip


class tg_cidr4_key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("slot", u32), ("addr", u32)]


class tg_cidr6_key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("slot", u32), ("addr_hi", u64), ("addr_lo", u64)]


class tg_cidr_val(ctypes.Structure):
    _fields_ = [("rule_mask", u64), ("flags", u32), ("pad", u32)]


class tg_state_key(ctypes.Structure):
    _fields_ = [("addr_hi", u64), ("addr_lo", u64), ("epoch", u32), ("rule", u8), ("kind", u8), ("pad", u16)]


class tg_shadow(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("tokens", "last_ns", "packets", "drops", "new_drops", "blocked_until", "first_ns")] + [
        ("credit_win", u32), ("flags", u8), ("pfx_credit", u8), ("pfx_owed", u8), ("pad", u8)]  # fmt: skip


class tg_src(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("tokens", "last_ns", "packets", "bytes", "cls_lo")] + [
        ("credit_win", u32), ("pfx_lent", u32), ("cls_ok", u8), ("flags", u8), ("pfx_credit", u8), ("pfx_owed", u8),
        ("pfx_owed_bytes", u32)] + [
        (n, u64) for n in ("blocked_until", "byte_tokens", "drops", "new_drops", "first_ns", "cls_mask", "cls_hi")] + [
        ("pfx_lent_prev", u32), ("sh_epoch", u32), ("sh", tg_shadow)]  # fmt: skip


class tg_count(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class tg_rule_count(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("pass_pkts", "pass_bytes", "drop_pkts", "drop_bytes", "drop_rate", "drop_prefix",
                                   "drop_blocked", "drop_deny", "shadow_pkts", "shadow_drop", "shadow_new_drop",
                                   "shadow_bytes_drop")]  # fmt: skip


# ------------------------------------------------------------------ the maps
# map name -> (key type, value type, per-CPU values), in bpf/maps.h's order
LAYOUTS: dict[str, tuple[type, type, bool]] = {
    "tg_ctl": (u32, tg_ctl, False),
    "tg_sets": (u32, tg_set_cfg, False),
    "tg_rules": (u32, tg_rule_cfg, False),
    "tg_cidrs4": (tg_cidr4_key, tg_cidr_val, False),
    "tg_cidrs6": (tg_cidr6_key, tg_cidr_val, False),
    "tg_ports": (u32, u64, False),
    "tg_state": (tg_state_key, tg_src, False),
    "tg_stats": (u32, tg_count, True),
    "tg_rule_stats": (u32, tg_rule_count, True),
    "tg_lru": (u32, u64, True),
    "tg_debruijn": (u32, u32, False),
    "tg_clock": (u32, u64, False),  # replay builds only, not pinned
}
# the pinned maps: every program has them
MAP_NAMES = tuple(n for n in LAYOUTS if n != "tg_clock")
# pinned maps that only count: when their size changes (a new reason), they are made anew
RESIZABLE_COUNTERS = {"tg_stats": len(REASONS)}
# pinned maps of soft state (token buckets, the classification cache): made anew when their layout changes
SOFT_STATE = ("tg_state",)

# ----------------------------------------------------------- address encoding
V4_MAPPED = 0xFFFF << 32  # ::ffff:0:0, where IPv4 addresses live in the 128-bit space


@dataclass(frozen=True)
class Mask:
    """tg_mask: a 16-byte network mask as the two u64 the program loads."""

    hi: int
    lo: int


def mask_halves(prefixlen128: int) -> Mask:
    """The 16-byte network mask as the two little-endian u64 the program loads."""
    m = ((1 << prefixlen128) - 1) << (128 - prefixlen128) if prefixlen128 else 0
    raw = m.to_bytes(16, "big")
    return Mask(int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))


def addr_halves(addr128: int) -> tuple[int, int]:
    raw = addr128.to_bytes(16, "big")
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def halves_to_address(hi: int, lo: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = hi.to_bytes(8, "little") + lo.to_bytes(8, "little")
    a = ipaddress.IPv6Address(raw)
    return a.ipv4_mapped or a


def network_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """(addr128, prefixlen128) of a network in the unified address space."""
    if net.version == 4:
        return V4_MAPPED | int(net.network_address), 96 + net.prefixlen
    return int(net.network_address), net.prefixlen


def keys_of_codes(codes) -> list[tuple[int, int]]:
    """The unified (addr128, prefixlen128) keys of IPv4 codes, an unsigned
    integer array of `address << 8 | prefix length` (kernel/trie4.py)."""
    addrs, plens = (codes >> 8).tolist(), (codes & 0xFF).tolist()
    return list(zip(map(V4_MAPPED.__or__, addrs), map((96).__add__, plens)))
