"""Where a shadow set keeps its per-source and per-prefix state (bpf/layout.h
struct tg_shadow). A shadow set that matches and keys sources like the
active one keeps it in the active set's entry for the source (and for the
prefix, where both key prefixes alike), so a packet finds both sets' state
with one lookup. Readers must not be able to tell: every source's shadow
row (packets, would-drops, would-drops the active set passed, penalty) and
every shadow prefix row must read as they do when the shadow set keeps
entries of its own; a new shadow set must start afresh, and a rule whose
state cannot live there must keep entries of its own."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import rule_set
from tidegate.kernel import bpfsys
from tidegate.kernel.layout import (
    KIND_PREFIX,
    KIND_SOURCE,
    LINK_PFX4,
    LINK_PFX6,
    LINK_SLOT,
    LINK_STATE4,
    LINK_STATE6,
    NO_SLOT,
    RULE_DEFAULT,
    RULE_IDX,
    SLOTS,
    tg_src,
    tg_state_key,
)
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f

ACTIVE = rule_set("shadow-active")
# the usual candidate: the same matching, ten times tighter, with a penalty
TIGHT = ACTIVE.replace("pps: 100, burst: 100}", "pps: 10, burst: 10}\n    block_seconds: 5")
# the same candidate with a prefix limit that drops (and lends less)
TIGHT_PFX = TIGHT.replace("pps: 5000, burst: 5000}", "pps: 20, burst: 60}")
# the same limits, plus a deny entry no test packet comes from: it matches
# differently, so its state is kept in entries of its own
DENY_MORE = ('deny: ["192.0.2.0/24"]', 'deny: ["192.0.2.0/24", "203.0.113.250/32"]')

# (ms, frame): dns sources the candidate would limit and block, web, the
# default rule with its prefix limit (prefix credit), listed sources, IPv6
TRAFFIC = [
    *[(0, f.udp("203.0.113.1", 53))] * 30,
    *[(0, f.udp("203.0.113.7", 53))] * 8,
    *[(0, f.tcp("198.51.100.9", 443))] * 30,
    *[(0, f.tcp(f"203.0.113.{20 + i % 5}", 8080)) for i in range(200)],
    *[(0, f.udp("10.1.2.3", 53))] * 5,
    *[(0, f.udp("192.0.2.7", 53))] * 5,
    *[(0, f.udp("2001:db8::1", 53))] * 20,
    *[(0, f.tcp("2001:db8::2", 8080))] * 20,
    # later: the refilled buckets, the penalty still running for 203.0.113.1
    *[(2000, f.udp("203.0.113.1", 53))] * 5,
    *[(2000, f.udp("203.0.113.7", 53))] * 5,
    *[(2000, f.tcp(f"203.0.113.{20 + i % 5}", 8080)) for i in range(100)],
]


def _raw_entries(kf) -> tuple[np.ndarray, np.ndarray]:
    """The LRU as the program keeps it (keys, values), without the reader."""
    kd, vd = np.dtype(tg_state_key), np.dtype(tg_src)
    keys, vals, n = bpfsys.lookup_batch(kf._tables["tg_state"].map_fd, kd.itemsize, vd.itemsize, 65536)
    return keys.view(kd)[:n], vals.view(vd)[:n]


def _active_and_shadow(replay, shadow_text: str):
    """Apply ACTIVE and load shadow_text as the shadow set: the filter's state."""
    replay.apply(ACTIVE)
    replay.version += 1
    replay.kf.load_shadow(parse_rule_set(shadow_text, "<shadow>"), replay.version)
    return replay.kf.state()


def _shadow_rows(replay, shadow_text: str) -> tuple[dict, int, dict]:
    """Apply ACTIVE, load the shadow set, run TRAFFIC. Returns the shadow
    set's rows as the reader gives them, {(address, rule, kind): (packets,
    drops, new_drops, blocked_until)}, the shadow's same_match_as and the
    number of entries keyed by the shadow's epoch in the LRU, by kind."""
    kf = replay.kf
    st = _active_and_shadow(replay, shadow_text)
    sets = kf._tables["tg_sets"]
    linked = int(sets[sets.Key(st.shadow.slot)].same_match_as)
    verdicts = [replay.at(ms).send(frame).verdict for ms, frame in TRAFFIC]
    assert verdicts.count("drop") == 5, "only the active deny list drops: the shadow enforces nothing"
    t = kf.read_sources()
    rows = {}
    for i in np.flatnonzero(t.epoch == st.shadow.epoch):
        key = (t.address(i), int(t.rule[i]), int(t.kind[i]))
        assert key not in rows, f"{key} read twice"
        rows[key] = (int(t.packets[i]), int(t.drops[i]), int(t.new_drops[i]), int(t.blocked_until[i]))
    keys, _ = _raw_entries(kf)
    mine = keys["epoch"] == st.shadow.epoch
    own = {kind: int(np.count_nonzero(mine & (keys["kind"] == kind))) for kind in (KIND_SOURCE, KIND_PREFIX)}
    kf.clear_shadow()
    return rows, linked, own


