"""The blast-radius estimate and the guard's decisions, on fakes of what they
read (the sampler's per-source window, the counter history, the source
table): pure logic above the kernel layer, with exact expected numbers.

Numbers here are worked out by hand from the README's rules: a candidate
passes at most its `pps` per source in the long run; a prefix limit caps the
sum of a prefix's sources; the guard rolls back when the drop share rises by
more than 5 points (over at least 50 packets), when more than 50 more
distinct sources are dropped than before, or when a canary is dropped."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace as NS

import numpy as np
import pytest

from fixtures import rule_set
from tidegate.operation import OperationError
from tidegate.safety import estimate as safety
from tidegate.safety import guard as guarding
from tidegate.ruleset.parse import parse_rule_set
from tidegate.observation.sampler import Interval
from tidegate.observation.window import SourceRates, source_keys

ACTIVE = rule_set("safety-active")
TIGHT_API = ACTIVE.replace("pps: 100, burst: 100", "pps: 10, burst: 10")
LOOSER = ACTIVE.replace("pps: 100, burst: 100", "pps: 200, burst: 200")


def rates(rows, seconds=100.0) -> SourceRates:
    """rows: (address, active rule, packets, drops, seen seconds)."""
    addrs = [r[0] for r in rows]
    pk = np.array([r[2] for r in rows], float)
    dr = np.array([r[3] for r in rows], float)
    seen = np.array([r[4] for r in rows], float)
    with np.errstate(divide="ignore", invalid="ignore"):  # a source seen for no time yet has no rate
        pps, dps = pk / seen, dr / seen
    return SourceRates(addrs, [r[1] for r in rows], np.zeros(len(rows), np.uint32), pps, dps, seconds, pk, dr, seen)


def estimating_agent(rows, active=ACTIVE, packet_budget=0.01, source_budget=0.05, seconds=100.0):
    windows = []

    def window_rates(window, kind=0):
        windows.append((window, kind))
        return rates(rows, seconds)

    agent = NS(
        options=NS(packet_budget=packet_budget, source_budget=source_budget, estimate_window=300.0,
                   no_blast_check=False),
        kf=NS(state=lambda: NS(active=NS(version=1) if active else None)),
        rule_set_of=lambda v: parse_rule_set(active, "active"),
        sampler=NS(window_rates=window_rates),
        windows=windows,
    )  # fmt: skip
    return agent


CLIENTS = [(f"10.50.0.{i}", "api", 4000, 0, 100.0) for i in range(1, 11)]  # 10 x 40 pps on api
HEAVY = [("198.51.100.1", "sink", 100_000, 0, 100.0)]  # 1,000 pps on sink


def test_estimate_of_a_tighter_limit_counts_every_client_it_hurts():
    agent = estimating_agent(CLIENTS + HEAVY)
    est = safety.estimate(agent, parse_rule_set(TIGHT_API, "tight"))
    assert agent.windows == [(300.0, 0)], "the estimate reads the configured window of per-source rows"
    # each client: 40 pps against 10: a quarter passes, 3,000 of its 4,000 packets newly dropped
    assert (est.sources_seen, est.sources_newly_dropped) == (11, 10)
    assert est.packets_per_second == pytest.approx(1400.0)
    assert est.newly_dropped_pps == pytest.approx(300.0)
    assert est.packet_share == pytest.approx(30_000 / 140_000)
    assert est.source_share == pytest.approx(10 / 11)
    assert est.within_budget is False
    assert [(r.rule, r.sources_newly_dropped, round(r.newly_dropped_pps, 6)) for r in est.rules] == [("api", 10, 300.0)]
    assert len(est.top_affected) == 10
    assert {a["address"] for a in est.top_affected} == {f"10.50.0.{i}/32" for i in range(1, 11)}
    assert all(a["rule"] == "api" and a["pps"] == pytest.approx(40) and a["drop_pps"] == pytest.approx(30)
               for a in est.top_affected)  # fmt: skip
    assert est.window_seconds == 100.0
    assert "would newly drop 21.4% of passing packets (300 of 1400 pps) and 90.9% of sources (10 of 11)" in est.summary


def test_a_looser_candidate_newly_drops_nothing():
    est = safety.estimate(estimating_agent(CLIENTS + HEAVY), parse_rule_set(LOOSER, "looser"))
    assert (est.sources_newly_dropped, est.newly_dropped_pps, est.packet_share, est.source_share) == (0, 0, 0, 0)
    assert est.within_budget is True and est.rules == [] and est.top_affected == []


def test_either_budget_alone_refuses():
    # one heavy source hurt: 0.1% of 1,000 sources (within 5%) but 50% of packets (over 1%)
    many = [(f"10.60.{i // 250}.{i % 250 + 1}", "sink", 100, 0, 100.0) for i in range(999)]
    heavy_api = [("198.51.100.2", "api", 10_000, 0, 100.0)]  # 100 pps on api; the candidate allows 10
    est = safety.estimate(estimating_agent(many + heavy_api), parse_rule_set(TIGHT_API, "t"))
    assert est.source_share == pytest.approx(1 / 1000) and est.packet_share == pytest.approx(9000 / 109_900)
    assert est.within_budget is False, "the packet budget alone refuses"
    # 60 of 1,000 small api sources hurt: 6% of sources (over 5%) but a tiny share of packets (within 1%)
    small = [(f"10.70.0.{i}", "api", 2000, 0, 100.0) for i in range(1, 61)]  # 20 pps each
    rest = [(f"10.60.{i // 250}.{i % 250 + 1}", "sink", 100_000, 0, 100.0) for i in range(940)]
    est = safety.estimate(estimating_agent(small + rest), parse_rule_set(TIGHT_API, "t"))
    assert est.source_share == pytest.approx(0.06) and est.packet_share < 0.01
    assert est.within_budget is False, "the source budget alone refuses"
    # and within both: just inside each budget
    est = safety.estimate(estimating_agent(small[:50] + rest), parse_rule_set(TIGHT_API, "t"))
    assert est.source_share == pytest.approx(50 / 990) and est.within_budget is False
    est = safety.estimate(estimating_agent(small[:49] + rest), parse_rule_set(TIGHT_API, "t"))
    assert est.source_share == pytest.approx(49 / 989) and est.packet_share < 0.01 and est.within_budget is True


def test_budgets_are_the_configured_ones():
    rows = CLIENTS + HEAVY
    cand = parse_rule_set(TIGHT_API, "t")
    assert safety.estimate(estimating_agent(rows, packet_budget=0.25, source_budget=0.95), cand).within_budget
    assert not safety.estimate(estimating_agent(rows, packet_budget=0.2, source_budget=0.95), cand).within_budget
    assert not safety.estimate(estimating_agent(rows, packet_budget=0.25, source_budget=0.9), cand).within_budget


def test_packets_already_dropped_are_not_newly_dropped():
    # a source the active set already limits to 100 of its 200 pps; the candidate allows 10
    rows = [("10.50.1.1", "api", 20_000, 10_000, 100.0)] + HEAVY
    est = safety.estimate(estimating_agent(rows), parse_rule_set(TIGHT_API, "t"))
    assert est.newly_dropped_pps == pytest.approx(90.0), "10,000 passed before, 1,000 would"
    assert est.packets_per_second == pytest.approx(1100.0)


def test_lists_and_actions_of_the_candidate():
    rows = CLIENTS + HEAVY
    deny = ACTIVE + 'deny: ["10.50.0.0/29"]\n'  # clients .1 to .7
    est = safety.estimate(estimating_agent(rows), parse_rule_set(deny, "deny"))
    assert est.sources_newly_dropped == 7 and est.newly_dropped_pps == pytest.approx(7 * 40.0)
    assert [r.rule for r in est.rules] == ["deny-list"]
    allow = TIGHT_API + 'allow: ["10.50.0.0/24"]\n'
    assert safety.estimate(estimating_agent(rows), parse_rule_set(allow, "allow")).sources_newly_dropped == 0
    drop = ACTIVE.replace("    limit: {pps: 1000, burst: 1000}\n", "    action: drop\n", 2)
    drop = drop.replace("defaults:\n    action: drop\n", "defaults:\n  limit: {pps: 1000, burst: 1000}\n")
    est = safety.estimate(estimating_agent(rows), parse_rule_set(drop, "drop"))
    assert [r.rule for r in est.rules] == ["sink"] and est.newly_dropped_pps == pytest.approx(1000.0)
    passing = TIGHT_API.replace("    limit: {pps: 10, burst: 10}\n", "    action: pass\n")
    assert safety.estimate(estimating_agent(rows), parse_rule_set(passing, "p")).sources_newly_dropped == 0


def test_a_prefix_limit_caps_the_sum_of_its_sources():
    # ten clients of one /24 at 40 pps: each within the candidate's 100 pps, together 400 against 100
    cand = ACTIVE.replace("    limit: {pps: 100, burst: 100}\n",
                          "    limit: {pps: 100, burst: 100}\n    prefix_limit: {ipv4_prefix: 24, pps: 100}\n")  # fmt: skip
    est = safety.estimate(estimating_agent(CLIENTS + HEAVY), parse_rule_set(cand, "pfx"))
    assert est.sources_newly_dropped == 10
    assert est.newly_dropped_pps == pytest.approx(300.0), "400 pps in, 100 pass"
    # in two /24s of five clients each (200 pps each): the cap applies per prefix
    split = [(f"10.50.{i % 2}.{i}", "api", 4000, 0, 100.0) for i in range(1, 11)]
    est = safety.estimate(estimating_agent(split + HEAVY), parse_rule_set(cand, "pfx"))
    assert est.newly_dropped_pps == pytest.approx(200.0)


def test_sources_are_keyed_by_the_candidates_prefix():
    # four /32 sources in one /30: a candidate keyed per /30 sees one source of 160 pps against 100
    rows = [(f"10.50.2.{i}", "api", 4000, 0, 100.0) for i in range(4)] + HEAVY
    cand = ACTIVE.replace("defaults:\n", "defaults:\n  ipv4_prefix: 30\n")
    est = safety.estimate(estimating_agent(rows), parse_rule_set(cand, "p30"))
    assert est.newly_dropped_pps == pytest.approx(60.0) and est.sources_newly_dropped == 4


def test_nothing_to_compare_or_nothing_seen():
    est = safety.estimate(estimating_agent(CLIENTS, active=None), parse_rule_set(TIGHT_API, "t"))
    assert est.within_budget and est.summary == "no active rule set: nothing to compare against"
    est = safety.estimate(estimating_agent([]), parse_rule_set(TIGHT_API, "t"))
    assert est.within_budget and est.sources_seen == 0 and "no per-source traffic" in est.summary


def test_small_losses_are_not_counted():
    # 1% of a source's packets or half a packet is noise, not a newly dropped source
    rows = [("10.50.3.1", "api", 1010, 0, 100.0)] + HEAVY  # 10.1 pps against 10
    est = safety.estimate(estimating_agent(rows), parse_rule_set(TIGHT_API, "t"))
    assert est.sources_newly_dropped == 0
    rows = [("10.50.3.1", "api", 1020, 0, 100.0)] + HEAVY  # 10.2 pps: 20 of 1,020 lost, over 1%
    assert safety.estimate(estimating_agent(rows), parse_rule_set(TIGHT_API, "t")).sources_newly_dropped == 1


def test_check_refuses_over_budget_and_dropped_canaries():
    agent = estimating_agent(CLIENTS)
    over = safety.Estimate(within_budget=False, summary="would newly drop X")
    ok = safety.Estimate(within_budget=True)
    rs = parse_rule_set(ACTIVE, "a")
    assert safety.check(agent, rs, over) == ["would newly drop X (budget: 1.0% of packets, 5.0% of sources)"]
    assert safety.check(agent, rs, ok) == [] and safety.check(agent, rs, None) == []
    agent.options.no_blast_check = True
    assert safety.check(agent, rs, over) == []
    canaried = parse_rule_set(ACTIVE + 'canaries: ["192.0.2.7", "10.9.9.9"]\ndeny: ["192.0.2.0/24"]\n', "c")
    assert safety.check(agent, canaried, ok) == ["canary 192.0.2.7/32 is on the deny list"]
    # canaries are classified by address (any protocol, no port): a drop rule for any protocol catches them
    drop_all = ACTIVE.replace("    protocol: udp\n    dst_ports: [8080]\n    limit: {pps: 100, burst: 100}\n",
                              "    protocol: any\n    action: drop\n")
    problems = safety.check(agent, parse_rule_set(drop_all + 'canaries: ["10.9.9.9"]\n', "d"), ok)
    assert problems == ["canary 10.9.9.9/32 matches rule 'api' with action drop"]
    allowed = ACTIVE + 'canaries: ["192.0.2.7"]\nallow: ["192.0.2.0/25"]\ndeny: ["192.0.2.0/24"]\n'
    assert safety.check(agent, parse_rule_set(allowed, "a"), ok) == []


def test_drop_share():
    assert guarding.drop_share(None) == (0.0, 0)
    assert guarding.drop_share({"pass": 0, "_seconds": 1.0}) == (0.0, 0)
    delta = {"pass": 50, "allow": 10, "deny": 5, "rate": 20, "prefix": 10, "blocked": 5, "unparsed": 0,
             "noconfig": 0, "_seconds": 2.0, "_rules": {}}  # fmt: skip
    assert guarding.drop_share(delta) == (40 / 100, 100)


# -------------------------------------------------------------- the guard
class Clock:
    """safety's view of time: monotonic() and sleep() that only advance it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


