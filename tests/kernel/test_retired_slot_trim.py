"""A retired slot is trimmed after the swap, and nothing else changes.

After an apply swaps, the slot it retired (holding TRIM_MIN entries or
more) loses, on a thread of its own, the trie entries the new active set
does not have (kernel/filter.py _trim_later, slots.trim_slot): the next
apply of a new set then writes without deleting first, the same set again
writes nothing. The slot is not selected and a grace period has passed, so
no packet sees it; rollback (an apply of the earlier version) still gives
back exactly the earlier set in one step; and a slot rewritten or selected
again before its trim ran is left alone. TRIM_MIN is lowered here so a few
hundred entries are enough."""

from __future__ import annotations

import os

import pytest

from tidegate.kernel import filter as kfilter
from tidegate.kernel import slots
from tidegate.kernel.entries import build_kernel_rule_set, kernel_trie_entries
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f
from .conftest import background_traffic

XDP_DROP, XDP_PASS = 1, 2


def _nets(first: int, n: int) -> str:
    return ", ".join(f'"100.{64 + i // 256}.{i % 256}.0/24"' for i in range(first, first + n))


SHARED = _nets(0, 300)
RULES = "defaults:\n  limit: {pps: 1000000, burst: 1000000}\nrules: []\n"
# A denies the probe's network, B and C do not; each has 400 networks of its own and 300 in common
TEXTS = {
    "A": f'allow: [{SHARED}, {_nets(1000, 400)}]\ndeny: ["198.51.100.0/24"]\n{RULES}',
    "B": f"allow: [{SHARED}, {_nets(2000, 400)}]\n{RULES}",
    "C": f'allow: [{SHARED}, {_nets(3000, 400)}]\ndeny: ["203.0.113.0/24"]\n{RULES}',
}
PROBE = f.udp("198.51.100.7", 53)


@pytest.fixture
def sets():
    return {n: parse_rule_set(t, n) for n, t in TEXTS.items()}


@pytest.fixture(scope="module")
def own_kf():
    """A filter of this module's own: the sets it leaves in the slots are not the next module's."""
    kf = KernelFilter(FilterConfig(interface=None, pin_name=f"test-trim-{os.getpid()}", replay_clock=True,
                                   max_sources=4096))  # fmt: skip
    kf.load()
    yield kf
    kf.close()
    kf.remove_pins()


@pytest.fixture
def kf(own_kf, monkeypatch):
    monkeypatch.setattr(kfilter, "TRIM_MIN", 100)
    return own_kf


def _held(kf) -> dict[int, dict]:
    """slot -> {raw trie key: raw value} of both tries, read from the kernel."""
    return {s: {**e.cidrs[4], **e.cidrs[6]} for s, e in slots.index_slots(kf._tables, kf.config.max_cidrs).items()}


def _entries(rs, slot: int) -> dict:
    v4, v6 = kernel_trie_entries(build_kernel_rule_set(rs), slot)
    return {**v4, **v6}


def _both(a, b, slot: int) -> dict:
    """What a slot holding `a` keeps once trimmed against the active `b`."""
    ea, eb = _entries(a, slot), _entries(b, slot)
    return {k: v for k, v in ea.items() if k in eb}