@pytest.mark.kernel
@pytest.mark.parametrize("candidate", ["tight", "tight-prefix"])
def test_shadow_state_in_the_active_entries_reads_as_entries_of_its_own(replay, candidate):
    text = TIGHT if candidate == "tight" else TIGHT_PFX
    if text == ACTIVE or TIGHT_PFX == TIGHT:
        pytest.fail("the candidates no longer differ from the active set: update them")
    kept, linked, own_entries = _shadow_rows(replay, text)
    active = replay.kf.state().active.slot
    assert linked == active and own_entries == {KIND_SOURCE: 0, KIND_PREFIX: 0}, \
        "the candidate's source and prefix state lives in the active entries"
    separate, linked, own_entries = _shadow_rows(replay, text.replace(*DENY_MORE))
    assert linked == NO_SLOT and own_entries[KIND_SOURCE] > 0 and own_entries[KIND_PREFIX] > 0
    assert kept == separate
    dns = kept[("203.0.113.1", 0, KIND_SOURCE)]
    assert dns[:3] == (35, 25, 25) and dns[3] > 0, "10 pass, then limited, then blocked for 5 s"
    assert kept[("203.0.113.7", 0, KIND_SOURCE)][:3] == (13, 0, 0), "refilled after 2 s"
    prefix = [k for k in kept if k[2] == KIND_PREFIX]
    assert prefix and sum(kept[k][0] for k in prefix) > 0, "the default rule's prefix counted its packets"
    assert all(kept[k][3] == 0 for k in prefix), "a prefix is never blocked"
    other = kept[("203.0.113.0", RULE_DEFAULT, KIND_PREFIX)]
    if candidate == "tight-prefix":
        assert other[1] > 0 and other[1] == other[2], "the candidate's prefix limit drops what the active one passed"
    else:
        assert other[1] == 0


# the candidate keys IPv4 prefixes by /16: its IPv4 prefix state keeps
# entries of its own, its IPv6 prefix state (still /48) the active ones
TIGHT_WIDE = TIGHT.replace("ipv4_prefix: 24, ipv6_prefix: 48", "ipv4_prefix: 16, ipv6_prefix: 48")


@pytest.mark.kernel
def test_a_prefix_keyed_otherwise_keeps_entries_of_its_own(replay):
    if TIGHT_WIDE == TIGHT:
        pytest.fail("the /16 candidate no longer differs from TIGHT: update it")
    kept, linked, own_entries = _shadow_rows(replay, TIGHT_WIDE)
    assert linked == replay.kf.state().active.slot and own_entries[KIND_SOURCE] == 0
    prefix = {k[:2]: v for k, v in kept.items() if k[2] == KIND_PREFIX}
    assert ("203.0.113.0", RULE_DEFAULT) not in prefix and prefix[("203.0.0.0", RULE_DEFAULT)][0] > 0, \
        "keyed by the candidate's /16"
    v4 = [k for k in prefix if ":" not in k[0]]
    assert own_entries[KIND_PREFIX] == len(v4) > 0, "IPv4: entries of its own"
    assert ("2001:db8::", RULE_DEFAULT) in prefix, "IPv6: kept in the active prefix entries, read as rows"


# the candidate limits dns by bytes as well: a byte bucket is not kept in the
# active entries, so that rule keeps entries of its own (the others do not)
TIGHT_BYTES = TIGHT.replace("pps: 10, burst: 10}", "pps: 10, burst: 10, bps: 800000, burst_bytes: 100000}", 1)


@pytest.mark.kernel
def test_a_rule_whose_state_cannot_live_in_the_active_entries_keeps_its_own(replay):
    if TIGHT_BYTES == TIGHT:
        pytest.fail("the byte-limit candidate no longer differs from TIGHT: update it")
    kept, linked, own_entries = _shadow_rows(replay, TIGHT_BYTES)
    assert linked == replay.kf.state().active.slot
    assert own_entries[KIND_SOURCE] == 3, "dns: 203.0.113.1, .7 and 2001:db8::1, in entries of their own"
    assert kept[("203.0.113.1", 0, KIND_SOURCE)][:3] == (35, 25, 25)
    assert kept[("198.51.100.9", 1, KIND_SOURCE)][:3] == (30, 20, 20), "web: 10 pass, then limited"


