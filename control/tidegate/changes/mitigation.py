"""Auto-mitigation (`tidegate agent --auto-mitigate`, off by default): the
agent applies the insight proposal itself when a flood reading lasts.

- It acts on `--auto-mitigate-readings` consecutive readings (default 3,
  one per sample) whose verdict is flood, mixed or heavy-hitter with a
  confidence of at least `--auto-mitigate-confidence` (default 0.7); any
  other reading, a stale one or a weaker one starts the count again. A surge
  or a flash crowd never counts, and its proposal is "nothing" anyway.
- The proposal's what-if must drop at most `--auto-mitigate-known-drop`
  (default 0) of the known sources' packets and of the known sources; then
  it goes through the change service's apply with the blast-radius check
  and the budgets of every apply (never forced), run against the known
  sources' traffic: the flood is what the change is meant to drop.
- It always runs under the guard of `apply --guard`, told to count only the
  known sources' drops as harm (and any canary), for the shorter of
  `--guard-seconds` and the TTL.
- Its versions are audited as author `agent:insight`, with the reading's
  figures in the reason.
- After `--auto-mitigate-ttl` (default 10m) it expires as a new version by
  `agent:insight`: the rule set active before it, when it is still the
  active version. When the operator changed the rule set meanwhile, only the
  mitigation's own change is taken out of the operator's set (its deny
  entries, and each limit it set that still has the value it set); when
  nothing of it is left, it stands down and audits why. Nothing else of the
  operator's is touched.
- One mitigation at a time; after it ends (expired, rolled back by the
  guard, removed by the operator) and after a declined or refused attempt,
  `--auto-mitigate-cooldown` (default 5m) passes before the next attempt.

The active mitigation is kept in the store (meta key `auto-mitigation`), so
an agent restarted, with or without the flag, still expires it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Callable

from tidegate.operation import Caller, OperationError
from tidegate.periodic import Periodic
from tidegate.ruleset.model import RuleSet

log = logging.getLogger("tidegate.changes.mitigation")

AUTHOR = "agent:insight"
META_KEY = "auto-mitigation"
ATTACKS = ("flood", "mixed", "heavy-hitter")
RESULTS = ("applied", "declined", "refused", "expired", "rolled-back", "stood-down")
RETRY_SECONDS = 30.0  # after a refused expiry


@dataclasses.dataclass
class Policy:
    """The agent's --auto-mitigate options."""

    enabled: bool = False
    readings: int = 3
    confidence: float = 0.7
    known_drop: float = 0.0
    ttl: float = 600.0
    cooldown: float = 300.0
    guard_seconds: int = 60

    @classmethod
    def of(cls, options) -> Policy:
        return cls(options.auto_mitigate, options.auto_mitigate_readings, options.auto_mitigate_confidence,
                   options.auto_mitigate_known_drop, options.auto_mitigate_ttl, options.auto_mitigate_cooldown,
                   options.guard_seconds)  # fmt: skip


class Streak:
    """Consecutive readings that call for a mitigation; each reading (one per
    sample, told apart by its newest interval) is counted once."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.count = 0
        self._last = None

    def add(self, reading: dict | None) -> bool:
        """Fold in the latest reading; True when the streak is long enough."""
        if not reading or "verdict" not in reading:
            return False
        key = reading.get("newest_interval_start")
        if key == self._last:
            return self.count >= self.policy.readings
        self._last = key
        if (reading["verdict"] in ATTACKS and reading.get("confidence", 0) >= self.policy.confidence
                and not reading.get("stale")):  # fmt: skip
            self.count += 1
        else:
            self.count = 0
        return self.count >= self.policy.readings

    def reset(self) -> None:
        self.count = 0


def decline(proposal: dict, policy: Policy) -> str | None:
    """Why a proposal is not applied by itself, or None when it may be."""
    if proposal.get("action", "none") == "none":
        return f"no change proposed: {proposal.get('reason', '')}"
    w = proposal["what_if"]
    worst = max(w["known_packet_share_dropped"], w["known_source_share_dropped"])
    if worst > policy.known_drop:
        return (f"its what-if drops {w['known_packet_share_dropped']:.2%} of known sources' packets and "
                f"{w['known_source_share_dropped']:.2%} of known sources, over the auto-mitigation budget of "
                f"{policy.known_drop:.2%}")  # fmt: skip
    return None


def reason_of(reading: dict, proposal: dict) -> str:
    """The audited reason: the reading's figures and what the change does."""
    w = proposal["what_if"]
    return (f"auto-mitigation of a {reading['verdict']} reading (confidence {reading['confidence']:.0%}): "
            f"{reading['pps']:,.0f} pps, {reading['known_source_packet_share']:.0%} from known sources, "
            f"{reading['new_sources']:,} new of {reading['sources']:,} sources in {reading['window_seconds']:g} s; "
            f"{proposal['action']}: {proposal['reason']}; what-if: drops {w['flood_packet_share_dropped']:.0%} "
            f"of the flood's packets, {w['known_packet_share_dropped']:.2%} of known sources' packets")  # fmt: skip


