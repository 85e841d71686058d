"""The change service: apply, rollback, set-limit, promote and shadow
(load, clear), each a method on a parsed rule set (ruleset.model.RuleSet).

Its clients are the gRPC adapter (api/service.py), the SIGHUP reloader
(daemon/reload.py), the quick block list (changes/blocklist.py) and the
fleet host agent (fleet/hostagent.py); a fleet apply is the same apply an
operator runs. Its collaborators are handed in: the kernel filter, the
version store, the sampler (read by the blast-radius estimate), the
post-deployment reviews, the agent's options (budgets, guard defaults) and
a guard factory. One change at a time: every change holds the change lock.

Nothing is written to the kernel before a rule set has validated and
passed the blast-radius check; a failed write leaves the kernel as it was
and the store's version aborted. Every refusal is counted and audited
(`rejected-<action>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
import time
from typing import Callable, Iterator

from tidegate.operation import ApplyOutcome, Caller, OperationError
from tidegate.kernel.filter import KernelError, NotAttachedError
from tidegate.ruleset.dump import dump_yaml
from tidegate.ruleset.model import FieldError, Limit, RuleSet, RuleSetError, network_count
from tidegate.ruleset.parse import parse_rule_set, rule_set_from_dict
from tidegate.safety import estimate as safety
from tidegate.store import VersionNotFound

log = logging.getLogger("tidegate.changes.service")

# Parsed versions kept in memory besides the kernel's active and shadow ones
# (always kept): the most recently used, at most RULE_SETS_KEPT of them and
# NETWORKS_KEPT networks between them. Four kept 100,000-CIDR versions were
# most of the agent's memory after a run of such applies (204 MB;
# bench/agent_process.py, "after the applies of new 100,000-CIDR sets"). A
# version not kept is parsed again from the store when it is asked for (a
# rollback to it: ~60 ms of parsing at 100,000 CIDRs).
RULE_SETS_KEPT = 4
NETWORKS_KEPT = 50_000

# guard_factory(version, rule_set, seconds, caller, rollback) -> a started-able safety.guard.Guard
GuardFactory = Callable[..., object]

_pauses = 0  # changes under way with the collector paused
_pause_lock = threading.Lock()
_resume = False  # the collector ran before the first of them paused it
_until_sweep = 0  # pauses left before what was set aside is swept
SWEEP_EVERY = 1000


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic collector kept away from what a change builds.

    Almost everything a change allocates while it parses a rule set and
    builds its kernel entries (a network, its key and its text per CIDR)
    lives on as the new version, so the collections those allocations set
    off free nothing, and each one walks all of it again: ~40% of a
    100,000-CIDR apply, and a full collection of every live rule set now
    and then after it. So the first pause under way collects what is
    collectable now, then pauses the collector; the last one to end moves
    every object alive (the new version's among them) out of the
    collector's sight, as start-up does with its own (daemon/memory.py),
    and resumes it. A rule set's objects hold no reference cycles:
    reference counting frees each one when its version is dropped. The
    pauses cover the parse and the kernel write only.
    What other threads leave in cycles during a pause is set aside too, so
    every SWEEP_EVERY pauses everything is brought back and collected once
    (a full collection: ~0.1 s with four 100,000-CIDR versions kept)."""
    global _pauses, _resume, _until_sweep
    with _pause_lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            if _resume:
                if _until_sweep == 0:
                    gc.unfreeze()
                    _until_sweep = SWEEP_EVERY
                _until_sweep -= 1
                gc.collect()  # the cycles made since the last pause (after a sweep, all of them)
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.freeze()
                gc.enable()