@pytest.mark.kernel
def test_a_rule_link_naming_a_slot_that_is_not_active_is_ignored(replay):
    """A shadow rule's link (bpf/layout.h TG_LINK_*) holds only for the
    active slot it names: one naming another slot, as a link written for
    the next flip reads until that flip, sends the rule's state to entries
    of its own, and leaves the other rules' state in the active entries."""
    kf = replay.kf
    st = _active_and_shadow(replay, TIGHT)
    rules = kf._tables["tg_rules"]
    key = rules.Key(st.shadow.slot * RULE_IDX + 0)  # dns
    leaf = rules[key]
    assert leaf.shadow_link == st.active.slot + 1 | LINK_STATE4 | LINK_PFX4 | LINK_STATE6 | LINK_PFX6
    other = next(s for s in range(SLOTS) if s not in (st.active.slot, st.shadow.slot))
    leaf.shadow_link = (leaf.shadow_link & ~LINK_SLOT) | (other + 1)
    rules[key] = leaf
    for _ in range(3):
        replay.at(0).send(f.udp("203.0.113.1", 53))
        replay.at(0).send(f.tcp("198.51.100.9", 443))
    keys, _ = _raw_entries(kf)
    own = keys[(keys["epoch"] == st.shadow.epoch) & (keys["kind"] == KIND_SOURCE)]
    assert own["rule"].tolist() == [0], "dns in an entry of its own, web still in the active entry"
    kf.clear_shadow()


@pytest.mark.kernel
def test_binding_the_adopted_sets_links_the_shadow_rules(replay):
    """An agent that adopts maps an older agent wrote (no shadow links:
    every shadow rule keeps its state in entries of its own) links them
    once it has bound both sets' names at start, without an apply."""
    kf = replay.kf
    st = _active_and_shadow(replay, TIGHT)
    rules = kf._tables["tg_rules"]
    keys = {idx: rules.Key(st.shadow.slot * RULE_IDX + idx) for idx in range(RULE_IDX)}

    def links() -> dict[int, int]:
        return {idx: int(rules[k].shadow_link) for idx, k in keys.items() if rules[k].shadow_link}

    linked = links()
    assert set(linked) == {0, 1, RULE_DEFAULT}, "dns, web and the default keep their state in the active entries"
    for k in keys.values():
        leaf = rules[k]
        leaf.shadow_link = 0
        rules[k] = leaf
    kf.bind_names(st.active.version, parse_rule_set(ACTIVE, "<active>"))
    kf.bind_names(st.shadow.version, parse_rule_set(TIGHT, "<shadow>"))
    assert links() == linked
    kf.clear_shadow()


@pytest.mark.kernel
def test_a_new_shadow_set_starts_its_state_afresh(replay):
    """Each new candidate's state in the active entries starts afresh: the
    source's (dns) and the prefix's (the default rule's prefix limit): its
    prefix row after 4 packets reads as the first candidate's did after its
    first 4."""
    replay.apply(ACTIVE)
    kf = replay.kf
    src, other = f.udp("203.0.113.1", 53), f.tcp("203.0.113.20", 8080)
    epochs, prefix_rows = [], []
    for version, sent in ((2, 30), (3, 4)):
        kf.load_shadow(parse_rule_set(TIGHT, "<shadow>"), version)
        epochs.append(kf.state().shadow.epoch)
        for i in range(sent):
            replay.at(0).send(src)
            replay.at(0).send(other)
            if i == 3:
                t = kf.read_sources()
                pfx = np.flatnonzero((t.epoch == epochs[-1]) & (t.kind == KIND_PREFIX) & (t.rule == RULE_DEFAULT))
                assert len(pfx) == 1
                prefix_rows.append((int(t.packets[pfx[0]]), int(t.drops[pfx[0]]), int(t.tokens[pfx[0]])))
        t = kf.read_sources()
        mine = np.flatnonzero((t.epoch == epochs[-1]) & (t.kind == KIND_SOURCE) & (t.rule == 0))
        assert len(mine) == 1
        got = (int(t.packets[mine[0]]), int(t.drops[mine[0]]))
        assert got == ((30, 20) if version == 2 else (4, 0)), got
    assert prefix_rows[1] == prefix_rows[0], prefix_rows
    first = t.epoch == epochs[0]
    assert not np.any(first), "the first candidate's state was taken over by the second"
    kf.clear_shadow()


