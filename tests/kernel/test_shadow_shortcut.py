"""A shadow set that matches like the active one reuses its classification
(bpf/layout.h same_match_as). It must count exactly what a shadow set that
classifies on its own counts, and never borrow the classification of a set
it does not match like, even while the active set is swapped under it."""

from __future__ import annotations

import pytest

from fixtures import rule_set
from tidegate.kernel.layout import NO_SLOT
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f
from .conftest import background_traffic

ACTIVE = rule_set("shadow-active")
# the usual candidate: the same matching, ten times tighter
TIGHT = ACTIVE.replace("pps: 100, burst: 100", "pps: 10, burst: 10")
# the same limits, plus a deny entry no test packet comes from: it matches
# differently, so it must classify on its own
TIGHT_OWN = TIGHT.replace('deny: ["192.0.2.0/24"]', 'deny: ["192.0.2.0/24", "203.0.113.250/32"]')

TRAFFIC = [
    *[f.udp("203.0.113.1", 53)] * 30,
    *[f.tcp("198.51.100.9", 443)] * 30,
    *[f.tcp("203.0.113.2", 443)] * 30,  # web's sources do not cover it: default
    *[f.udp("10.1.2.3", 53)] * 5,
    *[f.udp("192.0.2.7", 53)] * 5,
    *[f.udp("2001:db8::1", 53)] * 20,
]


def _shadow_counts(replay, shadow_text: str, traffic: list = TRAFFIC) -> dict:
    replay.apply(ACTIVE)
    kf = replay.kf
    replay.version += 1
    kf.load_shadow(parse_rule_set(shadow_text, "<shadow>"), replay.version)
    before = kf.counters().shadow
    for frame in traffic:
        kf.test_run(frame)
    after = kf.counters().shadow
    out = {}
    for name, sc in after.items():
        b = before.get(name)
        out[name] = (sc.packets - (b.packets if b else 0), sc.would_drop - (b.would_drop if b else 0),
                     sc.would_drop_new - (b.would_drop_new if b else 0))  # fmt: skip
    return {k: v for k, v in out.items() if any(v)}


def _same_match_as(kf) -> int:
    st = kf.state()
    sets = kf._tables["tg_sets"]
    return int(sets[sets.Key(st.shadow.slot)].same_match_as), st.active.slot


# candidates that match like the active set but keep entries of their own
# (the active entries cannot hold their state): they take the active match
# and run their limits on their own entries, as a candidate that classifies
# on its own does. The traffic has a second dns source in 203.0.113.1's /24,
# which a per-/24 key puts in one bucket with .1; the byte burst binds
# before the packet burst.
KEYED_OTHERWISE = ("defaults:\n", "defaults:\n  ipv4_prefix: 24\n")
BYTE_LIMIT = ("limit: {pps: 10, burst: 10}\n  - name: web", "limit: {pps: 10, burst: 10, bps: 8, burst_bytes: 300}\n  - name: web")
SAME_24 = [f.udp("203.0.113.9", 53)] * 30


@pytest.mark.kernel
@pytest.mark.parametrize("edit, dns", [(None, (80, 50, 50)), (KEYED_OTHERWISE, (80, 60, 60)), (BYTE_LIMIT, None)],
                         ids=["in-the-active-entries", "keyed-otherwise", "byte-limit"])  # fmt: skip
def test_shortcut_counts_what_a_full_evaluation_counts(replay, edit, dns):
    tight, tight_own = TIGHT, TIGHT_OWN
    if edit:
        assert tight.count(edit[0]) == 1, edit
        tight, tight_own = tight.replace(*edit), tight_own.replace(*edit)
    shortcut = _shadow_counts(replay, tight, TRAFFIC + SAME_24)
    linked, active = _same_match_as(replay.kf)
    assert linked == active, "a candidate that only changes limits reuses the active classification"
    replay.kf.clear_shadow()
    own = _shadow_counts(replay, tight_own, TRAFFIC + SAME_24)
    linked, _ = _same_match_as(replay.kf)
    assert linked == NO_SLOT
    replay.kf.clear_shadow()
    assert shortcut == own
    if dns:  # each source's first 10 pass; keyed by /24, the two IPv4 sources share their 10
        assert shortcut["dns"] == dns
    else:  # 300 bytes hold 5 of the 60-byte IPv4 frames, 4 of the 72-byte IPv6 ones: 25 + 25 + 16 would-drops
        assert shortcut["dns"] == (80, 66, 66)
    assert shortcut["web"] == (30, 20, 20)
    assert shortcut["allow-list"][0] == 5 and shortcut["deny-list"] == (5, 5, 0)


