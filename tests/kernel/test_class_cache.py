"""The per-source classification cache (bpf/classify.h): a swap invalidates
every cached classification, and a cached answer is only ever used for
the address it was computed for.

A source's state entry keeps the trie's answer for it (listed or not, the
rules whose sources contain it), so later packets skip the trie. Each test
first warms the cache under set A (several packets, the entry holds A's
answer), then applies set B without clearing any state, and checks that
the very next packet from the same source is judged by B alone: counted on
B's rule, B's list, with B's reason. Per-rule counters tell the sets'
rules apart, so a packet judged by A's cached answer would show."""

from __future__ import annotations

import pytest

from tidegate.ruleset.parse import parse_rule_set

from . import frames as f

SRC = "198.51.100.7"
NEIGHBOUR = "198.51.100.9"  # same /24: the same state key when ipv4_prefix is 24
SRC6 = "2001:db8:aa::7"

# quic takes udp/443 from anyone
SET_A = """
defaults:
  limit: {pps: 1000, burst: 1000}
  ipv4_prefix: 24
  ipv6_prefix: 64
  prefix_limit: {ipv4_prefix: 16, ipv6_prefix: 48, pps: 100000, burst: 100000}
deny: ["203.0.113.0/24"]
rules:
  - name: a-dns
    protocol: udp
    dst_ports: [53]
    sources: ["192.0.2.0/24"]
    limit: {pps: 1000, burst: 1000}
  - name: quic
    protocol: udp
    dst_ports: [443, 53]
    limit: {pps: 1000, burst: 1000}
"""
# the source's rule changes: a source-restricted rule covering it now comes first
RULE_CHANGES = SET_A.replace('sources: ["192.0.2.0/24"]', 'sources: ["198.51.100.0/24", "2001:db8:aa::/48"]') \
    .replace("dst_ports: [53]\n", "dst_ports: [443]\n")
# the source joins the deny list, then the allow list
DENIED = SET_A.replace('deny: ["203.0.113.0/24"]', 'deny: ["203.0.113.0/24", "198.51.100.0/24", "2001:db8:aa::/48"]')
ALLOWED = SET_A.replace('deny: ["203.0.113.0/24"]',
                        'deny: ["203.0.113.0/24"]\nallow: ["198.51.100.0/24", "2001:db8:aa::/48"]')


def _rules(kf) -> dict[str, tuple[int, int]]:
    return {n: (rc.pass_packets, rc.drop_packets) for n, rc in kf.counters().rules.items()}


def _moved(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    out = {}
    for n, (p, d) in after.items():
        p0, d0 = before.get(n, (0, 0))
        if (p - p0, d - d0) != (0, 0):
            out[n] = (p - p0, d - d0)
    return out


def _shadow(kf) -> dict[str, tuple[int, int]]:
    return {n: (sc.packets, sc.would_drop) for n, sc in kf.counters().shadow.items()}


def _one(kf, frame: bytes, reader=_rules) -> dict:
    before = reader(kf)
    kf.test_run(frame)
    return _moved(before, reader(kf))


def _warm(replay, text: str, frame: bytes, expect: dict) -> None:
    """Apply `text` (fresh state), send five packets; each must count as `expect`."""
    replay.apply(text)
    for _ in range(5):
        assert _one(replay.kf, frame) == expect


@pytest.mark.kernel
@pytest.mark.parametrize("src", [SRC, SRC6])
def test_the_next_packet_after_a_swap_is_judged_by_the_new_set(replay, src):
    kf = replay.kf
    probe = f.udp(src, 443)
    for new, expect in ((RULE_CHANGES, {"a-dns": (1, 0)}), (DENIED, {"deny-list": (0, 1)}),
                        (ALLOWED, {"allow-list": (1, 0)})):  # fmt: skip
        _warm(replay, SET_A, probe, {"quic": (1, 0)})
        replay.version += 1
        kf.apply(parse_rule_set(new, "<B>"), replay.version)  # no clear_sources: A's entries stay
        assert _one(kf, probe) == expect, new
        # and back: A judges again, not B's answer cached meanwhile
        for _ in range(3):
            kf.test_run(probe)
        replay.version += 1
        kf.apply(parse_rule_set(SET_A, "<A>"), replay.version)
        assert _one(kf, probe) == {"quic": (1, 0)}


@pytest.mark.kernel
def test_a_cached_answer_is_used_only_for_its_own_address(replay):
    """With ipv4_prefix 24 two sources of one /24 share a state entry (the
    key masks the address); the cache holds the full address, so the
    neighbour's own lists and rules still decide for it."""
    kf = replay.kf
    text = SET_A.replace('deny: ["203.0.113.0/24"]', f'deny: ["203.0.113.0/24", "{NEIGHBOUR}/32"]')
    _warm(replay, text, f.udp(SRC, 443), {"quic": (1, 0)})
    assert _one(kf, f.udp(NEIGHBOUR, 443)) == {"deny-list": (0, 1)}
    assert _one(kf, f.udp(SRC, 443)) == {"quic": (1, 0)}

    text = RULE_CHANGES.replace('sources: ["198.51.100.0/24", "2001:db8:aa::/48"]', f'sources: ["{NEIGHBOUR}/32"]')
    _warm(replay, text, f.udp(SRC, 443), {"quic": (1, 0)})
    assert _one(kf, f.udp(NEIGHBOUR, 443)) == {"a-dns": (1, 0)}
    assert _one(kf, f.udp(SRC, 443)) == {"quic": (1, 0)}


@pytest.mark.kernel
def test_a_cached_answer_serves_every_port_of_the_source(replay):
    """The answer is kept in the entry of the rule the port alone picks; a
    port where a source-restricted rule covering the source comes first
    must still reach that rule."""
    kf = replay.kf
    text = RULE_CHANGES.replace("dst_ports: [443]\n", "dst_ports: [53]\n")  # a-dns: udp/53 from 198.51.100/24
    _warm(replay, text, f.udp(SRC, 443), {"quic": (1, 0)})
    assert _one(kf, f.udp(SRC, 53)) == {"a-dns": (1, 0)}
    assert _one(kf, f.udp(SRC, 443)) == {"quic": (1, 0)}


@pytest.mark.kernel
@pytest.mark.parametrize("same_matching", [False, True])
def test_a_new_shadow_set_judges_the_next_packet_with_its_own_answer(replay, same_matching):
    """Cache warm under the active set A; a shadow set loaded next counts
    the very next packet by its own matching (or A's when it matches alike),
    then a promotion makes it judge for real at once."""
    kf = replay.kf
    probe = f.udp(SRC, 443)
    shadow = SET_A.replace("pps: 1000, burst: 1000", "pps: 500, burst: 500") if same_matching else DENIED
    expect = {"quic": (1, 0)} if same_matching else {"deny-list": (1, 1)}
    _warm(replay, SET_A, probe, {"quic": (1, 0)})
    replay.version += 1
    kf.load_shadow(parse_rule_set(shadow, "<S>"), replay.version)
    before_rules = _rules(kf)
    assert _one(kf, probe, _shadow) == expect
    assert _moved(before_rules, _rules(kf)) == {"quic": (1, 0)}, "the active set still decides"
    for _ in range(3):
        kf.test_run(probe)
    kf.promote_shadow()
    assert _one(kf, probe) == ({"quic": (1, 0)} if same_matching else {"deny-list": (0, 1)})
    kf.clear_shadow()
