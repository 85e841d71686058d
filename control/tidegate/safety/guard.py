"""The guard that rolls back by itself, and the counter history it and the
post-deployment reviews (review.py) read.

A guard watches one freshly applied version for a while. It reads the
counter history, the sampler's intervals and the kernel's source table; it
is handed the rollback to call (the change service's) and whom to tell when
it fires, so it never reaches for the agent."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tidegate.operation import Caller, OperationError
from tidegate.kernel.layout import DROP_REASONS
from tidegate.observation.window import DroppedSince, SourceWindow

log = logging.getLogger("tidegate.safety.guard")


# ------------------------------------------------------------------ history
class CounterHistory:
    """Global counters every second (8 per-CPU reads): the guard's baseline
    and the post-deployment review read it. Bounded: one entry a second for
    the review period plus a little."""

    def __init__(self, kf, keep_seconds: float = 3900.0, step: float = 1.0):
        self.kf = kf
        self.step = step
        self._ring: deque[tuple[float, dict]] = deque(maxlen=int(keep_seconds / step) + 10)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="counter-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.take()
            except Exception:
                pass
            self._stop.wait(self.step)

    def take(self) -> tuple[float, dict]:
        c = self.kf.counters()
        snap = {r: p for r, (p, _) in c.reasons.items()}
        snap["_rules"] = {n: (rc.pass_packets, rc.drop_packets) for n, rc in c.rules.items()}
        item = (time.monotonic(), snap)
        with self._lock:
            self._ring.append(item)
        return item

    def between(self, t0: float, t1: float) -> dict | None:
        """Counter deltas between the samples nearest to t0 and t1."""
        with self._lock:
            items = list(self._ring)
        if len(items) < 2:
            return None
        a = min(items, key=lambda it: abs(it[0] - t0))
        b = min(items, key=lambda it: abs(it[0] - t1))
        if b[0] <= a[0]:
            return None
        out = {k: b[1][k] - a[1].get(k, 0) for k in b[1] if k != "_rules"}
        out["_seconds"] = b[0] - a[0]
        rules = {}
        for n, (p, dr) in b[1]["_rules"].items():
            p0, d0 = a[1]["_rules"].get(n, (0, 0))
            rules[n] = (p - p0, dr - d0)
        out["_rules"] = rules
        return out




def drop_share(delta: dict | None) -> tuple[float, int]:
    if not delta:
        return 0.0, 0
    total = sum(v for k, v in delta.items() if not k.startswith("_"))
    drops = sum(delta.get(r, 0) for r in DROP_REASONS)
    return (drops / total if total else 0.0), total


def counter_summary(delta: dict | None) -> dict | None:
    """A counter delta as a review shows it: rates by reason and rule, the drop share."""
    if not delta:
        return None
    secs = delta["_seconds"]
    share, total = drop_share(delta)
    return {
        "seconds": round(secs, 1),
        "pps": round(total / secs, 2) if secs else 0,
        "drop_share": round(share, 4),
        "by_reason_pps": {k: round(v / secs, 2) for k, v in delta.items() if not k.startswith("_") and secs},
        "by_rule_pps": {n: {"pass": round(p / secs, 2), "drop": round(d / secs, 2)}
                        for n, (p, d) in delta["_rules"].items() if p or d},  # fmt: skip
    }


# -------------------------------------------------------------------- guard
@dataclass
class GuardSight:
    """What a guard reads, whom it tells, and its limits (--guard-drop-increase,
    --guard-dropped-sources)."""

    kf: object  # active_version(), state()
    history: CounterHistory
    sampler: object  # intervals(seconds), intervals_since(t), interval
    audit: Callable  # the version store's audit(action, result, author, peer, detail, version)
    guard_fired: Callable[[int], None]  # the reviews hear of a rollback
    drop_increase: float
    dropped_sources: int


class Guard:
    """Watches a freshly applied version and rolls back when legitimate
    traffic suffers: the drop share rises past the pre-apply baseline, many
    more distinct sources are dropped than before, or a canary is dropped."""

    def __init__(self, sight: GuardSight, version: int, rule_set, seconds: int, caller,
                 rollback: Callable, spared: Callable | None = None):  # fmt: skip
        """`rule_set`: the version's own; `rollback(to, reason, caller, cause=...)`: the change
        service's, which answers with an ApplyOutcome or raises OperationError. `spared`
        (source keys -> mask): only these sources' drops are harm (a mitigation meant to
        drop a flood's other sources); their drop share comes from the sampler's intervals."""
        self.sight = sight
        self.spared = spared
        self.version = version
        self.seconds = seconds
        self.caller = caller
        self.rollback = rollback
        self.watching = False
        self.outcome = "watching"
        self.cause = ""
        self.rolled_back_to = 0
        self._done = threading.Event()
        self._cancel = threading.Event()
        self.started = time.monotonic()
        hist = sight.history
        if spared is None:
            self.baseline_share, self.baseline_packets = drop_share(hist.between(self.started - 30, self.started))
        else:
            self.baseline_share, self.baseline_packets = self._spared_share(self.started - 30)
        self.baseline_sources = self._dropped_sources_before()
        self.dropped = DroppedSince(self.started, rule_set.canaries)

    def _dropped_sources_before(self) -> int:
        return self._count(SourceWindow.of(self.sight.sampler, 60).dropped_sources())

    def _count(self, keys: np.ndarray) -> int:
        """Distinct sources among `keys` whose drops are harm."""
        return len(keys) if self.spared is None else int(np.count_nonzero(self.spared(keys)))

    def _spared_share(self, t: float) -> tuple[float, int]:
        """(drop share, packets) of the spared sources since `t`, from the sampler's intervals."""
        rows = SourceWindow(self.sight.sampler.intervals_since(t)).select(enforced=True)
        m = self.spared(rows.keys())
        packets = int(rows.packets[m].sum())
        return (float(rows.drops[m].sum()) / packets if packets else 0.0), packets

    def start(self) -> None:
        self.watching = True
        threading.Thread(target=self._run, name=f"guard-{self.version}", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        self._cancel.set()

    def _sources_cause(self, epoch: int) -> tuple[str, str] | None:
        """(kind, cause) when a canary or too many distinct sources were
        dropped since the change, as the sampler's intervals show it."""
        dropped = self.dropped.fold(self.sight.sampler.intervals_since(self.dropped.t), epoch)
        if dropped.network:
            return "canary", f"canary {dropped.network} was dropped"
        n = self._count(dropped.keys)
        if n - self.baseline_sources > self.sight.dropped_sources:
            return "dropped-sources", (f"{n} distinct sources dropped vs {self.baseline_sources} before "
                                       f"(limit +{self.sight.dropped_sources})")  # fmt: skip
        return None

    def _covered(self, t: float) -> bool:
        """The sampler has an interval that ends at `t` or later."""
        ivs = self.sight.sampler.intervals_since(t)
        return bool(ivs) and ivs[-1].t1 >= t

    def _run(self) -> None:
        sight = self.sight
        deadline = self.started + self.seconds
        try:
            while time.monotonic() < deadline and not self._cancel.is_set():
                time.sleep(1.0)
                now = time.monotonic()
                if sight.kf.active_version() != self.version:
                    self.outcome = "superseded"
                    return
                cause = None
                if self.spared is None:
                    share, packets = drop_share(sight.history.between(max(self.started, now - 5), now))
                else:
                    share, packets = self._spared_share(max(self.started, now - 5))
                if packets >= 50 and share - self.baseline_share > sight.drop_increase:
                    cause = (f"drop share {share:.1%} vs {self.baseline_share:.1%} before the change "
                             f"(limit +{sight.drop_increase:.0%})")  # fmt: skip
                found = self._sources_cause(sight.kf.state().active.epoch)
                kind = "drop-share"
                if found and (found[0] == "canary" or not cause):
                    kind, cause = found
                if cause:
                    self._roll_back(kind, cause)
                    return
            # drops late in the watch reach the sampler up to one sample later: wait for the sample
            # that covers the deadline (two sample intervals at most, in case the sampler stalls)
            wait = deadline + 2 * sight.sampler.interval + 2
            while not self._cancel.is_set() and time.monotonic() < wait and not self._covered(deadline):
                time.sleep(1.0)
                if sight.kf.active_version() != self.version:
                    self.outcome = "superseded"
                    return
                found = self._sources_cause(sight.kf.state().active.epoch)
                if found:
                    self._roll_back(*found)
                    return
            self.outcome = "kept" if not self._cancel.is_set() else "cancelled"
            sight.audit("guard", "ok", "guard", "agent", f"kept after {self.seconds}s", self.version)
        except Exception as e:  # never leave the guard silently dead
            log.exception("guard failed")
            self.outcome = "error"
            self.cause = str(e)
        finally:
            self.watching = False
            self._done.set()

    def _roll_back(self, kind: str, cause: str) -> None:
        log.warning("guard rolling back", extra={"version": self.version, "cause": cause})
        try:
            out = self.rollback(None, f"guard: {cause}", Caller("guard", f"agent (after {self.caller.author})"),
                                cause=f"guard-{kind}")  # fmt: skip
            self.rolled_back_to = out.version
            self.outcome = "rolled-back"
            self.cause = cause
            self.sight.audit("guard-rollback", "rolled-back", "guard", "agent",
                             f"{cause}; rolled back to {out.version}", self.version)  # fmt: skip
            self.sight.guard_fired(self.version)
        except OperationError as e:
            self.outcome = "error"
            self.cause = f"{cause}; rollback failed: {e.message}"
