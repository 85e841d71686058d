"""Hostile frames through the real program: every one gets a defined verdict.

The verifier already proves the program never reads out of bounds; these
tests show what it decides: frames it cannot read pass as "unparsed",
frames whose source it can read are filtered on it."""

from __future__ import annotations

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

