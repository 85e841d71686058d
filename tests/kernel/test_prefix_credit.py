"""Prefix credit (bpf/prefix.h): a source whose prefix bucket is far from its
limit sends packets on tokens it took from the bucket in advance, without
looking the prefix up, for up to two credit windows (now >> CREDIT_SHIFT).
The prefix still never passes more than its bucket gives (it refills only to
its burst less the credit its sources hold), the credit a source leaves
unused goes back to the bucket, and the packets sent on credit reach the
prefix's counters at the source's next prefix visit.

The replay clock stands still in these tests unless a test moves it (the
first tests' prefix rate is 1 pps), so the bucket's burst is exactly what
may pass."""

from __future__ import annotations

import pytest

from tidegate.kernel.layout import CREDIT_SHIFT, KIND_PREFIX

from . import frames as f

BURST = 1000
RULES = f"""
defaults:
  limit: {{pps: 100000, burst: 100000}}
  prefix_limit: {{ipv4_prefix: 24, ipv6_prefix: 48, pps: 1, burst: {BURST}}}
"""
A, B = f.udp("198.51.100.7", 53), f.udp("198.51.100.8", 53)
WINDOW_MS = (1 << CREDIT_SHIFT) / 1e6
EXPIRED_MS = 2 * WINDOW_MS + 1  # later than any credit lent now is good for


def _window_start_ms(replay) -> float:
    """The replay time (ms, as replay.at takes it) where the next credit window starts."""
    base = replay.at(0).now
    return (((base >> CREDIT_SHIFT) + 1) << CREDIT_SHIFT) / 1e6 - base / 1e6


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
    """Credit is good until the window after the one it was lent in ends; the
    source's next packet after that visits the prefix and returns what was
    left."""
    replay.apply(RULES)
    replay.at(0)
    assert _send(replay, A, 10) == {"pass": 10}  # A now holds credit it does not use
    assert _prefix_packets(replay.kf) < 10
    b = _send(replay, B, BURST)
    assert b["pass"] < BURST - 10, "A's credit is not B's to use"
    replay.at(EXPIRED_MS)  # about half a token refilled: A's credit has expired
    assert _send(replay, A, 1) == {"pass": 1}
    b2 = _send(replay, B, 100)
    assert 10 + b["pass"] + 1 + b2["pass"] == BURST, (b, b2)
    # every packet reached the prefix's counters, A's on credit at its next visit
    assert _prefix_packets(replay.kf) == 10 + BURST + 1 + 100


@pytest.mark.kernel
def test_credit_outlives_the_clock_tick_a_source_comes_back_within(replay):
    """A source back 50 ms later (a round robin over many sources) still
    sends on the credit it took, without a prefix visit."""
    replay.apply(RULES)
    start = _window_start_ms(replay)
    replay.at(start)
    assert _send(replay, A, 2) == {"pass": 2}  # the second packet takes credit
    seen = _prefix_packets(replay.kf)
    replay.at(start + 50)
    assert _send(replay, A, 20) == {"pass": 20}
    assert _prefix_packets(replay.kf) == seen, "all 20 went on credit"


@pytest.mark.kernel
def test_a_source_seen_once_in_a_while_takes_no_credit(replay):
    """Credit goes only to a source back at its prefix within the credit
    windows: one packet now and one two windows later leave nothing lent,
    so the next source gets the rest of the burst to the packet."""
    replay.apply(RULES)
    replay.at(0)
    assert _send(replay, A, 1) == {"pass": 1}
    replay.at(EXPIRED_MS)
    assert _send(replay, A, 1) == {"pass": 1}
    assert _send(replay, B, BURST) == {"pass": BURST - 2, "prefix": 2}


@pytest.mark.kernel
def test_a_steady_source_back_after_a_pause_borrows_at_its_first_visit(replay):
    """A source that sent packets on its last loan and comes back after the
    loan expired borrows again at its first prefix visit: one lookup after
    the pause, not two. One that left its last loan unused does not (as
    for a source seen once in a while)."""
    replay.apply(RULES)
    start = _window_start_ms(replay)
    replay.at(start)
    assert _send(replay, A, 20) == {"pass": 20}  # A borrows at its second packet, sends the rest on credit
    replay.at(start + EXPIRED_MS)  # the loan expired, partly used
    assert _send(replay, A, 1) == {"pass": 1}  # the visit: the loan settles, A borrows again
    seen = _prefix_packets(replay.kf)
    assert seen == 21, "the packets A sent on its last loan reached the prefix at this visit"
    assert _send(replay, A, 20) == {"pass": 20}
    assert _prefix_packets(replay.kf) == seen, "all 20 went on the credit A borrowed at its first visit"
    # B borrows and leaves its loan unused: after the pause its first visit lends nothing
    assert _send(replay, B, 2) == {"pass": 2}
    replay.at(start + 2 * EXPIRED_MS)
    assert _send(replay, B, 1) == {"pass": 1}
    seen = _prefix_packets(replay.kf)
    assert _send(replay, B, 1) == {"pass": 1}
    assert _prefix_packets(replay.kf) == seen + 1, "B's next packet visits the prefix again"


FAST = """
defaults:
  limit: {pps: 100000, burst: 100000}
  prefix_limit: {ipv4_prefix: 24, ipv6_prefix: 48, pps: 4000, burst: 1000}
"""
MANY = [f.udp(f"198.51.100.{i}", 53) for i in range(1, 201)]


@pytest.mark.kernel
def test_credit_held_by_many_sources_never_lets_the_prefix_pass_more_than_its_burst(replay):
    """200 sources of one /24 take credit, the prefix (4000 pps, burst 1000)
    refills for longer than it takes to fill, then every source sends at one
    instant. The prefix passes at most its burst at that instant, credit
    included (its bucket refilled only to the burst less the credit its
    sources held), and no less than its burst less the packets already sent
    on credit before."""
    replay.apply(FAST)
    start = _window_start_ms(replay)
    replay.at(start)
    for frame in MANY:
        assert _send(replay, frame, 2) == {"pass": 2}
    seen = _prefix_packets(replay.kf)
    replay.at(start + WINDOW_MS / 2)
    for frame in MANY:
        assert _send(replay, frame, 1) == {"pass": 1}
    on_credit = 200 - (_prefix_packets(replay.kf) - seen)
    assert on_credit > 10, "sources sent on credit"
    replay.at(start + 1.9 * WINDOW_MS)  # the bucket refilled to its cap
    # two rounds: the second uses up what the first left on credit
    passed = sum(_send(replay, frame, 100).get("pass", 0) for _ in range(2) for frame in MANY)
    assert BURST - on_credit <= passed <= BURST, (passed, on_credit)
