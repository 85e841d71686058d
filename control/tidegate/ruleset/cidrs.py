"""CIDR text to ipaddress networks, fast for the shapes people write.

ipaddress takes ~5 us to parse an IPv4 network and ~10 us for a full-length
IPv6 one: most of the time a 131,072-entry rule set costs. Dotted IPv4 and
hex-and-colon IPv6, each with an optional /length, are parsed here into the
very objects ipaddress would make (built from integers, without going
through ipaddress's constructors, which is cheaper still). Anything else,
and anything that would be an error, is left to ipaddress, which gives its
own verdict and message: same acceptance, same objects
(tests/unit/test_rule_set_depth.py compares them on generated text).

parse_entry also gives what an apply needs of each network next to it: its
key in the kernel's unified 128-bit space and its canonical text, taken
from the integers and the text already at hand.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

import numpy as np

from tidegate.kernel.layout import V4_MAPPED, keys_of_codes
from tidegate.kernel.trie4 import codes_of

# dotted quads without leading zeros (inet_aton would read 010 as octal); inet_aton refuses an octet over 255
_OCTET = r"(?:0|[1-9][0-9]{0,2})"
_V4 = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})(?:/([0-9]{{1,2}}))?")
_V6 = re.compile(r"([0-9a-f:]{2,39})(?:/([0-9]{1,3}))?")

_V4Net, _V4Addr = ipaddress.IPv4Network, ipaddress.IPv4Address
_V6Net, _V6Addr = ipaddress.IPv6Network, ipaddress.IPv6Address
_new = object.__new__
_NETMASKS4 = [_V4Net._make_netmask(plen) for plen in range(33)]  # (netmask, prefixlen), as ipaddress caches them
_NETMASKS6 = [_V6Net._make_netmask(plen) for plen in range(129)]
_aton, _from_bytes = socket.inet_aton, int.from_bytes
_DIGIT = np.zeros(256, bool)
_DIGIT[ord("0"): ord("9") + 1] = True
_SEPARATORS = np.frombuffer(b".../\n", np.uint8)  # the characters after the 5 numbers of an IPv4 CIDR line
_NOT_SEPARATOR = 255
_SEPARATOR_OF = np.full(256, _NOT_SEPARATOR, np.uint8)  # a character -> itself if it separates numbers
_SEPARATOR_OF[_SEPARATORS] = _SEPARATORS
V4_LIST_MIN = 64  # items; below that the loop is as quick
# items read at once: every array a part needs stays under the agent's mmap threshold (daemon/memory.py),
# so they come from the heap, not from fresh pages each (~2x the time for 100,000 items at once)
V4_CHUNK = 16384


def _built(net_cls, address, netmask_and_len: tuple) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network object as ipaddress's constructor leaves it for lengths
    below the last two: network_address, netmask and _prefixlen (a /31,
    /32, /127 or /128 also gets its own hosts(): the constructor makes those)."""
    net = _new(net_cls)
    net.network_address = address
    net.netmask, net._prefixlen = netmask_and_len
    return net


def _v4(addr: int, plen: int) -> ipaddress.IPv4Network:
    """IPv4Network((addr, plen)) for a valid network."""
    if plen >= 31:
        return _V4Net((addr, plen))
    a = _new(_V4Addr)
    a._ip = addr
    return _built(_V4Net, a, _NETMASKS4[plen])


def _v6(addr: int, plen: int) -> ipaddress.IPv6Network:
    """IPv6Network((addr, plen)) for a valid network."""
    if plen >= 127:
        return _V6Net((addr, plen))
    a = _new(_V6Addr)
    a._ip = addr
    a._scope_id = None
    return _built(_V6Net, a, _NETMASKS6[plen])


