"""The auto-mitigation's decisions (changes/mitigation.py), as pure logic
with fakes for the change service, the store and the readings; the real
agent on veth is in tests/e2e/test_auto_mitigate.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fixtures import rule_set

from tidegate.changes.mitigation import AUTHOR, META_KEY, Mitigator, Policy, Streak, decline, own_change, still_held, undo
from tidegate.operation import ApplyOutcome, OperationError
from tidegate.ruleset.dump import dump_yaml
from tidegate.ruleset.parse import parse_rule_set, rule_set_from_dict

RULES = rule_set("mitigation")
BASE = parse_rule_set(RULES)
DENIED = dataclasses.replace(BASE, deny=(parse_rule_set("deny: ['198.18.0.0/16']").deny[0],))


def flood(n: int, verdict: str = "flood", confidence: float = 0.9, **kw) -> dict:
    """The reading of the n-th sample."""
    return {"verdict": verdict, "confidence": confidence, "newest_interval_start": float(n), "pps": 2000.0,
            "known_source_packet_share": 0.01, "new_sources": 5000, "sources": 5100, "window_seconds": 3.0,
            "known_before": 0.0, **kw}  # fmt: skip


def proposal(rs=DENIED, known_drop: float = 0.0, action: str = "deny") -> dict:
    return {"action": action, "rule": "sink", "reason": "the flood is concentrated in 198.18.0.0/16",
            "rule_set": dump_yaml(rs),
            "what_if": {"flood_packet_share_dropped": 0.99, "known_packet_share_dropped": known_drop,
                        "known_source_share_dropped": 0.0}}  # fmt: skip


# ---------------------------------------------------------------- fakes
class Store:
    def __init__(self):
        self.meta: dict = {}
        self.audits: list[tuple] = []

    def get_meta(self, key, default=None):
        return self.meta.get(key, default)

    def set_meta(self, key, value):
        self.meta[key] = value

    def audit(self, action, result, author, peer, detail="", version=None):
        self.audits.append((action, result, author, detail, version))


class Kf:
    version = 1

    def active_version(self):
        return self.version


class Guard:
    def __init__(self, version):
        self.version, self.outcome, self.cause = version, "watching", ""


class Changes:
    """What the mitigator uses of the ChangeService: versions in a dict."""

    def __init__(self, store, kf):
        self.store, self.kf = store, kf
        self.sets = {1: BASE}
        self.applied: list[tuple] = []
        self.guard = None
        self.refuse: str | None = None

    def rule_set_of(self, v):
        return self.sets[v]

    def active_rule_set(self):
        return self.sets[self.kf.version]

    def validate(self, text, source):
        return parse_rule_set(text, source)

    def revise(self, rs, source, caller, action):
        return rule_set_from_dict(rs.to_dict(), source)

    def apply(self, rs, reason, caller, **kw):
        if self.refuse:
            raise OperationError("FAILED_PRECONDITION", self.refuse)
        return self.operator(rs, reason, caller.author, **kw)

    def operator(self, rs, reason="by hand", author="token:admin", **kw):
        v = max(self.sets) + 1
        self.sets[v] = rs
        self.kf.version = v
        self.applied.append((v, rs, reason, author, kw))
        if kw.get("guard"):
            self.guard = Guard(v)
        return ApplyOutcome(v, guarded=bool(kw.get("guard")))


class Insight:
    latest: dict | None = None


class Agent:
    def __init__(self, store=None):
        self.kf = Kf()
        self.changes = Changes(store or Store(), self.kf)
        self.insight = Insight()


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def mitigator(agent=None, enabled=True, prop=None, **policy):
    agent = agent or Agent()
    clock = Clock()
    pol = Policy(enabled=enabled, readings=3, confidence=0.7, ttl=600, cooldown=300, guard_seconds=60, **policy)
    calls = []

    def propose(a, reading):
        calls.append(reading)
        return prop if prop is not None else proposal()

    spare = object()
    m = Mitigator(agent, pol, propose, lambda a, r: (spare, "spared-predicate"), clock=clock)
    m.calls, m.clock_, m.spare = calls, clock, spare
    return m


def feed(m, readings) -> None:
    for r in readings:
        m.agent.insight.latest = r
        m.step()
        m.step()  # a tick without a new sample counts nothing


# ---------------------------------------------------------------- streak
def test_a_streak_counts_consecutive_confident_attack_readings_once_each():
    s = Streak(Policy(readings=3, confidence=0.7))
    assert [s.add(flood(1)), s.add(flood(1)), s.add(flood(2, "heavy-hitter")), s.add(flood(3, "mixed"))] == \
        [False, False, False, True]  # fmt: skip
    for breaker in (flood(4, "surge"), flood(4, confidence=0.69), flood(4, stale=True), flood(4, "flash-crowd")):
        s = Streak(Policy(readings=2, confidence=0.7))
        s.add(flood(3))
        assert not s.add(breaker) and s.count == 0
    assert not Streak(Policy()).add(None) and not Streak(Policy()).add({"reading": "no samples yet"})


def test_a_proposal_is_declined_when_it_proposes_nothing_or_drops_known_traffic():
    pol = Policy(known_drop=0.0)
    assert "no change proposed" in decline({"action": "none", "reason": "a surge"}, pol)
    assert "0.50% of known sources' packets" in decline(proposal(known_drop=0.005), pol)
    assert decline(proposal(known_drop=0.005), Policy(known_drop=0.01)) is None
    assert decline(proposal(), pol) is None


# ----------------------------------------------------- the agent's decisions
def test_with_the_flag_off_nothing_is_proposed_nor_applied():
    m = mitigator(enabled=False)
    feed(m, [flood(i) for i in range(10)])
    assert m.calls == [] and m.changes.applied == [] and m.active is None


def test_a_surge_stays_nothing():
    m = mitigator()
    feed(m, [flood(i, "surge", 0.95) for i in range(10)])
    assert m.calls == [] and m.changes.applied == []


def test_a_lasting_flood_gets_one_guarded_mitigation_by_agent_insight():
    m = mitigator()
    feed(m, [flood(1), flood(2)])
    assert m.changes.applied == []
    feed(m, [flood(3)])
    [(v, rs, reason, author, kw)] = m.changes.applied
    assert (v, author, kw["source"], kw["guard"]) == (2, AUTHOR, "auto-mitigate", True)
    assert kw["spare"] is m.spare and kw["spared"] == "spared-predicate"  # budgets on the known traffic
    assert kw["guard_seconds"] == 60 and "force" not in kw
    assert "flood reading (confidence 90%)" in reason and "2,000 pps" in reason and "198.18.0.0/16" in reason
    assert m.results["applied"] == 1 and m.summary()["version"] == 2 and m.summary()["previous_version"] == 1
    assert json.loads(m.changes.store.meta[META_KEY])["previous"] == 1
    # one at a time: the flood goes on, nothing more is applied
    feed(m, [flood(i) for i in range(4, 12)])
    assert len(m.changes.applied) == 1


def test_it_expires_after_its_ttl_as_a_new_version_restoring_the_rule_set_before_it_then_cools_down():
    m = mitigator()
    feed(m, [flood(i) for i in range(3)])
    m.clock_.t += 599
    m.step()
    assert len(m.changes.applied) == 1
    m.clock_.t += 1
    m.step()
    v, rs, reason, author, kw = m.changes.applied[-1]
    assert v == 3 and rs is BASE and author == AUTHOR and kw["source"] == "auto-mitigate-expire"
    assert "expired after 600 s" in reason and "version 1" in reason
    assert m.active is None and m.results["expired"] == 1 and json.loads(m.changes.store.meta[META_KEY]) is None
    # the cool-down: a flood right after gets nothing until it has passed
    feed(m, [flood(i) for i in range(10, 20)])
    assert len(m.changes.applied) == 2
    m.clock_.t += 300
    feed(m, [flood(i) for i in range(20, 23)])
    assert len(m.changes.applied) == 3


def test_expiry_after_the_operator_changed_the_rule_set_takes_out_only_its_own_change():
    m = mitigator()
    feed(m, [flood(i) for i in range(3)])
    # the operator tightens 'web' on top of the mitigation
    api = dataclasses.replace(DENIED.rule("web"), limit=dataclasses.replace(DENIED.rule("web").limit, pps=20))
    mine = dataclasses.replace(DENIED, rules=tuple(api if r.name == "web" else r for r in DENIED.rules))
    m.changes.operator(mine)
    m.clock_.t += 600
    m.step()
    v, rs, reason, author, kw = m.changes.applied[-1]
    assert v == 4 and author == AUTHOR
    assert rs.deny == () and rs.rule("web").limit.pps == 20  # the operator's change stays
    assert "taken out of version 3" in reason and m.results["expired"] == 1


def test_when_the_operator_removed_the_mitigation_it_stands_down_and_says_why():
    m = mitigator()
    feed(m, [flood(i) for i in range(3)])
    m.changes.operator(BASE)  # e.g. a rollback to version 1's rules
    m.step()
    assert len(m.changes.applied) == 2 and m.active is None and m.results["stood-down"] == 1
    action, result, author, detail, version = m.changes.store.audits[-1]
    assert (action, result, author, version) == ("auto-mitigate-end", "stood-down", AUTHOR, 3)
    assert "no longer holds" in detail and "deny 198.18.0.0/16" in detail


def test_a_guard_rollback_ends_it_and_starts_the_cool_down():
    m = mitigator()
    feed(m, [flood(i) for i in range(3)])
    m.changes.guard.outcome, m.changes.guard.cause = "rolled-back", "canary 10.0.0.1 was dropped"
    m.agent.kf.version = 1  # the guard rolled back to version 1
    m.step()
    assert m.active is None and m.results["rolled-back"] == 1
    assert "canary 10.0.0.1" in m.changes.store.audits[-1][3]
    feed(m, [flood(i) for i in range(10, 20)])
    assert len(m.changes.applied) == 1


@pytest.mark.parametrize("case", ["known-drop", "refused", "nothing"])
def test_a_declined_or_refused_attempt_is_audited_and_cools_down(case):
    prop = {"known-drop": proposal(known_drop=0.02), "nothing": {"action": "none", "reason": "rule does not limit"},
            "refused": proposal()}[case]  # fmt: skip
    m = mitigator(prop=prop)
    if case == "refused":
        m.changes.refuse = "refused by the blast-radius check: canary 10.0.0.1 is on the deny list"
    feed(m, [flood(i) for i in range(10)])
    assert m.changes.applied == [] and len(m.calls) == 1
    result = "refused" if case == "refused" else "declined"
    assert m.results[result] == 1
    action, res, author, detail, _ = m.changes.store.audits[-1]
    assert (action, res, author) == ("auto-mitigate", result, AUTHOR) and detail


def test_an_agent_restarted_without_the_flag_still_expires_the_mitigation_it_finds():
    store = Store()
    first = mitigator(Agent(store))
    feed(first, [flood(i) for i in range(3)])
    agent = Agent(store)
    agent.kf.version, agent.changes.sets = 2, dict(first.changes.sets)
    again = mitigator(agent, enabled=False)
    again.clock_.t = first.clock_.t + 600
    again.step()
    v, rs, _reason, author, _ = agent.changes.applied[-1]
    assert v == 3 and rs is BASE and author == AUTHOR and again.active is None


# ---------------------------------------------------- its own change
def test_own_change_is_its_deny_entries_and_the_limits_it_set():
    lim = dataclasses.replace(BASE.rule("sink"), limit=dataclasses.replace(BASE.rule("sink").limit, pps=40))
    after = dataclasses.replace(DENIED, rules=tuple(lim if r.name == "sink" else r for r in BASE.rules))
    ch = own_change(BASE, after)
    assert [(c[0], c[1] if c[0] != "deny" else str(c[1])) for c in ch] == [("deny", "198.18.0.0/16"),
                                                                          ("sink", "limit")]  # fmt: skip
    assert still_held(after, ch) == ch and still_held(BASE, ch) == []
    assert undo(after, ch) == BASE
    # a limit the operator set to another value is theirs now: left as it is
    theirs = dataclasses.replace(lim, limit=dataclasses.replace(lim.limit, pps=7))
    op = dataclasses.replace(after, rules=tuple(theirs if r.name == "sink" else r for r in after.rules))
    assert undo(op, ch).rule("sink").limit.pps == 7 and undo(op, ch).deny == ()
