"""A slot rewrite touches only the trie entries that change, and packets
still see a whole rule set.

An apply writes the free slot, which holds the set of two applies ago:
entries the new set has with the same value stay as they are, the others
are deleted or written (kernel/slots.py). Here the three swap sets
(test_atomic_swap.py: each gives the probe an outcome of its own, a mix
gives it the default rule's) share a bulk of 1,500 allow-list networks
that do not cover the probe, so every rewrite changes a handful of entries
among 1,500 (one of them keeps its key and changes its value) and
leaves the rest in place. One thread swaps while another
pushes the probe through the program: only allow and deny may move, every
set carries traffic, and the writes really were partial. Afterwards every
slot holds exactly the entries of the set it was last given, read back
from the kernel, also after a new filter adopted the pinned maps and
rewrote a slot from what it learnt there."""

from __future__ import annotations

import os

import pytest

from fixtures import rule_set
from tidegate.kernel import bpfsys, slots
from tidegate.kernel.entries import build_kernel_rule_set, kernel_trie_entries
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f
from .conftest import background_traffic

BULK = ", ".join(f'"100.{64 + i // 256}.{i % 256}.0/24"' for i in range(1500))  # not the probe's
TEXTS = {
    "A": rule_set("swap-a").replace('allow: ["198.51.100.0/24"]', f'allow: ["198.51.100.0/24", {BULK}]'),
    "B": f"allow: [{BULK}]\n" + rule_set("swap-b"),
    # and one shared network with another value: a source of C's tcp rule (the probe is udp)
    "C": f"allow: [{BULK}]\n"
    + rule_set("swap-c").replace("dst_ports: [443]", 'dst_ports: [443]\n    sources: ["100.64.0.0/24"]'),
}
PROBE = f.udp("198.51.100.7", 53)
OWN_RULE = {"A": ("allow-list", 0), "B": ("b-drop", 1), "C": ("deny-list", 1)}  # rule, (pass, drop) column
SWAPS = 601


def _rules(kf) -> dict:
    return {n: (rc.pass_packets, rc.drop_packets) for n, rc in kf.counters().rules.items()}


def _held(kf, max_cidrs: int) -> dict[int, dict]:
    """slot -> {raw trie key: raw value} of both tries, read from the kernel."""
    return {s: {**e.cidrs[4], **e.cidrs[6]} for s, e in slots.index_slots(kf._tables, max_cidrs).items()}


def _expected(rs, slot: int) -> dict:
    v4, v6 = kernel_trie_entries(build_kernel_rule_set(rs), slot)
    return {**v4, **v6}


@pytest.mark.kernel
def test_partial_rewrites_are_atomic_under_load(replay_kf, monkeypatch):
    kf = replay_kf
    sets = {n: parse_rule_set(t, n) for n, t in TEXTS.items()}
    order = ["A", "B", "C"]
    # each slot holds one of the three sets before the count starts: the filter is the session's, and an
    # earlier test may have left any set in any slot (its first rewrite is not a swap between these)
    for v, name in enumerate(order, start=1):
        kf.apply(sets[name], v)
    written: list[int] = []  # trie entries written or deleted by each batch
    update, delete = bpfsys.update_batch, bpfsys.delete_batch

    def counting_update(fd, keys, values, count, *a, **kw):
        written.append(count)
        return update(fd, keys, values, count, *a, **kw)

    def counting_delete(fd, keys, count, *a, **kw):
        written.append(count)
        return delete(fd, keys, count, *a, **kw)

    monkeypatch.setattr(bpfsys, "update_batch", counting_update)
    monkeypatch.setattr(bpfsys, "delete_batch", counting_delete)
    before = {k: v[0] for k, v in kf.counters().reasons.items()}
    rules0 = _rules(kf)
    with background_traffic(kf, PROBE, 500) as runs:
        for i in range(1, SWAPS):
            kf.apply(sets[order[i % 3]], i + 3)
    monkeypatch.undo()
    after = {k: v[0] for k, v in kf.counters().reasons.items()}
    rules1 = _rules(kf)
    delta = {k: after[k] - before[k] for k in after}
    sent = sum(runs)
    assert delta["allow"] + delta["deny"] == sent, delta
    assert delta["pass"] == delta["rate"] == delta["blocked"] == delta["prefix"] == 0, delta
    moved = {name: rules1.get(rule, (0, 0))[i] - rules0.get(rule, (0, 0))[i] for name, (rule, i) in OWN_RULE.items()}
    assert all(v > 0 for v in moved.values()) and sum(moved.values()) == sent, (moved, sent)
    assert len(runs) > 10, f"only {len(runs)} traffic batches"
    # the rewrites were partial: the 1,500 shared entries, written into every slot before, never again
    bulk_writes = sum(1 for n in written if n >= 1500)
    assert bulk_writes == 0, f"{bulk_writes} writes of the whole bulk: {written[:20]}"
    assert 0 < max(n for n in written if n < 1500) <= 4, written[:20]


@pytest.mark.kernel
def test_a_partially_rewritten_slot_holds_exactly_its_set():
    pin = f"test-partial-slots-{os.getpid()}"
    cfg = FilterConfig(interface=None, pin_name=pin, replay_clock=True, max_sources=4096)
    sets = {n: parse_rule_set(t, n) for n, t in TEXTS.items()}
    first = KernelFilter(cfg)
    first.load()
    try:
        holds = {}
        for v, name in enumerate("ABCAB", start=1):
            first.apply(sets[name], v)
            holds[first.state().active.slot] = name
        kernel = _held(first, cfg.max_cidrs)
        for slot, name in holds.items():
            assert kernel[slot] == _expected(sets[name], slot), f"slot {slot} ({name})"
        first.close()
        # a new filter learns each slot's entries and values from the kernel, then rewrites one partially
        second = KernelFilter(cfg)
        second.load()
        try:
            second.apply(sets["C"], 6)
            holds[second.state().active.slot] = "C"
            kernel = _held(second, cfg.max_cidrs)
            for slot, name in holds.items():
                assert kernel[slot] == _expected(sets[name], slot), f"slot {slot} ({name}) after adoption"
        finally:
            second.close()
    finally:
        first.close()
        KernelFilter(cfg).remove_pins()
