"""Hostile frames through the real program: every one gets a defined verdict.

The verifier already proves the program never reads out of bounds; these
tests show what it decides: frames it cannot read pass as "unparsed",
frames whose source it can read are filtered on it."""

from __future__ import annotations

import random

import pytest

from fixtures import rule_set

from . import frames as f

RULES = rule_set("dns-open")

BASES = {
    "ipv4-udp": f.udp("192.0.2.9", 53, payload=8),
    "ipv6-udp": f.udp("2001:db8:dead::9", 53, payload=8),
    "vlan2-ipv4": f.udp("192.0.2.9", 53, vlans=2),
    "ipv6-ext": f.ipv6_ext_chain("2001:db8:dead::9", 3),
    "ipv4-tcp": f.tcp("192.0.2.9", 80),
}


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(BASES))
def test_truncated_at_every_offset(replay, name):
    replay.apply(RULES)
    frame = BASES[name]
    header_end = {"ipv4-udp": 34, "ipv6-udp": 54, "vlan2-ipv4": 42, "ipv6-ext": 54, "ipv4-tcp": 34}[name]
    # the kernel refuses test runs shorter than an Ethernet header, and no
    # driver hands XDP such a frame either
    for n in range(14, len(frame) + 1):
        step = replay.send(frame[:n])
        if n < header_end:
            assert (step.verdict, step.reason) == ("pass", "unparsed"), n
        else:
            # source readable: the deny list applies even without the L4 header
            assert (step.verdict, step.reason) == ("drop", "deny"), n


@pytest.mark.kernel
def test_bogus_ihl_and_version(replay):
    replay.apply(RULES)
    frame = bytearray(f.udp("192.0.2.9", 53))
    for ihl in range(16):
        frame[14] = 0x40 | ihl
        step = replay.send(bytes(frame))
        expected = ("pass", "unparsed") if ihl < 5 else ("drop", "deny")
        assert (step.verdict, step.reason) == expected, ihl
    for version in (0, 5, 6, 15):
        frame[14] = (version << 4) | 5
        assert replay.send(bytes(frame)).reason == "unparsed"


@pytest.mark.kernel
@pytest.mark.parametrize("n", range(0, 9))
def test_long_ipv6_extension_chains(replay, n):
    replay.apply(RULES)
    step = replay.send(f.ipv6_ext_chain("2001:db8:dead::9", n))
    assert (step.verdict, step.reason) == ("drop", "deny")
    step = replay.send(f.ipv6_ext_chain("2001:db8:beef::9", n))
    assert step.verdict == "pass" and step.reason == "pass"


@pytest.mark.kernel
@pytest.mark.parametrize("tags", range(0, 6))
def test_stacked_vlan_tags(replay, tags):
    replay.apply(RULES)
    step = replay.send(f.udp("192.0.2.9", 53, vlans=tags))
    assert (step.verdict, step.reason) == (("drop", "deny") if tags <= 2 else ("pass", "unparsed"))


EXT_RULES = """
defaults:
  limit: {pps: 1000000000, burst: 1000000000}
deny: ["2001:db8:dead::/48"]
rules:
  - name: ssh
    protocol: tcp
    dst_ports: [22]
    action: drop
  - name: dns
    protocol: udp
    dst_ports: [53]
    action: drop
"""
IPV6_EXT = {0, 43, 44, 51, 60, 135, 139, 140, 253, 254}  # bpf/parse.h tg_is_ipv6_ext


def _expected(frame: bytes) -> tuple[str, str]:
    """What bpf/parse.h's walk decides, written out in Python: up to 2 VLAN
    tags, the IPv6 header, up to 8 extension headers (a fragment header 8
    bytes, AH (len + 2) x 4, the others (len + 1) x 8), then the port of a
    first fragment's TCP or UDP header."""
    off, ethertype = 14, int.from_bytes(frame[12:14], "big")
    for _ in range(2):
        if ethertype in (0x8100, 0x88A8):
            if off + 4 > len(frame):
                return "pass", "unparsed"
            ethertype, off = int.from_bytes(frame[off + 2 : off + 4], "big"), off + 4
    if ethertype != 0x86DD or off + 40 > len(frame):
        return "pass", "unparsed"
    if frame[off + 8 : off + 14] == bytes.fromhex("20010db8dead"):
        return "drop", "deny"
    proto, off, first = frame[off + 6], off + 40, True
    for _ in range(8):
        if proto == 44:
            if off + 8 > len(frame):
                break
            first = first and int.from_bytes(frame[off + 2 : off + 4], "big") & 0xFFF8 == 0
            proto, off = frame[off], off + 8
        elif proto in IPV6_EXT:
            if off + 2 > len(frame):
                break
            proto, off = frame[off], off + ((frame[off + 1] + 2) * 4 if proto == 51 else (frame[off + 1] + 1) * 8)
        else:
            break
    if proto in IPV6_EXT:
        return "drop", "ipv6-ext-drop"
    if proto in (6, 17) and first and off + 4 <= len(frame):
        if (proto, int.from_bytes(frame[off + 2 : off + 4], "big")) in ((6, 22), (17, 53)):
            return "drop", "deny"
    return "pass", "pass"


@pytest.mark.kernel
def test_random_ipv6_extension_chains_are_walked_like_the_reference(replay):
    """1,500 random chains (kinds, lengths, fragments, VLAN tags, cut short,
    bytes overwritten): the program's verdict and reason are those of the
    walk written out in Python (the program reads each header at an offset
    the verifier does not know, bpf/parse.h)."""
    replay.apply(EXT_RULES)
    rnd = random.Random(20261203)
    for i in range(1500):
        frame = f.random_ipv6_chain(rnd, rnd.choice(["2001:db8:dead::1", "2001:db8:5::1"]))
        step = replay.send(frame)
        assert (step.verdict, step.reason) == _expected(frame), (i, frame.hex())