@dataclasses.dataclass(eq=False)
class ChangeService:
    kf: object  # kernel.filter.KernelFilter
    store: object  # store.VersionStore
    sampler: object  # observation.sampler.Sampler: the estimate's window
    options: object  # the agent's options: budgets, --no-blast-check, guard defaults, --estimate-window
    reviews: object  # safety.review.Reviews: told of every activation
    guard_factory: GuardFactory

    def __post_init__(self):
        self.on_attached: list[Callable[[], None]] = []  # told after an apply attached the program (health)
        self._change = threading.RLock()
        self.change_results: dict[str, int] = {"ok": 0, "rejected": 0, "error": 0}
        self.rollbacks: dict[str, int] = {}
        self.guard = None  # the last guard started (safety.guard.Guard)
        self._rule_sets: dict[int, RuleSet] = {}
        self._last_parsed: tuple[str, RuleSet] | None = None  # the last text that validated, and its rule set
        self.shadow_loaded_at: float | None = None

    # ------------------------------------------------------------- versions
    def rule_set_of(self, version: int) -> RuleSet:
        rs = self._rule_sets.pop(version, None)
        if rs is None:
            rec = self.store.get_version(version)
            rs = parse_rule_set(rec.content, f"version {version}")
        self._keep(version, rs)
        return rs

    def _keep(self, version: int, rs: RuleSet) -> None:
        """Remember a parsed version, most recently used last; beyond the
        kernel's own, only what RULE_SETS_KEPT and NETWORKS_KEPT allow
        stays (the most recent first)."""
        self._rule_sets[version] = rs
        in_kernel = (self.kf.active_version(), self.kf.shadow_version())
        count, networks = 0, 0
        for old in reversed([v for v in self._rule_sets if v not in in_kernel]):
            n = network_count(self._rule_sets[old])
            if count < RULE_SETS_KEPT and networks + n <= NETWORKS_KEPT:
                count, networks = count + 1, networks + n
            else:
                del self._rule_sets[old]

    def active_rule_set(self) -> RuleSet | None:
        v = self.kf.active_version()
        return self.rule_set_of(v) if v else None

    def get_version(self, number: int):
        try:
            return self.store.get_version(number)
        except VersionNotFound:
            raise OperationError("NOT_FOUND", f"version {number} does not exist") from None

    def require_loaded(self) -> None:
        if self.kf.active_version() is None:
            raise OperationError("FAILED_PRECONDITION", "no rule set is active: apply one first (tidegate apply FILE)")

    def attached(self) -> bool:
        try:
            return self.kf.state().attached
        except NotAttachedError:
            return False

    # ------------------------------------------------------- what comes in
    def validate(self, text: str, source: str) -> RuleSet:
        """A rule set sent as text, parsed and validated; RuleSetError when it is not one (nothing is counted)."""
        return parse_rule_set(text, source or "<request>")

    def parse(self, text: str, source: str, caller: Caller, action: str) -> RuleSet:
        """A rule set a client sent as text; one that does not validate is a refused change (audited).
        The same text as the last one that validated gives that rule set again (a rule set is
        immutable, and parsing is a function of the text alone): applying one file again and
        again (config management, a fleet member catching up) does not parse it each time."""
        last = self._last_parsed
        if last is not None and last[0] == text:
            return last[1]
        try:
            with collector_paused():
                rs = parse_rule_set(text, source or "<request>")
            self._last_parsed = (text, rs)
            return rs
        except RuleSetError as e:
            self.rejected(action, caller, str(e))
            raise OperationError("INVALID_ARGUMENT", f"invalid rule set: {len(e.errors)} error(s)\n{e}",
                                 e.errors, e.source) from None  # fmt: skip

    def revise(self, rs: RuleSet | dict, source: str, caller: Caller, action: str) -> RuleSet:
        """A rule set a client changed as a model (dataclasses.replace) or as plain
        data (RuleSet.to_dict), validated again the way a file is; one that does not
        validate is a refused change."""
        try:
            return rule_set_from_dict(rs if isinstance(rs, dict) else rs.to_dict(), source)
        except RuleSetError as e:
            self.rejected(action, caller, str(e))
            raise OperationError("INVALID_ARGUMENT", f"invalid rule set: {len(e.errors)} error(s)\n{e}",
                                 e.errors, e.source) from None  # fmt: skip

    def rejected(self, action: str, caller: Caller, detail: str, version: int | None = None) -> None:
        self.change_results["rejected"] += 1
        self.store.audit(f"rejected-{action}", "rejected", caller.author, caller.peer, detail[:4000], version)
        log.info("change rejected", extra={"action": action, "author": caller.author, "detail": detail[:200]})

    def what_if(self, rs: RuleSet) -> tuple[safety.Estimate, list[str]]:
        """What applying `rs` now would newly drop, and the problems that would refuse it; changes nothing."""
        self.require_loaded()
        est = safety.estimate(self, rs)
        return est, safety.check(self, rs, est)

    # ------------------------------------------------------------- changes
    def apply(self, rs: RuleSet, reason: str, caller: Caller, *, shadow: bool = False, force: bool = False,
              guard: bool | None = None, guard_seconds: int = 0, wait_for_guard: bool = False,
              source: str = "apply", spare=None, spared: Callable | None = None) -> ApplyOutcome:  # fmt: skip
        """Apply (or, with shadow, load as the shadow set) a validated rule set
        as a new version; `source` names the change in the store and the audit.
        `spare` (SourceRates) and `spared` (source keys -> mask), for a change
        meant to drop a flood (changes/mitigation.py): the blast-radius check
        runs on the traffic of the sources to spare, and the guard counts only
        their drops as harm."""
        if not reason.strip():
            self.rejected(source, caller, "no reason given")
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)",
                                 [FieldError("reason", None, "is required")])  # fmt: skip
        if force and len(reason.strip()) < 3:
            raise OperationError("INVALID_ARGUMENT", "--force needs a real reason (it is audited)")
        with self._change:
            estimate = None
            active = self.active_rule_set()
            if not shadow and active is not None:
                estimate = safety.estimate(self, rs, spare)
                problems = safety.check(self, rs, estimate)
                if problems and not force:
                    msg = "refused by the blast-radius check: " + "; ".join(problems)
                    self.rejected(source, caller, msg)
                    raise OperationError("FAILED_PRECONDITION", msg + " (use --force with a reason to override)",
                                         estimate=estimate)  # fmt: skip
                if problems:
                    self.store.audit("force", "ok", caller.author, caller.peer, "; ".join(problems) + f" | {reason}")
            version = self._write(rs, reason, caller, shadow, source)
            if shadow:
                self.store.mark_shadow(version, caller.author, caller.peer)
                self.shadow_loaded_at = time.monotonic()
                self.change_results["ok"] += 1
                log.info("shadow loaded", extra={"version": version, "author": caller.author})
                return ApplyOutcome(version, shadow=True)
            self.store.commit_active(version, source, caller.author, reason, caller.peer)
            self.reviews.activated(version, source)
            self.change_results["ok"] += 1
            log.info("applied", extra={"version": version, "author": caller.author, "reason": reason})
            if not self.attached():
                mode = self.kf.attach()
                log.info("attached", extra={"interface": self.kf.config.interface, "mode": mode})
                for tell in self.on_attached:
                    tell()
            outcome = ApplyOutcome(version, estimate=estimate)
            use_guard = self.options.guard_default if guard is None else guard
            if use_guard and active is not None:
                g = self.guard_factory(version, rs, guard_seconds or self.options.guard_seconds, caller, self.rollback,
                                       **({"spared": spared} if spared is not None else {}))
                self.guard = g
                g.start()
                outcome.guarded = True
                outcome.guard_outcome = "watching"
        if outcome.guarded and wait_for_guard:
            g.wait()
            outcome.guard_outcome = g.outcome
            outcome.guard_cause = g.cause
            outcome.rolled_back_to = g.rolled_back_to
        return outcome

    def _write(self, rs: RuleSet, reason: str, caller: Caller, shadow: bool, source: str) -> int:
        """A new version in the store, written into the kernel; a failed write aborts the version."""
        version = self.store.begin_version(dump_yaml(rs), rs.digest(), caller.author, reason, source)
        try:
            with collector_paused():  # the kernel entries it builds live on with the slot
                if shadow:
                    self.kf.load_shadow(rs, version)
                else:
                    self.kf.apply(rs, version)
        except KernelError as e:
            self.store.abort_version(version, str(e))
            self.change_results["error"] += 1
            self.store.audit(source, "error", caller.author, caller.peer, str(e), version)
            old_shadow = self.store.shadow_version()
            if shadow and old_shadow is not None and self.kf.shadow_version() is None:
                # the shadow set it was to replace is unloaded already: the store follows the kernel
                self.store.abort_version(old_shadow, f"unloaded: loading version {version} in its place failed")
                self.shadow_loaded_at = None
            raise OperationError("INTERNAL", f"writing the rule set into the kernel failed: {e}") from None
        self._keep(version, rs)
        return version

    def rollback(self, to_version: int | None, reason: str, caller: Caller, cause: str = "manual") -> ApplyOutcome:
        if cause == "manual" and not reason.strip():
            self.rejected("rollback", caller, "no reason given")
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)",
                                 [FieldError("reason", None, "is required")])  # fmt: skip
        with self._change:
            current = self.kf.active_version()
            target = to_version or self.store.previous_active(current)
            if not target:
                raise OperationError("FAILED_PRECONDITION", "there is no earlier version to roll back to")
            rec = self.get_version(target)
            if rec.state not in ("applied", "shadow"):
                raise OperationError("FAILED_PRECONDITION",
                                     f"version {target} is {rec.state} and was never active; apply it instead")  # fmt: skip
            if target == current:
                raise OperationError("FAILED_PRECONDITION", f"version {target} is already active")
            rs = self.rule_set_of(target)
            try:
                self.kf.apply(rs, target)
            except KernelError as e:
                self.change_results["error"] += 1
                self.store.audit("rollback", "error", caller.author, caller.peer, str(e), target)
                raise OperationError("INTERNAL", f"writing the rule set into the kernel failed: {e}") from None
            self.store.commit_active(target, "rollback", caller.author, reason or f"rollback ({cause})", caller.peer)
            self.reviews.activated(target, "rollback", cause)
            self.rollbacks[cause] = self.rollbacks.get(cause, 0) + 1
            self.change_results["ok"] += 1
            log.info("rolled back", extra={"from": current, "to": target, "cause": cause, "author": caller.author})
            return ApplyOutcome(target)

    def set_limit(self, rule: str, pps: int, burst: int, bps: int, reason: str, caller: Caller,
                  force: bool = False) -> ApplyOutcome:  # fmt: skip
        """The active set with one limit changed (a rule's, or 'default'); the
        other rules keep the limits they have, inherited ones included."""
        with self._change:
            active = self.active_rule_set()
            if active is None:
                raise OperationError("FAILED_PRECONDITION", "no rule set is active")
            if rule == "default":
                changed = dataclasses.replace(active, defaults=dataclasses.replace(
                    active.defaults, limit=new_limit(pps, burst, bps, active.defaults.limit)))  # fmt: skip
            else:
                old = active.rule(rule)
                if old is None:
                    names = ", ".join(r.name for r in active.rules) or "(none)"
                    raise OperationError("NOT_FOUND", f"no rule named {rule!r} in the active set (rules: {names}; "
                                         "use 'default' for the default limit)")  # fmt: skip
                if old.action != "limit":
                    raise OperationError("FAILED_PRECONDITION", f"rule {rule!r} has action {old.action}")
                new = dataclasses.replace(old, limit=new_limit(pps, burst, bps, old.limit))
                changed = dataclasses.replace(active, rules=tuple(new if r is old else r for r in active.rules))
            try:  # the model validated as a file is: a limit out of range is refused the same way
                rs = rule_set_from_dict(changed.to_dict(), "set-limit")
            except RuleSetError as e:
                raise OperationError("INVALID_ARGUMENT", str(e), e.errors, e.source) from None
        return self.apply(rs, reason, caller, force=force, source="set-limit")

    def promote(self, reason: str, caller: Caller) -> ApplyOutcome:
        with self._change:
            shadow = self.kf.shadow_version()
            if shadow is None:
                raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded (tidegate apply --shadow)")
            try:
                self.kf.promote_shadow()
            except KernelError as e:
                self.change_results["error"] += 1
                self.store.audit("promote", "error", caller.author, caller.peer, str(e), shadow)
                raise OperationError("INTERNAL", f"promoting the shadow set failed: {e}") from None
            self.store.commit_active(shadow, "promote", caller.author, reason or "promote shadow", caller.peer)
            self.reviews.activated(shadow, "promote")
            self.shadow_loaded_at = None
            self.change_results["ok"] += 1
            log.info("promoted", extra={"version": shadow, "author": caller.author})
            return ApplyOutcome(shadow)

    def clear_shadow(self, reason: str, caller: Caller) -> int:
        with self._change:
            shadow = self.kf.shadow_version()
            if shadow is None:
                raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded")
            self.kf.clear_shadow()
            self.store.abort_version(shadow, f"shadow cleared by {caller.author}: {reason}")
            self.store.audit("shadow-clear", "ok", caller.author, caller.peer, reason, shadow)
            self.shadow_loaded_at = None
            return shadow


def new_limit(pps: int, burst: int, bps: int, old: Limit | None) -> Limit:
    """set-limit's limit: burst defaults to pps; without bps the byte limit the rule had stays."""
    if bps:
        return Limit(pps, burst or pps, bps)  # bits per second, as in rule sets
    if old is not None and old.bps:
        return Limit(pps, burst or pps, old.bps, old.burst_bytes or None)
    return Limit(pps, burst or pps)