@pytest.mark.kernel
def test_the_retired_slot_keeps_only_what_the_active_set_has_and_rollback_restores_it(kf, sets):
    kf.apply(sets["A"], 1)
    a_slot = kf.state().active.slot
    assert kf.test_run(PROBE)[0] == XDP_DROP
    kf.apply(sets["B"], 2)
    b_slot = kf.state().active.slot
    assert kf.test_run(PROBE)[0] == XDP_PASS
    kf.settle()
    held = _held(kf)
    assert held[b_slot] == _entries(sets["B"], b_slot)
    assert held[a_slot] == _both(sets["A"], sets["B"], a_slot) and len(held[a_slot]) == 300, "trimmed to A and B"
    assert kf._slot_entries[a_slot].cidrs[4] == held[a_slot], "the filter knows what the slot holds"
    # rollback to A: one apply of it, into a free slot (the trimmed one or the empty one)
    kf.apply(sets["A"], 1)
    assert kf.test_run(PROBE)[0] == XDP_DROP and kf.state().active.version == 1
    kf.settle()
    held = _held(kf)
    now = kf.state().active.slot
    assert held[now] == _entries(sets["A"], now), "the rolled-back slot holds all of A again"
    assert held[b_slot] == _both(sets["B"], sets["A"], b_slot), "and B's slot is trimmed in turn"
    # the same set again writes nothing new, keeps everything, and retires a slot with nothing to trim
    kf.apply(sets["A"], 3)
    started = list(kf._trimmers)
    kf.apply(parse_rule_set(TEXTS["A"], "A again"), 4)
    assert kf._trimmers == started, "a slot holding the active set is not trimmed"
    kf.settle()
    held = _held(kf)
    assert held[kf.state().active.slot] == _entries(sets["A"], kf.state().active.slot)


@pytest.mark.kernel
def test_a_slot_rewritten_before_its_trim_ran_is_left_alone(kf, sets):
    kf.apply(sets["A"], 1)
    a_slot = kf.state().active.slot
    kf.settle()
    with kf._writing:  # the trims started below wait for the write lock: the slots change under them first
        kf.apply(sets["B"], 2)  # retires A's slot: its trim is started
        b_slot = kf.state().active.slot
        kf.apply(sets["C"], 3)  # rewrites A's slot (the lowest free one) and selects it
        assert kf.state().active.slot == a_slot
        assert len([t for t in kf._trimmers if t.is_alive()]) == 2
    kf.settle()
    held = _held(kf)
    assert held[a_slot] == _entries(sets["C"], a_slot), "the active slot holds all of C"
    assert held[b_slot] == _both(sets["B"], sets["C"], b_slot), "B's slot, retired by C, is trimmed against C"


@pytest.mark.kernel
def test_trims_never_touch_what_packets_read(kf, sets):
    """Swaps with a trim after each, under traffic: the probe is only ever
    judged by A (dropped by its deny list) or by B or C (passed by the
    default rule), never by a slot part-trimmed; at the end every slot the
    swaps used holds its set, or its set trimmed against the active one."""
    kf.apply(sets["A"], 1)
    used = {kf.state().active.slot}
    before = kf.counters().reasons
    order = "BCA"
    with background_traffic(kf, PROBE, 200) as runs:
        for i in range(60):
            kf.apply(sets[order[i % 3]], i + 2)
            used.add(kf.state().active.slot)
    kf.settle()
    after = kf.counters().reasons
    delta = {k: after[k][0] - before[k][0] for k in after}
    sent = sum(runs)
    assert delta["deny"] + delta["pass"] == sent and delta["deny"] > 0 and delta["pass"] > 0, (delta, sent)
    held = _held(kf)
    active = kf.state().active.slot
    last = order[59 % 3]
    assert held[active] == _entries(sets[last], active)
    for s in used - {active}:
        assert any(held[s] == _both(sets[n], sets[last], s) for n in "ABC"), f"slot {s}"


@pytest.mark.kernel
def test_a_slot_holding_this_very_rule_set_is_not_worked_out_again(kf, sets, monkeypatch):
    """The same rule set object (the change service gives it again for the
    same text) written into a slot that holds its entries untrimmed: its
    trie entries are not built again, and the slot holds exactly them."""
    built = []
    entries = slots.slot_trie_entries

    def counting(krs, slot):
        built.append(slot)
        return entries(krs, slot)

    monkeypatch.setattr(slots, "slot_trie_entries", counting)
    for v in (20, 21, 22, 23):
        kf.apply(sets["C"], v)
    kf.settle()
    assert len(built) == 2, built  # the first write into each of the two slots the applies alternate on
    held = _held(kf)
    for s in set(built):
        assert held[s] == _entries(sets["C"], s)
