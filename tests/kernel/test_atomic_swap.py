"""Whole rule sets swap atomically: a packet sees the old set or the new one.

Two rule sets give one probe packet two different reasons: set A passes it
on the allow list (reason allow), set B drops it with a drop rule (reason
deny). Any packet that saw a mix of the two (A's config with B's trie, a
half-written slot, B's rule mask with A's rules) ends up on the default
rule of one set or the other and is counted as pass or rate instead. One
thread swaps A and B thousands of times while another pushes the probe
through the program; afterwards only allow and deny may have moved."""

from __future__ import annotations

import time

import pytest

from tidegate.ruleset import parse_rule_set

from . import frames as f
from .conftest import background_traffic

SET_A = """
defaults:
  limit: {pps: 1, burst: 1}
allow: ["198.51.100.0/24"]
deny: ["203.0.113.0/24"]
rules:
  - name: a-only
    protocol: tcp
    dst_ports: [22]
    limit: {pps: 1, burst: 1}
"""

SET_B = """
defaults:
  limit: {pps: 1, burst: 1}
rules:
  - name: b-drop
    protocol: udp
    dst_ports: [53]
    sources: ["198.51.0.0/16"]
    action: drop
"""

SWAPS = 2000


@pytest.mark.kernel
def test_swap_is_atomic_under_load(replay_kf):
    kf = replay_kf
    a = parse_rule_set(SET_A, "A")
    b = parse_rule_set(SET_B, "B")
    kf.apply(a, 1)
    probe = f.udp("198.51.100.7", 53)
    before = {k: v[0] for k, v in kf.counters().reasons.items()}
    started = time.monotonic()
    with background_traffic(kf, probe, 500) as runs:
        for i in range(SWAPS):
            if i % 2 == 0:
                kf.apply(b, 2)
            else:
                kf.apply(a, 1)
            if i % 50 == 0:
                # on a loaded 2-CPU host the traffic thread can be starved
                # for a whole run of swaps: give it the CPU now and then
                time.sleep(0.002)
    elapsed = time.monotonic() - started
    after = {k: v[0] for k, v in kf.counters().reasons.items()}
    delta = {k: after[k] - before[k] for k in after}
    sent = sum(runs)
    assert delta["allow"] + delta["deny"] == sent, delta
    assert delta["pass"] == delta["rate"] == delta["blocked"] == delta["prefix"] == 0, delta
    # the test only proves something if both sets really carried traffic
    assert delta["allow"] > 0 and delta["deny"] > 0, delta
    assert len(runs) > 10, f"only {len(runs)} traffic batches in {elapsed:.1f}s"