# --------------------------------------------- the mitigation's own change
def own_change(before: RuleSet, after: RuleSet) -> list[tuple[str, str, object, object]]:
    """What the mitigation changed: (where, field, before, after) for each
    limit (where: "defaults" or a rule's name; field: limit or prefix_limit;
    values as the model resolves them), and ("deny", network, False, True)
    for each deny entry it added."""
    out: list = [("deny", n, False, True) for n in after.deny if n not in before.deny]
    for f in ("limit", "prefix_limit"):
        if getattr(before.defaults, f) != getattr(after.defaults, f):
            out.append(("defaults", f, getattr(before.defaults, f), getattr(after.defaults, f)))
    for r in after.rules:
        old = before.rule(r.name)
        for f in ("limit", "prefix_limit"):
            if old is not None and getattr(old, f) != getattr(r, f):
                out.append((r.name, f, getattr(old, f), getattr(r, f)))
    return out


def _value(rs: RuleSet, where: str, f: str):
    if where == "deny":
        return f in rs.deny
    holder = rs.defaults if where == "defaults" else rs.rule(where)
    return getattr(holder, f) if holder is not None else None


def still_held(rs: RuleSet, change: list) -> list:
    """The parts of the change `rs` still holds as the mitigation set them."""
    return [c for c in change if _value(rs, c[0], c[1]) == c[3]]


def undo(rs: RuleSet, change: list) -> RuleSet:
    """`rs` with the parts of the change it still holds put back as they were."""
    held = still_held(rs, change)
    gone = {c[1] for c in held if c[0] == "deny"}
    rs = dataclasses.replace(rs, deny=tuple(n for n in rs.deny if n not in gone))
    for where, f, old, _new in held:
        if where == "defaults":
            rs = dataclasses.replace(rs, defaults=dataclasses.replace(rs.defaults, **{f: old}))
        elif where != "deny":
            rs = dataclasses.replace(rs, rules=tuple(dataclasses.replace(r, **{f: old}) if r.name == where else r
                                                     for r in rs.rules))  # fmt: skip
    return rs


def describe(change: list) -> str:
    parts = []
    for where, f, _old, new in change:
        parts.append(f"deny {f}" if where == "deny" else f"{where}.{f} = {_short(new)}")
    return ", ".join(parts) or "nothing"


def _short(v) -> str:
    if v is None:
        return "none"
    lim = getattr(v, "limit", v)
    pfx = f"/{v.ipv4_prefix} " if hasattr(v, "ipv4_prefix") else ""
    return f"{pfx}{lim.pps} pps"