def packed(address: str) -> tuple[int, int]:
    """An address as the source table holds it: 16 bytes (IPv4 as
    ::ffff:a.b.c.d), loaded as two little-endian u64."""
    a = ipaddress.ip_address(address)
    raw = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a).packed
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def source_table(rows):
    """rows: (address, epoch, drops, kind)."""
    hl = [packed(r[0]) for r in rows]
    return NS(count=len(rows), addr_hi=np.array([h for h, _ in hl], np.uint64),
              addr_lo=np.array([lo for _, lo in hl], np.uint64), epoch=np.array([r[1] for r in rows], np.uint32),
              drops=np.array([r[2] for r in rows], np.uint64), kind=np.array([r[3] for r in rows], np.uint8))  # fmt: skip


def interval(rows, shadow_epochs=(), t0=0.0, t1=1.0):
    """An interval of the sampler: rows (address, epoch, drops, kind)."""
    t = source_table(rows)
    n = len(rows)
    z = np.zeros(n, np.uint64)
    return Interval(t0, t1, t.addr_hi, t.addr_lo, t.epoch, np.zeros(n, np.uint8), t.kind, z + 1, t.drops, z, z,
                    tuple(shadow_epochs))  # fmt: skip


def delta(packets: int, drops: int) -> dict:
    return {"pass": packets - drops, "rate": drops, "_seconds": 5.0, "_rules": {}}