@pytest.mark.kernel
def test_a_promoted_shadow_set_reads_from_its_own_entries_only(replay):
    """After a promotion the old active entries still hold the candidate's
    state; the candidate, now active, keeps its state in entries of its own
    (fresh buckets, as after any apply), and each source reads once."""
    replay.apply(ACTIVE)
    kf = replay.kf
    src = f.udp("203.0.113.1", 53)
    kf.load_shadow(parse_rule_set(TIGHT, "<shadow>"), 2)
    for _ in range(30):
        replay.at(0).send(src)
    kf.promote_shadow()
    promoted = kf.state().active.epoch
    steps = [replay.at(0).send(src) for _ in range(12)]
    assert [s.verdict for s in steps] == ["pass"] * 10 + ["drop"] * 2, "the candidate's limit, fresh bucket"
    t = kf.read_sources()
    mine = np.flatnonzero((t.epoch == promoted) & (t.kind == KIND_SOURCE))
    assert len(mine) == 1 and (int(t.packets[mine[0]]), int(t.drops[mine[0]])) == (12, 2)


# the active set passes dns without a limit: the candidate keeps dns state in
# entries of its own under it, in the active entries under ACTIVE
ACTIVE_DNS_OPEN = ACTIVE.replace("    limit: {pps: 100, burst: 100}\n", "    action: pass\n", 1)


@pytest.mark.kernel
def test_applies_under_a_loaded_shadow_read_each_source_once(replay):
    """The shadow set stays loaded while the active set changes under it:
    ACTIVE_DNS_OPEN (dns state in the candidate's own entries), then ACTIVE
    (in the active entries; the candidate's own entries from before are
    still in the LRU), then ACTIVE again. Every source reads once, and the
    candidate's state starts afresh with each new active set, as the active
    set's own does."""
    if ACTIVE_DNS_OPEN == ACTIVE:
        pytest.fail("the open-dns active set no longer differs from ACTIVE: update it")
    kf = replay.kf
    src = f.udp("203.0.113.1", 53)
    kf.apply(parse_rule_set(ACTIVE_DNS_OPEN, "open"), 1)
    kf.load_shadow(parse_rule_set(TIGHT, "<shadow>"), 2)
    shadow = kf.state().shadow.epoch
    expect = []
    for version, text, sent in ((1, ACTIVE_DNS_OPEN, 30), (3, ACTIVE, 4), (4, ACTIVE, 12)):
        if version > 1:
            kf.apply(parse_rule_set(text, "<active>"), version)
            assert kf.state().shadow.epoch == shadow, "the candidate stayed loaded"
        for _ in range(sent):
            replay.at(0).send(src)
        t = kf.read_sources()
        mine = np.flatnonzero((t.epoch == shadow) & (t.kind == KIND_SOURCE) & (t.rule == 0))
        assert len(mine) == 1, f"after version {version}: {len(mine)} rows"
        prefix = np.flatnonzero((t.epoch == shadow) & (t.kind == KIND_PREFIX) & (t.rule == 0))
        assert len(prefix) == 1, f"after version {version}: {len(prefix)} prefix rows"
        expect.append((int(t.packets[mine[0]]), int(t.drops[mine[0]])))
    keys, vals = _raw_entries(kf)
    assert np.count_nonzero((keys["epoch"] == shadow) & (keys["kind"] == KIND_SOURCE)) == 1, "the stale own entry"
    assert np.count_nonzero((keys["epoch"] == shadow) & (keys["kind"] == KIND_PREFIX)) == 1, "and its prefix's"
    assert expect == [(30, 20), (4, 0), (12, 2)], expect
    kf.clear_shadow()


@pytest.mark.kernel
def test_the_snapshot_counts_entries_apart_from_rows(replay):
    """The LRU's entry count (the eviction estimate's base) is not inflated
    by the rows of shadow state: those live in entries already counted."""
    replay.apply(ACTIVE)
    kf = replay.kf
    kf.load_shadow(parse_rule_set(TIGHT, "<shadow>"), 2)
    for frame in (f.udp("203.0.113.1", 53), f.udp("203.0.113.7", 53)):
        replay.at(0).send(frame)
    keys, vals = _raw_entries(kf)
    holding = int(np.count_nonzero(vals["sh_epoch"] == kf.state().shadow.epoch))
    assert holding == 3, "two dns sources and their prefix hold the candidate's state"
    t = kf.read_sources()
    assert t.entries == len(keys) and t.count == len(keys) + holding, (t.entries, t.count, len(keys))
    kf.clear_shadow()