# ------------------------------------------------------------- the agent's side
class Mitigator:
    """Watches the readings, applies, ends and expires one mitigation.

    `agent` gives changes (the ChangeService), insight (latest reading,
    known sources), kf and options; `propose(agent, reading)` is
    safety.propose.propose and `spared(agent, reading)` answers (the known
    sources' rates for the blast-radius check, a keys -> mask predicate for
    the guard)."""

    def __init__(self, agent, policy: Policy, propose: Callable, spared: Callable,
                 clock: Callable[[], float] = time.time, interval: float = 1.0):  # fmt: skip
        self.agent = agent
        self.changes = agent.changes
        self.store = agent.changes.store
        self.policy = policy
        self.propose = propose
        self.spared = spared
        self.clock = clock
        self.job = Periodic("tidegate-auto-mitigate", interval, self.step, log, "auto-mitigation step failed")
        self.streak = Streak(policy)
        self.results: dict[str, int] = {r: 0 for r in RESULTS}
        self.quiet_until = 0.0  # the cool-down's end (clock time)
        self.retry_at = 0.0
        self.guard = None  # the guard of the active mitigation
        self.active: dict | None = json.loads(self.store.get_meta(META_KEY) or "null")
        self._change: list | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ state
    def _save(self) -> None:
        self.store.set_meta(META_KEY, json.dumps(self.active, sort_keys=True) if self.active else "null")

    def change(self) -> list:
        """The active mitigation's own change (worked out from the store's two versions)."""
        if self._change is None:
            a = self.active
            self._change = own_change(self.changes.rule_set_of(a["previous"]), self.changes.rule_set_of(a["version"]))
        return self._change

    def _end(self, result: str, detail: str, version: int | None = None) -> None:
        a = self.active
        self.store.audit("auto-mitigate-end", result, AUTHOR, "insight", detail, version or a["version"])
        log.info("auto-mitigation ended", extra={"version": a["version"], "result": result, "detail": detail})
        self.results[result] += 1
        self.active, self._change, self.guard = None, None, None
        self._save()
        self.quiet_until = self.clock() + self.policy.cooldown
        self.streak.reset()

    def summary(self) -> dict | None:
        """The active mitigation, for status."""
        a = self.active
        if not a:
            return None
        return {"version": a["version"], "previous_version": a["previous"], "action": a["action"],
                "rule": a.get("rule", ""), "reason": a["reason"],
                "expires_in_seconds": max(0.0, a["expires"] - self.clock()),
                "guard_outcome": self.guard.outcome if self.guard is not None else ""}  # fmt: skip

    # ------------------------------------------------------------ one tick
    def step(self) -> None:
        with self._lock:
            if self.active:
                self._follow()
                return
            ready = self.streak.add(self.agent.insight.latest)
            if not self.policy.enabled or not ready or self.clock() < self.quiet_until:
                return
            self._mitigate(self.agent.insight.latest)

    def _follow(self) -> None:
        """An active mitigation: ended by the guard or the operator, or expired."""
        a = self.active
        current = self.agent.kf.active_version()
        if current != a["version"]:
            g = self.guard
            if g is not None and g.version == a["version"] and g.outcome == "rolled-back":
                self._end("rolled-back", f"the guard rolled version {a['version']} back: {g.cause}", current)
                return
            if not still_held(self.changes.active_rule_set(), self.change()):
                self._end("stood-down", f"version {current} no longer holds the mitigation's change "
                                        f"({describe(self.change())}): nothing to undo", current)  # fmt: skip
                return
        now = self.clock()
        if now >= a["expires"] and now >= self.retry_at:
            self._expire(current)

    def _expire(self, current: int) -> None:
        a = self.active
        caller = Caller(AUTHOR, "insight")
        ttl = f"{self.policy.ttl:g} s"
        if current == a["version"]:
            rs = self.changes.rule_set_of(a["previous"])
            why = (f"auto-mitigation version {a['version']} expired after {ttl}: the rule set of version "
                   f"{a['previous']}, active before it")  # fmt: skip
        else:
            rs = self.changes.revise(undo(self.changes.active_rule_set(), self.change()), "auto-mitigation expiry",
                                     caller, "auto-mitigate-expire")  # fmt: skip
            why = (f"auto-mitigation version {a['version']} expired after {ttl}: its own change "
                   f"({describe(still_held(self.changes.active_rule_set(), self.change()))}) taken out of "
                   f"version {current}, which the operator made meanwhile; the rest of it stays")  # fmt: skip
        try:
            out = self.changes.apply(rs, why, caller, guard=False, source="auto-mitigate-expire")
        except OperationError as e:
            self.retry_at = self.clock() + RETRY_SECONDS
            self.store.audit("auto-mitigate-expire", "error", AUTHOR, "insight", f"{e.message}; retrying", current)
            log.error("auto-mitigation expiry refused; retrying", extra={"error": e.message})
            return
        self._end("expired", f"{why}: version {out.version}", out.version)

    def _mitigate(self, reading: dict) -> None:
        proposal = self.propose(self.agent, reading)
        why_not = decline(proposal, self.policy)
        if why_not is not None:
            self._decline("declined", why_not)
            return
        caller = Caller(AUTHOR, "insight")
        rates, spared = self.spared(self.agent, reading)
        previous = self.agent.kf.active_version()
        try:
            rs = self.changes.validate(proposal["rule_set"], "auto-mitigation")
            out = self.changes.apply(rs, reason_of(reading, proposal), caller, guard=True, source="auto-mitigate",
                                     guard_seconds=int(max(1, min(self.policy.guard_seconds, self.policy.ttl))),
                                     spare=rates, spared=spared)  # fmt: skip
        except OperationError as e:
            self._decline("refused", e.message)
            return
        g = self.changes.guard
        self.guard = g if g is not None and g.version == out.version else None
        self.active = {"version": out.version, "previous": previous, "action": proposal["action"],
                       "rule": proposal.get("rule", ""), "reason": proposal["reason"], "started": self.clock(),
                       "expires": self.clock() + self.policy.ttl}  # fmt: skip
        self._save()
        self.results["applied"] += 1
        self.streak.reset()
        log.warning("auto-mitigation applied", extra={"version": out.version, "action": proposal["action"],
                                                      "ttl": self.policy.ttl})  # fmt: skip

    def _decline(self, result: str, why: str) -> None:
        self.results[result] += 1
        self.store.audit("auto-mitigate", result, AUTHOR, "insight", why[:4000])
        log.info("auto-mitigation not applied", extra={"result": result, "why": why[:200]})
        self.quiet_until = self.clock() + self.policy.cooldown
        self.streak.reset()

    # ------------------------------------------------------------ thread
    def start(self) -> None:
        self.job.start()

    def stop(self) -> None:
        self.job.stop()