class Watched:
    """The agent a guard watches: version 7 was just applied over version 6."""

    def __init__(self, clock, before=(1000, 100), after=(1000, 120), table=(), intervals=(), canaries=(),
                 epoch=40, active=7):  # fmt: skip
        self.clock = clock
        self.options = NS(guard_drop_increase=0.05, guard_dropped_sources=50)
        self.before, self.after = before, after
        self.table, self.ivs, self.epoch, self.active = list(table), list(intervals), epoch, active
        text = ACTIVE + (f"canaries: {list(canaries)}\n" if canaries else "")
        self.rs = parse_rule_set(text.replace("'", '"'), "v7")
        self.rollbacks, self.audits, self.fired, self.windows, self.asked, self.since_asked = [], [], [], [], [], []
        self.history = NS(between=self.between)
        # `table`: the per-source rows since the activation, as the sampler's intervals show them
        self.sampler = NS(interval=1.0, intervals=lambda seconds: self.asked.append(seconds) or self.ivs,
                          intervals_since=self.since)  # fmt: skip
        self.kf = NS(active_version=lambda: self.active, state=lambda: NS(active=NS(epoch=self.epoch)))
        self.store = NS(audit=lambda *a: self.audits.append(a))
        self.reviews = NS(guard_fired=self.fired.append)

    def since(self, t):
        """A sampler that kept up: one interval from the activation to now."""
        self.since_asked.append(t - self.started)
        return [interval(self.table, t0=self.started, t1=self.clock.now)] if self.clock.now >= t else []

    def between(self, t0, t1):
        self.windows.append((t0 - self.started, t1 - self.started))
        return delta(*(self.before if t1 <= self.started else self.after))

    def rule_set_of(self, version):
        assert version == 7
        return self.rs

    def rollback(self, to, reason, caller, cause="manual"):
        self.rollbacks.append((to, reason, caller.author, cause))
        self.rollback_peer = caller.peer
        self.active = 6
        return NS(version=6)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(guarding, "time", c)
    return c