SWAP_B = rule_set("shadow-swap-b")
# a third active set, matching unlike both: the probe lands on its deny list
SWAP_C = rule_set("shadow-swap-c")


@pytest.mark.kernel
def test_shortcut_never_borrows_another_sets_classification(replay):
    """Shadow = ACTIVE's matching. While the active set rotates ACTIVE, B, C
    (B classifies the probe as its drop rule, C as its deny list; the
    rotation over the two free slots makes every write replace the set a
    slot held with another), the shadow must count the probe on its own
    allow list every time, never on B's rule or C's list."""
    kf = replay.kf
    sets = [parse_rule_set(ACTIVE, "A"), parse_rule_set(SWAP_B, "B"), parse_rule_set(SWAP_C, "C")]
    kf.apply(sets[0], 1)
    kf.load_shadow(parse_rule_set(TIGHT, "S"), 2)
    probe = f.udp("10.1.2.3", 53)
    before = kf.counters().shadow
    held: dict[int, int] = {}
    with background_traffic(kf, probe, 200) as runs:
        for i in range(1, 402):
            kf.apply(sets[i % 3], 3 + i)
            slot = kf.state().active.slot
            assert held.get(slot) != i % 3, f"slot {slot} rewritten with the set it held"
            held[slot] = i % 3
    after = kf.counters().shadow
    moved = {n: sc.packets - (before[n].packets if n in before else 0) for n, sc in after.items()}
    moved = {n: v for n, v in moved.items() if v}
    assert moved == {"allow-list": sum(runs)}, moved
    assert len(runs) > 10

    # a value naming a slot that is not the active one is ignored by the
    # program: force one while B (which matches differently) is active
    kf.apply(sets[1], 1000)
    st = kf.state()
    sets_map = kf._tables["tg_sets"]
    cfg = sets_map[sets_map.Key(st.shadow.slot)]
    stale = next(s for s in range(3) if s not in (st.active.slot, st.shadow.slot))
    cfg.same_match_as = stale
    sets_map[sets_map.Key(st.shadow.slot)] = cfg
    before = kf.counters().shadow
    kf.test_run(probe, repeat=10)
    after = kf.counters().shadow
    moved = {n: sc.packets - (before[n].packets if n in before else 0) for n, sc in after.items()}
    assert {n: v for n, v in moved.items() if v} == {"allow-list": 10}
    kf.clear_shadow()


# A candidate that classifies on its own and would drop nearly everything:
# a deny list over the test sources, a drop rule for web, a tiny default.
HARSH = rule_set("shadow-harsh")

# (ms, frame): traffic the active set limits, passes and denies
STEPS = [
    *[(0, f.udp("203.0.113.1", 53))] * 120,  # dns: 100 pass, then rate drops
    *[(0, f.tcp("198.51.100.9", 443))] * 30,  # web: all pass
    *[(0, f.tcp("203.0.113.2", 8080))] * 20,  # the default: all pass
    *[(0, f.udp("192.0.2.7", 53))] * 5,  # the active deny list
    *[(2000, f.udp("203.0.113.1", 53))] * 3,  # dns refilled
    *[(0, f.udp("2001:db8::1", 53))] * 10,
]


@pytest.mark.kernel
def test_a_shadow_that_classifies_on_its_own_enforces_nothing(replay):
    """Every verdict and reason is the active set's, packet for packet, with
    or without a shadow set that matches differently and would drop
    nearly all of it; and the shadow really evaluated the traffic."""

    def verdicts(shadow: str | None) -> list:
        replay.apply(ACTIVE)
        if shadow is not None:
            replay.version += 1
            replay.kf.load_shadow(parse_rule_set(shadow, "<shadow>"), replay.version)
            linked, _ = _same_match_as(replay.kf)
            assert linked == NO_SLOT, "this shadow classifies on its own"
        out = [(s.verdict, s.reason) for s in (replay.at(ms).send(frame) for ms, frame in STEPS)]
        return out

    alone = verdicts(None)
    before = replay.kf.counters().shadow
    with_shadow = verdicts(HARSH)
    after = replay.kf.counters().shadow
    replay.kf.clear_shadow()
    assert with_shadow == alone
    assert alone.count(("drop", "rate")) == 20 and alone.count(("drop", "deny")) == 5, alone
    would = {n: sc.would_drop - (before[n].would_drop if n in before else 0) for n, sc in after.items()}
    # the harsh candidate would have dropped (and so did evaluate) all but a handful
    assert would.get("deny-list", 0) == 143 and would.get("web", 0) == 30, would
