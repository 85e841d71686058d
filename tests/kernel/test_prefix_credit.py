"""Prefix credit (bpf/rules.h): a source whose prefix bucket is far from its
limit sends packets on tokens it took from the bucket in advance, without
looking the prefix up. The prefix still never passes more than its bucket
holds, the credit a source leaves unused goes back to the bucket, and the
packets sent on credit reach the prefix's counters at the source's next
prefix visit.

The replay clock stands still in these tests (no refill: the prefix's rate
is 1 pps), so the bucket's burst is exactly what may pass."""

from __future__ import annotations

import pytest

from tidegate.kernel.layout import KIND_PREFIX

from . import frames as f

BURST = 1000
RULES = f"""
defaults:
  limit: {{pps: 100000, burst: 100000}}
  prefix_limit: {{ipv4_prefix: 24, ipv6_prefix: 48, pps: 1, burst: {BURST}}}
"""
A, B = f.udp("198.51.100.7", 53), f.udp("198.51.100.8", 53)


def _send(replay, frame: bytes, n: int) -> dict[str, int]:
    before = replay.reasons()
    replay.kf.test_run(frame, repeat=n)
    after = replay.reasons()
    return {r: after[r] - before[r] for r in after if after[r] != before[r]}


def _prefix_packets(kf) -> int:
    t = kf.read_sources()
    return int(sum(int(t.packets[i]) for i in range(t.count) if int(t.kind[i]) == KIND_PREFIX))


@pytest.mark.kernel
def test_one_source_gets_exactly_the_prefix_burst(replay):
    replay.apply(RULES)
    assert _send(replay, A, 300) == {"pass": 300}
    # some of those went on credit: the prefix has not counted them yet
    assert _prefix_packets(replay.kf) < 300
    assert _send(replay, A, BURST) == {"pass": BURST - 300, "prefix": 300}
    # near the limit nothing is lent: every packet visited the prefix, which settled the credit
    assert _prefix_packets(replay.kf) == BURST + 300


@pytest.mark.kernel
def test_credit_left_unused_expires_and_goes_back_to_the_prefix(replay):
    """Credit is good for about one tick of the coarse clock; the source's
    next packet after that visits the prefix and returns what was left."""
    replay.apply(RULES)
    replay.at(0)
    assert _send(replay, A, 10) == {"pass": 10}  # A now holds credit it does not use
    assert _prefix_packets(replay.kf) < 10
    b = _send(replay, B, BURST)
    assert b["pass"] < BURST - 10, "A's credit is not B's to use"
    replay.at(5)  # 5 ms later (5/1000 of a token refilled): A's credit has expired
    assert _send(replay, A, 1) == {"pass": 1}
    b2 = _send(replay, B, 100)
    assert 10 + b["pass"] + 1 + b2["pass"] == BURST, (b, b2)
    # every packet reached the prefix's counters, A's on credit at its next visit
    assert _prefix_packets(replay.kf) == 10 + BURST + 1 + 100


@pytest.mark.kernel
def test_a_source_seen_once_in_a_while_takes_no_credit(replay):
    """Credit goes only to a source back at its prefix within the credit
    time: one packet now and one 5 ms later leave nothing lent, so the
    next source gets the rest of the burst to the packet."""
    replay.apply(RULES)
    replay.at(0)
    assert _send(replay, A, 1) == {"pass": 1}
    replay.at(5)
    assert _send(replay, A, 1) == {"pass": 1}
    assert _send(replay, B, BURST) == {"pass": BURST - 2, "prefix": 2}