def new_guard(agent, seconds):
    """The guard of version 7, wired to what the Watched agent fakes."""
    sight = guarding.GuardSight(agent.kf, agent.history, agent.sampler, agent.store.audit, agent.reviews.guard_fired,
                                agent.options.guard_drop_increase, agent.options.guard_dropped_sources)  # fmt: skip
    return guarding.Guard(sight, 7, agent.rule_set_of(7), seconds, NS(author="alice"), agent.rollback)


def guard(agent, seconds=10):
    agent.started = agent.clock.now
    g = new_guard(agent, seconds)
    g.start()
    assert g.wait(10), "the guard finished"
    return g


def test_a_benign_change_is_kept(clock):
    # drops before and after (a flood the old set already limited), the share up 2 points
    agent = Watched(clock, before=(1000, 100), after=(1000, 120), table=[(f"198.18.0.{i}", 40, 5, 0)
                                                                        for i in range(1, 30)],
                    intervals=[interval([(f"198.18.0.{i}", 39, 5, 0) for i in range(1, 30)])])  # fmt: skip
    g = guard(agent)
    assert (g.outcome, g.cause, agent.rollbacks) == ("kept", "", [])
    assert agent.audits == [("guard", "ok", "guard", "agent", "kept after 10s", 7)]
    assert (g.baseline_share, g.baseline_packets, g.baseline_sources) == (0.1, 1000, 29)
    assert clock.now - agent.started == pytest.approx(10.0), "watched for its whole window"


def test_a_rising_drop_share_rolls_back(clock):
    agent = Watched(clock, before=(1000, 100), after=(1000, 160))
    g = guard(agent)
    assert g.outcome == "rolled-back" and g.rolled_back_to == 6
    assert g.cause == "drop share 16.0% vs 10.0% before the change (limit +5%)"
    assert agent.rollbacks == [(None, f"guard: {g.cause}", "guard", "guard-drop-share")]
    assert agent.audits == [("guard-rollback", "rolled-back", "guard", "agent", f"{g.cause}; rolled back to 6", 7)]
    assert agent.fired == [7]
    assert clock.now - agent.started == pytest.approx(1.0), "at the first check"


def test_the_drop_share_needs_a_rise_past_the_limit_and_enough_packets(clock):
    assert guard(Watched(clock, before=(1000, 100), after=(1000, 150))).outcome == "kept", "+5 points is the limit"
    assert guard(Watched(clock, before=(1000, 100), after=(49, 49))).outcome == "kept", "49 packets say nothing"
    assert guard(Watched(clock, before=(1000, 100), after=(50, 50))).outcome == "rolled-back"
    assert guard(Watched(clock, before=(0, 0), after=(1000, 51))).outcome == "rolled-back"


def test_more_dropped_sources_roll_back(clock):
    before = [interval([(f"198.18.1.{i}", 39, 1, 0) for i in range(1, 11)])]  # 10 sources dropped before
    table = [(f"198.18.2.{i}", 40, 3, 0) for i in range(1, 61)]  # 60 now: 50 more, the limit
    g = guard(Watched(clock, before=(1000, 100), after=(1000, 100), table=table, intervals=before))
    assert g.outcome == "kept"
    table.append(("198.18.2.200", 40, 1, 0))  # 61: 51 more
    agent = Watched(clock, before=(1000, 100), after=(1000, 100), table=table, intervals=before)
    g = guard(agent)
    assert g.outcome == "rolled-back"
    assert g.cause == "61 distinct sources dropped vs 10 before (limit +50)"
    assert agent.rollbacks[0][3] == "guard-dropped-sources"


def test_dropped_sources_count_only_the_active_sets_per_source_rows(clock):
    table = [(f"198.18.3.{i}", 40, 3, 0) for i in range(1, 51)]  # 50 dropped: the limit
    table += [(f"198.18.4.{i}", 41, 3, 0) for i in range(1, 60)]  # another epoch (a shadow set)
    table += [(f"198.18.5.{i}", 40, 3, 1) for i in range(1, 60)]  # prefix buckets
    table += [(f"198.18.6.{i}", 40, 0, 0) for i in range(1, 60)]  # seen, not dropped
    assert guard(Watched(clock, table=table)).outcome == "kept"
    assert guard(Watched(clock, table=table + [("198.18.3.99", 40, 1, 0)])).outcome == "rolled-back"


def test_the_baseline_counts_enforced_drops_only(clock):
    shadow = interval([(f"198.18.7.{i}", 41, 2, 0) for i in range(1, 100)], shadow_epochs=(41,))
    enforced = interval([(f"198.18.8.{i}", 39, 2, 0) for i in range(1, 21)]
                        + [(f"198.18.9.{i}", 39, 0, 0) for i in range(1, 21)]
                        + [(f"198.18.10.{i}", 39, 2, 1) for i in range(1, 21)])  # fmt: skip
    g = guard(Watched(clock, intervals=[shadow, enforced, enforced]))
    assert g.baseline_sources == 20


