"""IPv4 trie entries as arrays: a large list's way from the parser to the
batch write without a Python object per CIDR.

A rule set whose CIDRs are all IPv4 and of which none contains another (a
large allow or deny list of /24s) needs no inheritance walk: each entry
keeps its own flags and rule mask. Its entries are then carried as numpy
arrays (`V4Entries`: sorted 64-bit codes `address << 8 | prefix length`,
masks, flags), made from the parser's arrays (ruleset/cidrs.parse_v4_list)
in a few vectorised steps; one slot's raw keys and values for the batch
syscalls come from them in one more (`Trie4`), and what a slot holds is
compared with what it is to hold on the sorted codes. Anything else (IPv6,
nested prefixes, a short list) takes the walk and the dicts of
kernel/entries.py; both give the same entries (tests/unit/test_trie_arrays.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tidegate.kernel.layout import V4_MAPPED, keys_of_codes

KEY4 = np.dtype([("plen", "<u4"), ("slot", "<u4"), ("addr", ">u4")])  # bpf/layout.h tg_cidr4_key
VAL = np.dtype([("mask", "<u8"), ("flags", "<u4"), ("pad", "<u4")])  # tg_cidr_val
ARRAY_MIN = 64  # entries; a rule set with fewer is built the usual way
_EMPTY = np.zeros(0, np.uint64)


def codes_of(addrs: np.ndarray, plens: np.ndarray) -> np.ndarray:
    """address << 8 | prefix length (IPv4, 0-32) as uint64: sorted, the
    order of the unified (address, prefix length) keys."""
    return (addrs.astype(np.uint64) << np.uint64(8)) | plens.astype(np.uint64)


def codes_of_keys(keys: list[tuple[int, int]]) -> np.ndarray | None:
    """The codes of unified (addr128, prefixlen128) keys, or None when one is not IPv4."""
    if not keys:
        return _EMPTY
    addrs, plens = zip(*keys)
    try:
        a = np.array(addrs, np.uint64)
    except OverflowError:  # an IPv6 address past 64 bits
        return None
    p = np.array(plens, np.int64)
    if (p < 96).any() or ((a >> np.uint64(32)) != np.uint64(V4_MAPPED >> 32)).any():
        return None
    return codes_of(a & np.uint64(0xFFFFFFFF), p - 96)


class V4Entries:
    """A rule set's IPv4 trie entries: codes (sorted, unique), each one's
    rule mask (uint64) and flags (uint32). Read-only."""

    __slots__ = ("codes", "masks", "flags")

    def __init__(self, codes: np.ndarray, masks: np.ndarray, flags: np.ndarray):
        self.codes, self.masks, self.flags = codes, masks, flags

    def __len__(self) -> int:
        return len(self.codes)

    def same(self, other: V4Entries) -> bool:
        return (np.array_equal(self.codes, other.codes) and np.array_equal(self.masks, other.masks)
                and np.array_equal(self.flags, other.flags))  # fmt: skip

    def as_dict(self) -> dict[tuple[int, int], tuple[int, int]]:
        """As KernelRuleSet.cidrs holds them: (addr128, prefixlen128) -> (rule_mask, flags), in order."""
        return dict(zip(keys_of_codes(self.codes), zip(self.masks.tolist(), self.flags.tolist())))


def v4_entries(lists: list[tuple[np.ndarray, int, int]]) -> V4Entries | None:
    """The entries of (codes, rule mask, flags) lists when none of their
    networks contains another (the same network in two lists is one entry
    with both lists' masks and flags), else None: they need the walk."""
    codes = np.concatenate([c for c, _, _ in lists])
    masks = np.concatenate([np.full(len(c), m, np.uint64) for c, m, _ in lists])
    flags = np.concatenate([np.full(len(c), f, np.uint32) for c, _, f in lists])
    if len(codes) > 1 and not (codes[1:] > codes[:-1]).all():  # not in order, or a network twice
        order = np.argsort(codes, kind="stable")
        codes, masks, flags = codes[order], masks[order], flags[order]
        first = np.flatnonzero(np.concatenate(([True], codes[1:] != codes[:-1])))
        codes = codes[first]
        masks, flags = np.bitwise_or.reduceat(masks, first), np.bitwise_or.reduceat(flags, first)
    # in order, an entry containing a later one contains the next one too: comparing each entry's
    # last address with the next one's first is enough
    addrs, plens = codes >> np.uint64(8), codes & np.uint64(0xFF)
    last = addrs | ((np.uint64(1) << (np.uint64(32) - plens)) - np.uint64(1))
    if not (last[:-1] < addrs[1:]).all():
        return None
    return V4Entries(codes, masks, flags)


class Trie4(Mapping):
    """One slot's IPv4 trie entries as the kernel holds them: sorted codes
    and their raw values (VAL records). Also the Mapping of raw key bytes ->
    raw value bytes that kernel_trie_entries gives for the slow path (made
    when read that way)."""

    def __init__(self, slot: int, codes: np.ndarray, values: np.ndarray):
        self.slot, self.codes, self.vals = slot, codes, values
        self._raw: dict[bytes, bytes] | None = None

    @classmethod
    def of(cls, entries: V4Entries, slot: int) -> Trie4:
        values = np.zeros(len(entries), VAL)
        values["mask"], values["flags"] = entries.masks, entries.flags
        return cls(slot, entries.codes, values)

    @classmethod
    def held(cls, raw: Mapping[bytes, bytes]) -> Trie4:
        """`raw` (a Trie4, or raw key -> value bytes of one slot's IPv4 trie entries) as a Trie4."""
        if isinstance(raw, Trie4):
            return raw
        keys = np.frombuffer(b"".join(raw), KEY4)
        codes = codes_of(keys["addr"], keys["plen"] - 32)
        order = np.argsort(codes)
        slot = int(keys["slot"][0]) if len(keys) else 0  # (no key to write: any slot)
        return cls(slot, codes[order], np.frombuffer(b"".join(raw.values()), VAL)[order])

    def __len__(self) -> int:
        return len(self.codes)

    def key_bytes(self) -> bytes:
        keys = np.empty(len(self.codes), KEY4)
        keys["plen"] = (self.codes & np.uint64(0xFF)) + np.uint64(32)
        keys["slot"] = self.slot
        keys["addr"] = self.codes >> np.uint64(8)
        return keys.tobytes()

    def value_bytes(self) -> bytes:
        return self.vals.tobytes()

    def same(self, other: Trie4) -> bool:
        return np.array_equal(self.codes, other.codes) and self._words().tobytes() == other._words().tobytes()

    def take(self, which: np.ndarray) -> Trie4:
        return Trie4(self.slot, self.codes[which], self.vals[which])

    def without(self, other: Trie4) -> Trie4:
        """The entries whose key `other` does not have."""
        return self.take(~self._found(other)[0])

    def within(self, other: Trie4) -> Trie4:
        """The entries whose key `other` has too."""
        return self.take(self._found(other)[0])

    def changed_from(self, other: Trie4) -> Trie4:
        """The entries `other` lacks or holds with another value: what writing self over other writes."""
        found, at = self._found(other)
        same = found.copy()
        same[found] = (self._words()[found] == other._words()[at[found]]).all(axis=1)
        return self.take(~same)

    def _found(self, other: Trie4) -> tuple[np.ndarray, np.ndarray]:
        """Whether each entry's key is in other, and where (other's codes are sorted and unique)."""
        if not len(other.codes) or not len(self.codes):
            return np.zeros(len(self.codes), bool), np.zeros(len(self.codes), np.intp)
        at = np.minimum(np.searchsorted(other.codes, self.codes), len(other.codes) - 1)
        return other.codes[at] == self.codes, at

    def _words(self) -> np.ndarray:
        return self.vals.view("<u8").reshape(-1, 2)

    # Mapping: raw key bytes -> raw value bytes
    def _mapping(self) -> dict[bytes, bytes]:
        if self._raw is None:
            kb, vb, ks, vs = self.key_bytes(), self.value_bytes(), KEY4.itemsize, VAL.itemsize
            self._raw = {kb[i * ks:(i + 1) * ks]: vb[i * vs:(i + 1) * vs] for i in range(len(self.codes))}
        return self._raw

    def __getitem__(self, key: bytes) -> bytes:
        return self._mapping()[key]

    def __iter__(self):
        return iter(self._mapping())
