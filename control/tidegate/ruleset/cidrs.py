"""CIDR text to ipaddress networks, fast for the shapes people write.

ipaddress takes ~5 us to parse an IPv4 network and ~10 us for a full-length
IPv6 one: most of the time a 131,072-entry rule set costs. Dotted IPv4 and
hex-and-colon IPv6, each with an optional /length, are parsed here into the
very objects ipaddress would make (built from integers, which is cheaper).
Anything else, and anything that would be an error, is left to ipaddress,
which gives its own verdict and message: same acceptance, same objects
(tests/unit/test_rule_set_depth.py compares them on generated text).
"""

from __future__ import annotations

import ipaddress
import re
import socket

_OCTET = r"(0|[1-9][0-9]{0,2})"
_V4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/([0-9]{{1,2}}))?")
_V6 = re.compile(r"([0-9a-f:]{2,39})(?:/([0-9]{1,3}))?")


def parse(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network `text` is with strict=True, or None: ask ipaddress."""
    m = _V4.fullmatch(text)
    if m is not None:
        a, b, c, d, p = m.groups()
        a, b, c, d = int(a), int(b), int(c), int(d)
        plen = 32 if p is None else int(p)
        if a > 255 or b > 255 or c > 255 or d > 255 or plen > 32:
            return None
        addr = (a << 24) | (b << 16) | (c << 8) | d
        if addr & ((1 << (32 - plen)) - 1):  # host bits set: ipaddress words that error
            return None
        return ipaddress.IPv4Network((addr, plen))
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
    net = ipaddress.IPv6Network((addr, plen))
    # inet_pton and ipaddress disagree on a few corner cases ('::' standing for no group at all...):
    # only an address written as ipaddress itself writes it, in full or compressed, is taken here
    return net if m[1] == packed.hex(":", 2) or m[1] == str(net.network_address) else None