def test_a_dropped_canary_rolls_back_at_once(clock):
    table = [("198.51.100.7", 40, 1, 0)]
    agent = Watched(clock, table=table, canaries=["198.51.100.0/28"], before=(1000, 100), after=(1000, 300))
    g = guard(agent)
    assert g.outcome == "rolled-back" and g.cause == "canary 198.51.100.0/28 was dropped"
    assert agent.rollbacks[0][3] == "guard-canary"
    # the same canary seen but not dropped, dropped under another epoch, or outside the canaries: no
    for row in (("198.51.100.7", 40, 0, 0), ("198.51.100.7", 41, 4, 0), ("198.51.100.16", 40, 4, 0)):
        assert guard(Watched(clock, table=[row], canaries=["198.51.100.0/28"])).outcome == "kept", row


def test_a_superseded_version_is_left_alone(clock):
    agent = Watched(clock, before=(1000, 100), after=(1000, 900), active=8)
    g = guard(agent)
    assert (g.outcome, agent.rollbacks, agent.audits) == ("superseded", [], [])


def test_a_cancelled_guard_stops(clock):
    agent = Watched(clock)
    agent.started = clock.now
    g = new_guard(agent, 10)
    g.cancel()
    g.start()
    assert g.wait(10) and g.outcome == "cancelled" and agent.rollbacks == []


def test_a_guard_told_whom_to_spare_counts_only_their_drops(clock):
    # an auto-mitigation: the flood's 2,000 sources dropped is the point; the 60 known clients are spared
    flood = [(f"198.18.{i // 250}.{i % 250}", 40, 5, 0) for i in range(2000)]
    known = [(f"10.77.0.{i}", 40, 0, 0) for i in range(1, 61)]
    iv = interval(known)
    known_keys = source_keys(iv.hi, iv.lo)

    def run(table, spared):
        agent = Watched(clock, before=(1000, 0), after=(1000, 900), table=table)
        agent.started = clock.now
        sight = guarding.GuardSight(agent.kf, agent.history, agent.sampler, agent.store.audit,
                                    agent.reviews.guard_fired, 0.05, 50)  # fmt: skip
        g = guarding.Guard(sight, 7, agent.rule_set_of(7), 10, NS(author="agent:insight"), agent.rollback,
                           **({"spared": lambda k: np.isin(k, known_keys)} if spared else {}))  # fmt: skip
        g.start()
        assert g.wait(10)
        return g, agent

    assert run(flood + known, spared=False)[0].outcome == "rolled-back"  # as apply --guard sees it
    kept, agent = run(flood + known, spared=True)
    assert kept.outcome == "kept"
    # the spared sources' share: the 30 s before the change, then each second the last 5 s of the watch
    # (never before it), each check followed by the dropped sources since the last check; then the end's sample
    assert agent.since_asked == [-30.0, *(x for t in range(1, 11) for x in (max(0.0, t - 5.0), t - 1.0)), 10.0]
    hurt, _ = run(flood + [(a, e, 1, k) for a, e, _, k in known], spared=True)
    # only the known sources count: 60 of them, not the 2,060 dropped in all
    assert hurt.outcome == "rolled-back" and hurt.cause == "60 distinct sources dropped vs 0 before (limit +50)"


def lagging(agent, clock, lag, late=()):
    """The agent's sampler `lag` seconds behind: `late` rows show only in samples that end at the
    watch's end or later."""

    def since(t):
        t1 = clock.now - lag
        rows = list(late) if t1 >= agent.started + 10 else []
        return [interval(rows, t0=agent.started, t1=t1)] if t1 >= t else []

    agent.sampler.intervals_since = since
    return agent


def test_drops_late_in_the_watch_are_judged_from_the_sample_that_covers_its_end(clock):
    # sixty sources dropped in the last second reach the sampler one second after the watch
    agent = Watched(clock)
    agent.started = clock.now
    lagging(agent, clock, 1.0, late=[(f"198.51.100.{i}", 40, 3, 0) for i in range(1, 61)])
    g = new_guard(agent, 10)
    g.start()
    assert g.wait(10)
    assert (g.outcome, g.cause) == ("rolled-back", "60 distinct sources dropped vs 0 before (limit +50)")
    assert clock.now - agent.started == 11.0, "judged at the first sample that covers the end"
    # a sampler one second behind whose late drops are the previous set's (its epoch, 39): kept at that sample
    agent = lagging(Watched(clock), clock, 1.0, late=[(f"198.51.100.{i}", 39, 3, 0) for i in range(1, 61)])
    agent.started = clock.now
    g = new_guard(agent, 10)
    g.start()
    assert g.wait(10) and (g.outcome, agent.rollbacks) == ("kept", [])
    assert clock.now - agent.started == 11.0


def test_a_stalled_sampler_holds_the_verdict_two_samples_at_most(clock):
    agent = Watched(clock)
    agent.sampler.interval = 2.0
    agent.sampler.intervals_since = lambda t: []
    g = guard(agent)
    assert (g.outcome, agent.rollbacks, agent.audits[0][:2]) == ("kept", [], ("guard", "ok"))
    assert clock.now - agent.started == 10 + 2 * 2.0 + 2, "the end, two sample intervals and 2 s"


def test_a_version_superseded_while_the_guard_waits_for_the_last_sample_is_left_alone(clock):
    agent = Watched(clock)
    agent.started = clock.now
    lagging(agent, clock, 3.0, late=[(f"198.51.100.{i}", 40, 3, 0) for i in range(1, 61)])
    agent.kf.active_version = lambda: 7 if clock.now < agent.started + 11 else 8
    g = new_guard(agent, 10)
    g.start()
    assert g.wait(10)
    assert (g.outcome, agent.rollbacks, agent.audits) == ("superseded", [], [])
    assert clock.now - agent.started == 11.0