def parse_entry(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int], str] | None:
    """(the network `text` is with strict=True, its (addr128, prefixlen128)
    key (kernel.layout.network_key), its canonical text (str of it)), or
    None: ask ipaddress."""
    m = _V4.fullmatch(text)
    if m is not None:
        quad, p = m.groups()
        try:
            addr = _from_bytes(_aton(quad), "big")
        except OSError:  # an octet over 255
            return None
        plen = 32 if p is None else int(p)
        if plen > 32 or addr & ((1 << (32 - plen)) - 1):  # host bits set: ipaddress words that error
            return None
        # the octets have no leading zeros (the pattern): only the length may need rewriting
        canonical = text if p is not None and (p[0] != "0" or p == "0") else f"{quad}/{plen}"
        return _v4(addr, plen), (V4_MAPPED | addr, 96 + plen), canonical
    m = _V6.fullmatch(text)
    if m is None:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, m[1])
    except OSError:
        return None
    addr = int.from_bytes(packed, "big")
    plen = 128 if m[2] is None else int(m[2])
    if plen > 128 or addr & ((1 << (128 - plen)) - 1):
        return None
    net = _v6(addr, plen)
    # inet_pton and ipaddress disagree on a few corner cases ('::' standing for no group at all...):
    # only an address written as ipaddress itself writes it, in full or compressed, is taken here
    shown = str(net.network_address)
    if m[1] != shown and m[1] != packed.hex(":", 2):
        return None
    return net, (addr, plen), f"{shown}/{plen}"


