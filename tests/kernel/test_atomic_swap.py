"""Whole rule sets swap atomically: a packet sees the old set or the new one.

Three rule sets give one probe packet three outcomes of their own: A passes
it on the allow list (reason allow, rule allow-list), B drops it with a drop
rule chosen by source and port (reason deny, rule b-drop), C drops it on its
deny list (reason deny, rule deny-list). Any packet that saw a mix (one
set's config with another's trie or ports, a half-written slot) ends up on
a default rule, whose limit of 1 pps counts it as pass or rate instead.
The sets rotate A, B, C, A, ... over the two slots an apply alternates
between, so every slot write replaces the set it held with a different one:
a write into a slot a packet can still read would show. One thread swaps
thousands of times while another pushes the probe through the program;
afterwards only allow and deny may have moved, and each set carried traffic.

The grace period that makes a retired slot safe to rewrite cannot be seen
from a packet (a program run is far shorter than the next write takes to
start), so it is checked as the protocol it is: every write into a slot
comes after a grace period that began after that slot was last selected
(grace periods run on a thread of their own: kernel/grace.py)."""

from __future__ import annotations

import time

import pytest

from fixtures import rule_set
from tidegate.kernel import slots
from tidegate.kernel.layout import NO_SLOT
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f
from .conftest import background_traffic

SET_A = rule_set("swap-a")

SET_B = rule_set("swap-b")

SET_C = rule_set("swap-c")

PROBE = f.udp("198.51.100.7", 53)
# the rule each set counts the probe under
OWN_RULE = {"A": ("allow-list", "pass_packets"), "B": ("b-drop", "drop_packets"), "C": ("deny-list", "drop_packets")}
SWAPS = 2001


def _rules(kf) -> dict:
    return {n: (rc.pass_packets, rc.drop_packets) for n, rc in kf.counters().rules.items()}


@pytest.mark.kernel
def test_swap_is_atomic_under_load(replay_kf):
    kf = replay_kf
    sets = {n: parse_rule_set(t, n) for n, t in (("A", SET_A), ("B", SET_B), ("C", SET_C))}
    order = ["A", "B", "C"]
    kf.apply(sets["A"], 1)
    held = {kf.state().active.slot: "A"}  # slot -> the set it holds
    before = {k: v[0] for k, v in kf.counters().reasons.items()}
    rules0 = _rules(kf)
    rewrites = 0
    started = time.monotonic()
    with background_traffic(kf, PROBE, 500) as runs:
        for i in range(1, SWAPS):
            name = order[i % 3]
            kf.apply(sets[name], i + 1)
            slot = kf.state().active.slot
            if slot in held:
                assert held[slot] != name, f"swap {i}: slot {slot} rewritten with the set it held"
                rewrites += 1
            held[slot] = name
            if i % 50 == 0:
                # on a loaded 2-CPU host the traffic thread can be starved
                # for a whole run of swaps: give it the CPU now and then
                time.sleep(0.002)
    elapsed = time.monotonic() - started
    after = {k: v[0] for k, v in kf.counters().reasons.items()}
    rules1 = _rules(kf)
    delta = {k: after[k] - before[k] for k in after}
    sent = sum(runs)
    assert rewrites >= SWAPS - 3, "every write but the first ones replaced another set"
    assert delta["allow"] + delta["deny"] == sent, delta
    assert delta["pass"] == delta["rate"] == delta["blocked"] == delta["prefix"] == 0, delta
    # the test only proves something if every set really carried traffic
    moved = {}
    for name, (rule, col) in OWN_RULE.items():
        i = 0 if col == "pass_packets" else 1
        moved[name] = rules1.get(rule, (0, 0))[i] - rules0.get(rule, (0, 0))[i]
    assert all(v > 0 for v in moved.values()), moved
    assert sum(moved.values()) == sent, (moved, sent)
    assert len(runs) > 10, f"only {len(runs)} traffic batches in {elapsed:.1f}s"


@pytest.mark.kernel
def test_a_retired_slot_is_rewritten_only_after_a_grace_period(replay_kf, monkeypatch):
    """Record every selector flip, grace period and slot write of applies,
    shadow loads, promotions and clears; a slot may only be written when no
    selection since the last grace period named it. Grace periods run on a
    thread of their own (kernel/grace.py) and are made slow here (30 ms
    more each), so a write that did not wait for one would come first. A
    grace period covers the flips recorded before it started."""
    kf = replay_kf
    kf._grace.wait()  # the flips made before this test: passed
    events: list[tuple] = []
    flips = [set(kf._sel()) - {NO_SLOT}]  # the selection now, then each flip's
    ctl, waiter = kf._tables["tg_ctl"], kf._grace._waiter
    write_slot, harvest_slot = slots.write_slot, slots.harvest_slot

    class SlowGrace:
        def wait(self):
            started = len(flips)
            time.sleep(0.03)
            waiter.wait()
            events.append(("grace", started))

    class Selector:
        """tg_ctl, recording the moment the selector word is written."""

        def __getattr__(self, name):
            return getattr(ctl, name)

        def __getitem__(self, key):
            return ctl[key]

        def __setitem__(self, key, leaf):
            time.sleep(0.005)  # a grace period begun before the write (too early) would start meanwhile
            ctl[key] = leaf
            flips.append({leaf.sel & 0xFF, (leaf.sel >> 8) & 0xFF} - {NO_SLOT})
            events.append(("flip", len(flips) - 1))

    def write(tables, slot, *a):
        events.append(("write", slot))
        write_slot(tables, slot, *a)

    def harvest(tables, slot, *a):
        events.append(("harvest", slot))
        harvest_slot(tables, slot, *a)

    monkeypatch.setattr(kf._grace, "_waiter", SlowGrace())
    monkeypatch.setitem(kf._tables, "tg_ctl", Selector())
    monkeypatch.setattr(slots, "write_slot", write)
    monkeypatch.setattr(slots, "harvest_slot", harvest)
    a, b, c = (parse_rule_set(t, n) for n, t in (("A", SET_A), ("B", SET_B), ("C", SET_C)))
    kf.apply(a, 1)
    for v in range(2, 8):
        kf.apply((a, b, c)[v % 3], v)
    kf.load_shadow(b, 8)
    kf.load_shadow(c, 9)
    kf.apply(a, 10)
    kf.promote_shadow(11)
    kf.load_shadow(a, 12)
    kf.clear_shadow()
    kf.apply(b, 13)
    kf._grace.wait()
    monkeypatch.undo()

    # a grace period that started after flip k-1 leaves no packet reading a selection older than flip k-1's
    newest = 0  # the oldest selection a packet may still be reading
    now = 0  # the last flip so far
    writes = 0
    for ev in events:
        if ev[0] == "flip":
            now = ev[1]
        elif ev[0] == "grace":
            newest = max(newest, ev[1] - 1)
        else:
            writes += ev[0] == "write"
            unsafe = set().union(*flips[newest:now + 1])  # slots a selection still read may name
            assert ev[1] not in unsafe, f"slot {ev[1]} written while a packet may still read it: {events}"
    assert writes == 12 and len(flips) >= 16 and sum(e[0] == "grace" for e in events) >= 5, events
