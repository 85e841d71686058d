"""Exact verdicts of the real XDP program on crafted packets.

Each case is a rule set plus timed steps: (milliseconds, frame, expected
verdict, expected reason). The reason is read from the program's own
per-reason counters, which must move by exactly one per packet."""

from __future__ import annotations

import pytest

from fixtures import rule_set

from . import frames as f

RULES = rule_set("verdicts")

P, D = "pass", "drop"

CASES = {
    "allow list passes whatever the rules say": [
        *[(0, f.udp("10.1.2.3", 53), P, "allow")] * 20,
    ],
    "allow wins over a deny entry inside it": [
        (0, f.udp("10.1.5.7", 53), P, "allow"),
    ],
    "deny list drops": [
        (0, f.udp("192.0.2.9", 80), D, "deny"),
        (0, f.udp("2001:db8:dead::5", 80), D, "deny"),
    ],
    "rule action drop": [
        (0, f.tcp("203.0.113.9", 23), D, "deny"),
    ],
    "dns bucket: burst passes, then rate drop, then block, then refill": [
        *[(0, f.udp("203.0.113.5", 53), P, "pass")] * 5,
        (0, f.udp("203.0.113.5", 53), D, "rate"),
        (5000, f.udp("203.0.113.5", 53), D, "blocked"),
        (9999, f.udp("203.0.113.5", 53), D, "blocked"),
        (10_001, f.udp("203.0.113.5", 53), P, "pass"),
        # another source is untouched by the first one's block
        (5000, f.udp("203.0.113.6", 53), P, "pass"),
    ],
    "token bucket refills at its rate (web: 100 pps, burst 3)": [
        *[(0, f.tcp("198.51.100.7", 8050), P, "pass")] * 3,
        (0, f.tcp("198.51.100.7", 8050), D, "rate"),
        (10, f.tcp("198.51.100.7", 8050), P, "pass"),
        (10, f.tcp("198.51.100.7", 8050), D, "rate"),
        (30, f.tcp("198.51.100.7", 80), P, "pass"),
        (30, f.tcp("198.51.100.7", 80), P, "pass"),
        (30, f.tcp("198.51.100.7", 80), D, "rate"),
    ],
    "rule sources: outside them the default applies": [
        *[(0, f.tcp("203.0.113.50", 8050), P, "pass")] * 10,
    ],
    "ports outside the list fall to the default": [
        *[(0, f.tcp("198.51.100.8", 8101), P, "pass")] * 10,
    ],
    "prefix limit catches a spread flood no single source exceeds": [
        *[(0, f.udp(f"198.18.5.{i}", 9999), P, "pass") for i in range(1, 11)],
        *[(0, f.udp(f"198.18.5.{i}", 9999), D, "prefix") for i in range(11, 30)],
        # another /24 has its own prefix bucket
        (0, f.udp("198.18.6.1", 9999), P, "pass"),
        # refill: 10 pps -> one packet per 100 ms
        (100, f.udp("198.18.5.99", 9999), P, "pass"),
    ],
    "IPv6 sources are aggregated per /64": [
        *[(0, f.udp("2001:db8:5::1", 53), P, "pass")] * 3,
        *[(0, f.udp("2001:db8:5::2", 53), P, "pass")] * 2,
        (0, f.udp("2001:db8:5::3", 53), D, "rate"),
        (0, f.udp("2001:db8:6::1", 53), P, "pass"),
    ],
    "IPv6 prefix limit uses /48": [
        *[(0, f.udp(f"2001:db8:7:{i:x}::1", 9999), P, "pass") for i in range(10)],
        (0, f.udp("2001:db8:7:ff::1", 9999), D, "prefix"),
    ],
    "byte rate: 1000-byte burst": [
        (0, f.udp("203.0.113.70", 7000, payload=400), P, "pass"),
        (0, f.udp("203.0.113.70", 7000, payload=400), P, "pass"),
        (0, f.udp("203.0.113.70", 7000, payload=400), D, "rate"),
    ],
    # 442-byte frames against 10,000 bytes/s with a 1,000-byte burst (and 10
    # pps, far from limiting here): the byte bucket refills at its own rate
    "byte bucket refills at its byte rate (bytes: 10,000 B/s, burst 1,000 B)": [
        (0, f.udp("203.0.113.71", 7001, payload=400), P, "pass"),
        (0, f.udp("203.0.113.71", 7001, payload=400), P, "pass"),
        (0, f.udp("203.0.113.71", 7001, payload=400), D, "rate"),  # 116 bytes left
        (20, f.udp("203.0.113.71", 7001, payload=400), D, "rate"),  # +200: 316
        (33, f.udp("203.0.113.71", 7001, payload=400), P, "pass"),  # +130: 446
        (33, f.udp("203.0.113.71", 7001, payload=400), D, "rate"),
    ],
    "a bucket holds at most its burst, however long it idled (web: burst 3)": [
        (0, f.tcp("198.51.100.8", 8050), P, "pass"),
        *[(1000, f.tcp("198.51.100.8", 8050), P, "pass")] * 3,
        (1000, f.tcp("198.51.100.8", 8050), D, "rate"),
    ],
    "icmp rule": [
        (0, f.icmp("203.0.113.80"), P, "pass"),
        (0, f.icmp("203.0.113.80"), D, "rate"),
    ],
    "VLAN-tagged frames match like untagged ones": [
        (0, f.udp("192.0.2.9", 53, vlans=1), D, "deny"),
        (0, f.udp("192.0.2.9", 53, vlans=2), D, "deny"),
        (0, f.udp("10.1.2.3", 53, vlans=2), P, "allow"),
        *[(0, f.udp("203.0.113.90", 53, vlans=1), P, "pass")] * 5,
        (0, f.udp("203.0.113.90", 53, vlans=2), D, "rate"),
    ],
    "more VLAN tags than supported pass as unparsed": [
        (0, f.udp("192.0.2.9", 53, vlans=3), P, "unparsed"),
    ],
    "truncated and non-IP frames pass as unparsed": [
        (0, f.arp(), P, "unparsed"),
        (0, f.udp("192.0.2.9", 53)[:20], P, "unparsed"),
        (0, f.udp("2001:db8:dead::5", 53)[:40], P, "unparsed"),
        (0, b"\x00" * 14, P, "unparsed"),
    ],
    "non-first fragments have no port: matched on address, default rule": [
        *[(0, f.fragment4("203.0.113.100", 53, first=True), P, "pass")] * 5,
        (0, f.fragment4("203.0.113.100", 53, first=True), D, "rate"),
        *[(0, f.fragment4("203.0.113.100", 53, first=False), P, "pass")] * 5,
        (0, f.fragment4("192.0.2.1", 53, first=False), D, "deny"),
    ],
    "IPv6 extension headers are walked to the port": [
        *[(0, f.ipv6_ext_chain("2001:db8:9::1", 2, 53), P, "pass")] * 5,
        (0, f.ipv6_ext_chain("2001:db8:9::1", 2, 53), D, "rate"),
        (0, f.ipv6_fragment("2001:db8:dead::1", 53, offset=0), D, "deny"),
    ],
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_verdict(replay, case, rules=RULES, cases=CASES):
    replay.apply(rules)
    for i, (ms, frame, verdict, reason) in enumerate(cases[case]):
        got = replay.at(ms).send(frame)
        assert (got.verdict, got.reason) == (verdict, reason), f"step {i} at {ms} ms"


@pytest.mark.kernel
def test_per_rule_counters_follow_verdicts(replay):
    replay.apply(RULES)
    kf = replay.kf
    before = kf.counters().rules
    for _ in range(7):
        replay.send(f.udp("203.0.113.5", 53))
    replay.send(f.tcp("203.0.113.9", 23))
    for i in range(12):  # spread: ten pass its /24 bucket, two are prefix drops
        replay.send(f.udp(f"198.18.9.{i + 1}", 9999))
    after = kf.counters().rules

    def delta(rule, field):
        return getattr(after[rule], field) - getattr(before.get(rule, after[rule].__class__()), field)

    assert delta("dns", "pass_packets") == 5
    assert delta("dns", "drop_packets") == 2
    assert delta("dns", "drop_rate") == 1
    assert delta("dns", "drop_blocked") == 1
    assert delta("telnet", "drop_deny") == 1
    assert (delta("spread", "pass_packets"), delta("spread", "drop_packets")) == (10, 2)
    assert (delta("spread", "drop_prefix"), delta("spread", "drop_rate")) == (2, 0)
    assert (delta("dns", "drop_prefix"), delta("dns", "drop_deny")) == (0, 0)


@pytest.mark.kernel
def test_source_table_reports_top_talkers(replay):
    replay.apply(RULES)
    for _ in range(8):
        replay.send(f.udp("203.0.113.5", 53))
    replay.send(f.udp("203.0.113.6", 53))
    table = replay.kf.read_sources()
    epoch = replay.kf.state().active.epoch
    rows = {
        table.address(i): (int(table.packets[i]), int(table.drops[i]))
        for i in range(table.count)
        if table.epoch[i] == epoch and table.kind[i] == 0
    }
    assert rows == {"203.0.113.5": (8, 3), "203.0.113.6": (1, 0)}


# Protocols without ports, and what a rule of each protocol class takes.
PROTO_RULES = rule_set("verdicts-proto")


def _raw4(src: str, proto: int) -> bytes:
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    return bytes(Ether(**f.ETH) / IP(src=src, dst=f.DST4, proto=proto) / (b"\x00" * 24))


def _icmp6(src: str) -> bytes:
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    return bytes(Ether(**f.ETH) / IPv6(src=src, dst=f.DST6) / ICMPv6EchoRequest())


PROTO_CASES = {
    "icmpv6 rule takes ICMPv6, not ICMP": [
        (0, _icmp6("2001:db8:50::1"), P, "pass"),
        (0, _icmp6("2001:db8:50::1"), P, "pass"),
        (0, _icmp6("2001:db8:50::1"), D, "rate"),
        (0, f.icmp("203.0.113.1"), P, "pass"),
        (0, f.icmp("203.0.113.1"), D, "rate"),  # ping4's own bucket, burst 1
    ],
    "unknown L4 protocols (GRE, SCTP) match 'any' rules by source, else the default": [
        (0, _raw4("198.51.100.4", 47), P, "pass"),
        (0, _raw4("198.51.100.4", 47), D, "rate"),  # tunnels: burst 1
        (0, _raw4("198.51.100.4", 132), D, "rate"),  # the same (rule, source) bucket
        *[(0, _raw4("203.0.113.4", 47), P, "pass")] * 5,  # not in tunnels' sources: default
        (0, _raw4("192.0.2.4", 132), D, "deny"),  # the deny list does not care about protocols
    ],
    "'any' with ports takes TCP and UDP on those ports only": [
        *[(0, f.tcp("203.0.113.5", 443), P, "pass")] * 3,
        (0, f.udp("203.0.113.5", 443), D, "rate"),  # web's bucket is per (rule, source)
        *[(0, f.udp("203.0.113.5", 444), P, "pass")] * 5,  # the default
    ],
    "a /0 prefix limit is one aggregate bucket per family: random sources share it": [
        *[(0, f.tcp(f"{i * 40 + 1}.{i}.{i}.{i}", 22), P, "pass") for i in range(1, 6)],
        *[(0, f.tcp(f"{i * 40 + 2}.9.9.{i}", 22), D, "prefix") for i in range(1, 4)],
        (0, f.tcp("2001:db8:77::1", 22), P, "pass"),  # IPv6 has its own aggregate
        (200, f.tcp("203.0.113.222", 22), P, "pass"),  # refill: 5 pps
    ],
    "an IPv6 packet from a v4-mapped source is matched as IPv6": [
        # IPv4 lists and rules apply to IPv4 packets; ::ffff:192.0.2.9 on
        # the wire is an IPv6 source and gets IPv6's (here: the default)
        (0, f.udp("::ffff:192.0.2.9", 53), P, "pass"),
        (0, f.udp("192.0.2.9", 53), D, "deny"),
    ],
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(PROTO_CASES), ids=list(PROTO_CASES))
def test_protocol_verdict(replay, case):
    test_verdict(replay, case, PROTO_RULES, PROTO_CASES)