def parse(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network `text` is with strict=True, or None: ask ipaddress."""
    entry = parse_entry(text)
    return entry[0] if entry is not None else None


def parse_entries(texts: list) -> list:
    """parse_entry of each text (None where it is not a str), in one loop:
    the IPv4 shape people write most is worked out inline, the rest by
    parse_entry."""
    out = []
    append = out.append
    match = _V4.fullmatch
    for text in texts:
        m = match(text) if type(text) is str else None
        if m is None:
            append(parse_entry(text) if type(text) is str else None)
            continue
        quad, p = m.groups()
        if p is None or p[0] == "0":
            append(parse_entry(text))  # no length, or one with a leading zero: canonical text differs
            continue
        try:
            addr = _from_bytes(_aton(quad), "big")
        except OSError:
            append(None)
            continue
        plen = int(p)
        if plen > 30 or addr & ((1 << (32 - plen)) - 1):
            append(parse_entry(text))  # /31, /32 (built by ipaddress), or an error to leave to it
            continue
        append((_v4(addr, plen), (V4_MAPPED | addr, 96 + plen), text))
    return out


def parse_v4_list(texts: list) -> tuple[np.ndarray, list] | None:
    """(codes, texts) of a list of IPv4 CIDRs: each one's `address << 8 |
    prefix length` (kernel/trie4.py, where its key comes from), worked out
    for the whole list at once (one pattern checks every item, numpy reads
    the numbers and checks the octets and the host bits), and the texts, as
    parse_entries would give them. None when any item is not such a CIDR
    (written otherwise, a /31 or /32, IPv6, wrong): parse_entries then."""
    if len(texts) < V4_LIST_MIN or None in texts:  # texts, or None where an item is not text
        return None
    read = [_addresses(texts[at: at + V4_CHUNK]) for at in range(0, len(texts), V4_CHUNK)]
    if any(r is None for r in read):
        return None
    addrs, plens = (np.concatenate(x) for x in zip(*read))
    return codes_of(addrs, plens), list(texts)


class V4Networks(Sequence):
    """A long list of IPv4 networks as parse_v4_list read it: each one's
    code and text. It reads as the tuple of ipaddress networks the parser
    would otherwise keep (model.Networks), but makes each network when
    asked for and keeps none: 100,000 of them were ~18 MB of every version
    the agent holds (and 10-15 ms of the list's read). Equal to, and hashed as,
    any tuple of the same networks; `+` gives a tuple. The kernel write
    and the canonical text take the codes and the texts as they are."""

    __slots__ = ("v4_codes", "texts", "_keys", "_hash", "_sorted")

    def __init__(self, codes: np.ndarray, texts: list[str]):
        self.v4_codes = codes
        self.texts = texts
        self._keys = None
        self._hash = None
        self._sorted = None  # the codes sorted, for `in` (made at the first)

    @property
    def unified_keys(self) -> list[tuple[int, int]]:
        if self._keys is None:
            self._keys = keys_of_codes(self.v4_codes)
        return self._keys

    def __len__(self) -> int:
        return len(self.v4_codes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(map(_network_of_code, self.v4_codes[i].tolist()))
        return _network_of_code(int(self.v4_codes[i]))

    def __iter__(self):
        return map(_network_of_code, self.v4_codes.tolist())

    def __contains__(self, net) -> bool:
        if type(net) is not _V4Net:
            return False
        code = int(net.network_address) << 8 | net.prefixlen
        if self._sorted is None:
            self._sorted = np.sort(self.v4_codes)
        at = int(self._sorted.searchsorted(self._sorted.dtype.type(code)))  # its own dtype: no conversion
        return at < len(self._sorted) and int(self._sorted[at]) == code

    def __eq__(self, other) -> bool:
        if isinstance(other, V4Networks):
            return bool(np.array_equal(self.v4_codes, other.v4_codes))
        if not isinstance(other, tuple):  # as a tuple: never equal to a list
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))  # as the equal tuple's
        return self._hash

    def __add__(self, other):
        return tuple(self) + tuple(other)

    def __radd__(self, other):
        return tuple(other) + tuple(self)

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self):  # copy and pickle
        return V4Networks, (self.v4_codes, self.texts)


def _network_of_code(code: int) -> ipaddress.IPv4Network:
    """The network of a code (`address << 8 | prefix length`, a length of 30 or less)."""
    a = _new(_V4Addr)
    a._ip = code >> 8
    return _built(_V4Net, a, _NETMASKS4[code & 255])


def distinct(codes: np.ndarray) -> bool:
    """Whether no two codes (parse_v4_list) are the same: no network listed twice."""
    return bool((codes[1:] > codes[:-1]).all()) or len(np.unique(codes)) == len(codes)


def _addresses(texts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The addresses and prefix lengths of IPv4 CIDR texts (parse_v4_list), or None."""
    joined = ("\n".join(texts) + "\n").encode("ascii", "replace")
    octets = _numbers(np.frombuffer(joined, np.uint8), len(texts))
    if octets is None:
        return None
    plens = octets[:, 4]
    if (octets[:, :4] > 255).any() or (plens > 30).any():
        return None
    addrs = (octets[:, 0] << 24) | (octets[:, 1] << 16) | (octets[:, 2] << 8) | octets[:, 3]
    if (addrs & ((np.int64(1) << (32 - plens)) - 1)).any():  # host bits set: ipaddress words that error
        return None
    return addrs, plens


def _numbers(chars: np.ndarray, n: int) -> np.ndarray | None:
    """The (n, 5) numbers of n lines `a.b.c.d/len\n` (each 1-3 digits, no
    leading zero), or None when the characters are anything else."""
    kind = _SEPARATOR_OF[chars]
    seps = np.flatnonzero(kind != _NOT_SEPARATOR)
    if seps.size != 5 * n or not _DIGIT[chars[kind == _NOT_SEPARATOR]].all():
        return None
    if not (kind[seps].reshape(n, 5) == _SEPARATORS).all():
        return None
    starts = np.concatenate(([0], seps[:-1] + 1))
    width = seps - starts
    if width.min() < 1 or width.max() > 3:
        return None
    if ((chars[starts] == ord("0")) & (width > 1)).any():  # a leading zero (inet_aton would read octal)
        return None
    # each number's (up to) three digits, taken from the characters (not from a copy of them all as int64)
    first, second, third = (chars[np.minimum(starts + i, chars.size - 1)].astype(np.int64) - ord("0")
                            for i in range(3))  # fmt: skip
    values = np.where(width == 1, first, np.where(width == 2, first * 10 + second, first * 100 + second * 10 + third))
    return values.reshape(n, 5)