def test_counter_history_between(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(guarding, "time", clock)
    counts = {"n": 0}

    def counters():
        n = counts["n"]
        return NS(reasons={"pass": (100 * n, 0), "rate": (10 * n, 0)},
                  rules={"api": NS(pass_packets=50 * n, drop_packets=5 * n)})  # fmt: skip

    h = guarding.CounterHistory(NS(counters=counters), keep_seconds=10)
    assert h.between(0, 2000) is None
    for n in range(5):
        counts["n"] = n
        h.take()
        clock.sleep(1.0)
    d = h.between(1001.2, 1003.4)  # nearest samples: 1001 and 1003
    assert d == {"pass": 200, "rate": 20, "_seconds": 2.0, "_rules": {"api": (100, 10)}}
    assert h.between(1003.0, 1001.0) is None


# ------------------------------------------- the estimate's finer points
def test_the_estimate_reads_the_active_version_and_the_enforced_window():
    agent = estimating_agent(CLIENTS + HEAVY)
    asked = []
    agent.rule_set_of = lambda v: asked.append(v) or parse_rule_set(ACTIVE, "active")
    safety.estimate(agent, parse_rule_set(TIGHT_API, "t"))
    assert asked == [1], "the active version's rule set, by its number"


def test_each_rule_and_the_heaviest_sources_first():
    sink_tight = TIGHT_API.replace("pps: 1000, burst: 1000}\n\"\"\"", "").replace(
        "    dst_ports: [9]\n    limit: {pps: 1000, burst: 1000}", "    dst_ports: [9]\n    limit: {pps: 500, burst: 500}")
    rows = [(f"10.50.0.{i}", "api", 1000 * (i + 2), 0, 100.0) for i in range(1, 13)] + HEAVY  # 30..140 pps on api
    est = safety.estimate(estimating_agent(rows), parse_rule_set(sink_tight, "both"))
    # api: each source loses what it sends above 10 pps; sink: the heavy source loses 500 of its 1,000 pps
    api_loss = sum(1000 * (i + 2) / 100 - 10 for i in range(1, 13))
    assert [(r.rule, r.sources_newly_dropped) for r in est.rules] == [("api", 12), ("sink", 1)]
    assert est.rules[0].newly_dropped_pps == pytest.approx(api_loss) and est.rules[1].newly_dropped_pps == 500
    assert len(est.top_affected) == 10, "the ten heaviest of the 13 sources hurt"
    assert [a["drop_pps"] for a in est.top_affected] == sorted((a["drop_pps"] for a in est.top_affected), reverse=True)
    assert est.top_affected[0] == {"address": "198.51.100.1/32", "rule": "sink", "pps": 1000.0, "drop_pps": 500.0}
    assert est.top_affected[1]["address"] == "10.50.0.12/32" and est.top_affected[-1]["address"] == "10.50.0.4/32"


def test_a_rule_that_takes_any_protocol_on_a_port_is_traffic_on_tcp():
    # the active rule says 'any' with a port: its traffic is classified as TCP to that port
    active = ACTIVE.replace("protocol: udp\n    dst_ports: [8080]", "protocol: any\n    dst_ports: [8080]")
    tcp_only = active.replace("protocol: any\n    dst_ports: [8080]\n    limit: {pps: 100, burst: 100}",
                              "protocol: tcp\n    dst_ports: [8080]\n    limit: {pps: 10, burst: 10}")  # fmt: skip
    est = safety.estimate(estimating_agent(CLIENTS + HEAVY, active=active), parse_rule_set(tcp_only, "t"))
    assert est.sources_newly_dropped == 10
    # and a rule without ports is classified without one (icmp here)
    icmp = ACTIVE.replace("protocol: udp\n    dst_ports: [8080]", "protocol: icmp")
    est = safety.estimate(estimating_agent(CLIENTS + HEAVY, active=icmp),
                          parse_rule_set(icmp.replace("pps: 100, burst: 100", "pps: 10, burst: 10"), "t"))  # fmt: skip
    assert est.sources_newly_dropped == 10


def test_ipv6_sources_are_keyed_by_the_ipv6_prefix():
    # two sources in one /64 (one key) and one in another /64 of the same /32, 40 pps each against 30
    rows = [("2001:db8:0:1::1", "api", 4000, 0, 100.0), ("2001:db8:0:1::2", "api", 4000, 0, 100.0),
            ("2001:db8:0:2::1", "api", 4000, 0, 100.0)] + HEAVY  # fmt: skip
    cand = ACTIVE.replace("pps: 100, burst: 100", "pps: 30, burst: 30")
    est = safety.estimate(estimating_agent(rows), parse_rule_set(cand, "v6"))
    # the /64 with two sources sends 80 pps against 30; the other 40 against 30
    assert est.newly_dropped_pps == pytest.approx(50 + 10)
    assert {a["address"] for a in est.top_affected} == {"2001:db8:0:1::/64", "2001:db8:0:2::/64"}


def test_prefix_limits_of_ipv6_the_default_rule_and_limited_sources():
    # v6: three /64s of one /48 at 40 pps under a 100 pps /48 limit: 120 in, 100 pass
    rows = [(f"2001:db8:7:{i}::1", "api", 4000, 0, 100.0) for i in range(3)] + HEAVY
    cand = ACTIVE.replace("    limit: {pps: 100, burst: 100}\n",
                          "    limit: {pps: 100, burst: 100}\n    prefix_limit: {ipv4_prefix: 24, ipv6_prefix: 48, pps: "
                          "100}\n")  # fmt: skip
    assert safety.estimate(estimating_agent(rows), parse_rule_set(cand, "p")).newly_dropped_pps == pytest.approx(20)
    # the default rule with the defaults' prefix limit: ten sources on no rule's port, 40 pps each, /24 at 100
    rows = [(f"10.80.0.{i}", "default", 4000, 0, 100.0) for i in range(1, 11)] + HEAVY
    cand = ACTIVE.replace("defaults:\n", "defaults:\n  prefix_limit: {ipv4_prefix: 24, pps: 100}\n")
    cand = cand.replace("    limit: {pps: 100, burst: 100}\n", "    limit: {pps: 100, burst: 100}\n    prefix_limit: null\n")
    cand = cand.replace("    limit: {pps: 1000, burst: 1000}\n", "    limit: {pps: 1000, burst: 1000}\n    prefix_limit: null\n")
    assert safety.estimate(estimating_agent(rows), parse_rule_set(cand, "d")).newly_dropped_pps == pytest.approx(300)
    # sources already over their own limit: the prefix sees what they would pass, not what they send
    rows = [(f"10.50.0.{i}", "api", 4000, 1000, 100.0) for i in range(1, 6)] + HEAVY  # 40 pps, 10 dropped already
    cand = ACTIVE.replace("    limit: {pps: 100, burst: 100}\n",
                          "    limit: {pps: 20, burst: 20}\n    prefix_limit: {ipv4_prefix: 24, pps: 50}\n")  # fmt: skip
    est = safety.estimate(estimating_agent(rows), parse_rule_set(cand, "p"))
    # each would pass 20 of 40; together 100 against 50: each passes 10 of the 30 it passed before
    assert est.newly_dropped_pps == pytest.approx(5 * 20)
    # under the prefix limit: nothing newly dropped, whatever the per-source limit leaves room for
    rows = [("10.50.0.1", "api", 4000, 0, 100.0), ("10.50.0.2", "api", 4000, 0, 100.0)] + HEAVY
    cand = ACTIVE.replace("    limit: {pps: 100, burst: 100}\n",
                          "    limit: {pps: 100, burst: 100}\n    prefix_limit: {ipv4_prefix: 24, pps: 100}\n")  # fmt: skip
    assert safety.estimate(estimating_agent(rows), parse_rule_set(cand, "p")).sources_newly_dropped == 0


def test_allowed_sources_are_never_held_by_a_default_prefix_limit():
    rows = [(f"10.50.0.{i}", "api", 4000, 0, 100.0) for i in range(1, 11)] + HEAVY
    cand = ACTIVE.replace("defaults:\n", "defaults:\n  prefix_limit: {ipv4_prefix: 16, pps: 10}\n")
    cand += 'allow: ["10.50.0.0/24", "198.51.100.0/24"]\n'
    assert safety.estimate(estimating_agent(rows), parse_rule_set(cand, "a")).sources_newly_dropped == 0


def test_small_windows_and_sources_seen_briefly():
    # a window shorter than a second: rates over it, not over one second
    est = safety.estimate(estimating_agent([("10.50.0.1", "api", 20, 0, 0.5)] + [("198.51.100.1", "sink", 100, 0, 0.5)],
                                           seconds=0.5), parse_rule_set(TIGHT_API, "t"))  # fmt: skip
    assert est.packets_per_second == pytest.approx(240.0) and est.newly_dropped_pps == pytest.approx(30.0)
    # a source not seen for any time yet has no rate: it is kept
    est = safety.estimate(estimating_agent([("10.50.0.2", "api", 50, 0, 0.0)] + HEAVY), parse_rule_set(TIGHT_API, "t"))
    assert est.sources_newly_dropped == 0
    # small sources the candidate does not hurt are not counted as losing a packet
    rows = [(f"10.50.1.{i}", "api", 50, 0, 100.0) for i in range(1, 5)] + HEAVY
    assert safety.estimate(estimating_agent(rows), parse_rule_set(TIGHT_API, "t")).sources_newly_dropped == 0


def test_what_counts_as_newly_dropped_at_the_edges():
    # losing exactly 1% of a source's passing packets is not newly dropping it
    rows = [("10.50.2.1", "api", 10_000, 0, 100.0)] + HEAVY  # 100 pps against 99
    cand = ACTIVE.replace("pps: 100, burst: 100", "pps: 99, burst: 99")
    assert safety.estimate(estimating_agent(rows), parse_rule_set(cand, "c")).sources_newly_dropped == 0
    # a source that passed 51 of 100 packets and would pass 50 loses one packet: newly dropped
    rows = [("10.50.2.2", "api", 100, 49, 50.0)] + HEAVY  # 2 pps, the active set passed 51
    cand = ACTIVE.replace("pps: 100, burst: 100", "pps: 1, burst: 1")
    est = safety.estimate(estimating_agent(rows), parse_rule_set(cand, "c"))
    assert est.sources_newly_dropped == 1 and est.newly_dropped_pps == pytest.approx(1 / 100)


def test_budgets_hold_at_their_limits():
    # one of 20 sources (5%) loses 100 of 10,000 passing packets (1%): within both budgets, just
    hurt = [("10.50.3.1", "api", 200, 0, 100.0)]  # 2 pps against 1
    rest = [(f"10.60.0.{i}", "sink", 9800 // 19 + (1 if i <= 9800 % 19 else 0), 0, 100.0) for i in range(1, 20)]
    cand = ACTIVE.replace("pps: 100, burst: 100", "pps: 1, burst: 1")
    est = safety.estimate(estimating_agent(hurt + rest), parse_rule_set(cand, "edge"))
    assert (est.packet_share, est.source_share) == (0.01, 0.05)
    assert est.within_budget is True


def test_sources_seen_for_no_time_yet_and_traffic_the_active_set_dropped_whole():
    pfx = ACTIVE.replace("    limit: {pps: 100, burst: 100}\n",
                         "    limit: {pps: 100, burst: 100}\n    prefix_limit: {ipv4_prefix: 24, pps: 10}\n")  # fmt: skip
    # a source seen for no time has no rate: its own limit keeps it whole, its packets count in its prefix,
    # over the prefix's busiest source's time: (500 + 600) / 100 s = 11 pps against 10, both keep 10/11
    rows = [("10.50.9.1", "api", 500, 0, 100.0), ("10.50.9.2", "api", 600, 0, 0.0)]
    est = safety.estimate(estimating_agent(rows), parse_rule_set(pfx, "p"))
    assert est.sources_newly_dropped == 2 and est.newly_dropped_pps == pytest.approx(100 / 100)
    fresh = next(a for a in est.top_affected if a["address"] == "10.50.9.2/32")
    assert (fresh["pps"], fresh["drop_pps"]) == (0.0, 0.0), "no rate without time"
    # alone in its prefix: no rate at all, nothing to cap
    est = safety.estimate(estimating_agent([("10.50.9.2", "api", 600, 0, 0.0)] + HEAVY), parse_rule_set(pfx, "p"))
    assert est.sources_newly_dropped == 0 and est.packet_share == 0.0
    # traffic the active set dropped whole: nothing passes, nothing can be newly dropped
    est = safety.estimate(estimating_agent([("10.50.0.1", "api", 100, 100, 100.0)]), parse_rule_set(TIGHT_API, "t"))
    assert (est.packet_share, est.source_share, est.within_budget) == (0.0, 0.0, True)
    assert est.summary.startswith("would newly drop 0.0% of passing packets (0 of 0 pps) and 0.0% of sources (0 of 1)")


def test_the_summary_when_nothing_was_seen():
    est = safety.estimate(estimating_agent([]), parse_rule_set(TIGHT_API, "t"))
    assert est.summary == "no per-source traffic observed in the window yet: nothing to estimate"


def test_what_the_guard_reads_and_when(clock):
    agent = Watched(clock, before=(1000, 100), after=(1000, 120))
    agent.started = clock.now
    g = new_guard(agent, 3)
    assert (g.watching, g.outcome, g.cause, g.rolled_back_to) == (False, "watching", "", 0)
    g.start()
    assert g.wait(10)
    assert (g.watching, g.outcome, g.rolled_back_to) == (False, "kept", 0)
    # the baseline: the 30 s before the change; each check: the last 5 s, never before the change
    assert agent.windows == [(-30.0, 0.0), (0.0, 1.0), (0.0, 2.0), (0.0, 3.0)]
    assert agent.asked == [60], "dropped sources before: the sampler's last minute"
    clock.sleep(10)
    agent = Watched(clock, before=(1000, 100), after=(1000, 120))
    guard(agent, seconds=7)
    assert agent.windows[-1] == (2.0, 7.0)


def test_the_drop_share_limit_is_exclusive(clock):
    assert guard(Watched(clock, before=(0, 0), after=(1000, 50))).outcome == "kept", "exactly +5 points"


def test_dropped_sources_before_tell_ipv6_sources_apart(clock):
    # two sources whose addresses share the low 64 bits: two sources
    ivs = [interval([("2001:db8:1::5", 39, 1, 0), ("2001:db8:2::5", 39, 1, 0)])]
    assert guard(Watched(clock, intervals=ivs)).baseline_sources == 2


def test_a_guard_that_fails_says_so(clock):
    agent = Watched(clock, before=(1000, 100), after=(1000, 120))

    def broken(t):
        raise RuntimeError("the source table is gone")

    agent.sampler.intervals_since = broken
    g = guard(agent)
    assert (g.outcome, g.cause, g.watching, agent.rollbacks) == ("error", "the source table is gone", False, [])


def test_a_rollback_the_guard_cannot_make_is_an_error(clock):
    agent = Watched(clock, before=(1000, 100), after=(1000, 400))

    def refuse(to, reason, caller, cause="manual"):
        raise OperationError("FAILED_PRECONDITION", "there is no earlier version to roll back to")

    agent.rollback = refuse
    g = guard(agent)
    assert g.outcome == "error" and g.rolled_back_to == 0
    assert g.cause == ("drop share 40.0% vs 10.0% before the change (limit +5%); rollback failed: there is no earlier "
                       "version to roll back to")  # fmt: skip


def test_the_rollback_names_the_guard_and_whom_it_acts_after(clock):
    agent = Watched(clock, before=(1000, 100), after=(1000, 400))
    guard(agent)
    assert agent.rollback_peer == "agent (after alice)"


def test_counter_history_edges(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(guarding, "time", clock)
    state = {"reasons": {"pass": (10, 0)}, "rules": {}}
    h = guarding.CounterHistory(NS(counters=lambda: NS(reasons=state["reasons"], rules=state["rules"])))
    h.take()
    clock.sleep(1.0)
    # a reason and a rule the first sample did not have (a new rule set) count from zero
    state["reasons"] = {"pass": (30, 0), "deny": (5, 0)}
    state["rules"] = {"web": NS(pass_packets=7, drop_packets=2)}
    h.take()
    assert h.between(1000.0, 1001.0) == {"pass": 20, "deny": 5, "_seconds": 1.0, "_rules": {"web": (7, 2)}}
    assert h.between(1000.9, 1001.2) is None, "both ends nearest to the same sample: no interval"
