"""Post-deployment reviews, recorded by the agent itself.

Every version that becomes active is watched from its activation. The
counter history (safety.CounterHistory, one reading a second) gives the
before/after comparison; each per-source sample adds the sources this
version drops that the active sets did not drop in the sampled window (up
to 5 min) before it: the "newly dropped sources", the ones a too-tight
change hurts. A shadow set's entries count what it would drop, so they
never make a source "dropped before".

The review is written to the store when the version is activated, once a
minute while it runs (so a crash loses at most a minute), and for good
(`final`) when the review period (--review-seconds) ends or the version is
replaced earlier: apply, rollback, promote, guard rollback, agent stop. A
final review is never recomputed, so `tidegate review N` after a restart
returns what was recorded. The counter history and the sampler's ring live
in memory only: a review interrupted by a crash is made final at the next
start, covering up to its last write, and is not resumed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from tidegate.kernel.layout import halves_to_address
from tidegate.observation.window import SourceWindow, group_rows, source_keys, unique
from tidegate.safety.guard import counter_summary as _summary

log = logging.getLogger("tidegate.safety.review")

REVIEW_TOP = 10  # newly dropped sources listed in a review
# distinct newly dropped sources tracked per version (8 bytes x 6 arrays each);
# beyond it the count is a floor and `newly_dropped_capped` says so
MAX_NEWLY_DROPPED = 1 << 18
PERSIST_SECONDS = 60.0
BEFORE_SECONDS = 300.0  # the "before" side: at most this long before the activation
KERNEL_READ_SECONDS = 60.0  # a version replaced sooner: its last per-source totals are read from the kernel


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Watch:
    version: int
    kind: str  # how it was activated: apply, rollback, promote, restore...
    epoch: int
    t_mono: float
    t_wall: float
    before: np.ndarray  # sorted source keys dropped in the window before
    last_t1: float  # end of the last sampler interval folded in
    before_seconds: float = 0.0  # how much sampled traffic `before` covers (less after a restart)
    persisted: float = 0.0
    capped: bool = False

    def __post_init__(self):
        e = np.array([], np.uint64)
        self.keys, self.hi, self.lo, self.packets, self.drops = e, e, e, e, e
        self.rule = np.array([], np.uint8)


class Reviews:
    """One per agent; called under the agent's change lock on activations
    and from the sampler thread after each sample."""

    def __init__(self, kf, sampler, store, history, period: float):
        """kf: the kernel filter (state, names, sources); sampler: its intervals; store: versions,
        audit and saved reviews; history: the counter history; period: how long a review watches."""
        self.kf, self.sampler, self.store, self.history = kf, sampler, store, history
        self.period = period
        self._lock = threading.Lock()
        self._watch: _Watch | None = None

    # ------------------------------------------------------------ events
    def activated(self, version: int, kind: str, cause: str = "") -> None:
        """`version` is now active: close the previous version's review and
        start watching this one (unless its review is already final: a
        rollback to an earlier version keeps that version's first review).
        Never raises: the change it follows has happened already."""
        try:
            self._activated(version, kind, cause)
        except Exception:
            log.exception("starting or recording a review failed", extra={"version": version})

    def _activated(self, version: int, kind: str, cause: str) -> None:
        self._mark()  # the counters at the change: "before" ends and "after" starts here
        with self._lock:
            now = time.monotonic()
            w = self._watch
            if w is not None:
                self._fold(w)
                self._fold_kernel(w)
                self._finish(w, now, {"kind": "replaced", "by_version": version, "how": kind, "cause": cause})
            if self._stored_final(version):
                return
            active = self.kf.active_slot()  # the maps only: no netlink query on an apply's path
            ivs = self.sampler.intervals(min(self.period, BEFORE_SECONDS))
            before = SourceWindow(ivs).dropped_sources()
            w = _Watch(version, kind, active.epoch if active else 0, now, time.time(), before,
                       last_t1=ivs[-1].t1 if ivs else 0.0,
                       before_seconds=(ivs[-1].t1 - ivs[0].t0) if ivs else 0.0)  # fmt: skip
            self._watch = w
            self._save(w, now, final=False)

    def on_sample(self) -> None:
        try:
            with self._lock:
                w = self._watch
                if w is None:
                    return
                self._fold(w)
                now = time.monotonic()
                if now >= w.t_mono + self.period:
                    self._finish(w, w.t_mono + self.period, {"kind": "period"})
                elif now - w.persisted >= PERSIST_SECONDS:
                    self._save(w, now, final=False)
        except Exception:  # a failed write must not stop the sampler's other listeners
            log.exception("recording a review failed")

    def guard_fired(self, version: int) -> None:
        """The guard wrote its audit entry after the rollback that closed the
        review: record the entry in the stored review too."""
        with self._lock:
            saved = self.store.get_review(version)
            if saved:
                data = json.loads(saved)
                data["guard"], fired = self._guard_events(version)
                data["guard_fired"] = data.get("guard_fired") or fired
                self.store.save_review(version, json.dumps(data))

    def stop(self) -> None:
        """Agent shutdown: the review of the active version ends here."""
        self._mark()
        try:
            with self._lock:
                w = self._watch
                if w is not None:
                    self._fold(w)
                    self._fold_kernel(w)
                    self._finish(w, time.monotonic(), {"kind": "agent-stopped"})
        except Exception:  # the agent still stops cleanly; the review stays as last written
            log.exception("recording the review at stop failed")

    def recover(self, versions) -> None:
        """At start: a review the previous agent left in progress (it
        crashed) is made final as it was last written."""
        with self._lock:
            for v in {v for v in versions if v}:
                saved = self.store.get_review(v)
                if saved:
                    data = json.loads(saved)
                    if not data.get("final"):
                        data["final"] = True
                        data["ended"] = {"kind": "agent-restart"}
                        data["note"] = ("the agent stopped without closing this review: it covers up to its "
                                        "last write (the counter history is kept in memory only)")  # fmt: skip
                        self.store.save_review(v, json.dumps(data))

    # ------------------------------------------------------------ reading
    def get(self, version: int) -> dict:
        """The review of `version`: live while it is watched, else the stored one."""
        with self._lock:
            w = self._watch
            if w is not None and w.version == version:
                self._fold(w)
                now = time.monotonic()
                if now < w.t_mono + self.period:
                    return self._compute(w, now, final=False)
                self._finish(w, w.t_mono + self.period, {"kind": "period"})
            saved = self.store.get_review(version)
            if saved:
                return json.loads(saved)
        return self._unwatched(version)

    def _unwatched(self, version: int) -> dict:
        """A version activated before any agent recorded reviews: what the
        counter history still covers (nothing after a restart)."""
        store = self.store
        acts = list(reversed(store.activations(1000)))  # oldest first
        first = next((i for i, a in enumerate(acts) if a[0] == version), None)
        if first is None:
            return {"version": version, "complete": False, "final": False, "note": "this version was never active"}
        t_wall = acts[first][2]
        end_wall = acts[first + 1][2] if first + 1 < len(acts) else time.time()
        t_mono = time.monotonic() - (time.time() - t_wall)
        end = min(time.monotonic() - (time.time() - end_wall), t_mono + self.period)
        data = self._base(version, acts[first][1], t_mono, t_wall, end)
        data.update(final=False, ended=None, newly_dropped_sources=None, newly_dropped_capped=False,
                    top_newly_dropped=[], before_dropped_sources=None, before_sampled_seconds=None)  # fmt: skip
        data["note"] = ("no review was recorded for this activation (activated before this agent started?): "
                        "counters only, as far as the agent's memory goes; no newly dropped sources")  # fmt: skip
        return data

    # ------------------------------------------------------------ internals
    def _stored_final(self, version: int) -> bool:
        saved = self.store.get_review(version)
        return bool(saved and json.loads(saved).get("final"))

    def _fold(self, w: _Watch) -> None:
        """Add the sampler intervals since the last fold to the watch."""
        for iv in SourceWindow.of(self.sampler).since(w.last_t1).intervals:
            w.last_t1 = iv.t1
            if iv.t1 <= w.t_mono:
                continue
            one = SourceWindow([iv])
            if iv.t0 < w.t_mono:  # straddles the activation: the earlier sets' drops in it happened before
                w.before = unique(np.concatenate([w.before, one.dropped_sources(exclude_epoch=w.epoch)]))
            r = one.select(epoch=w.epoch, dropped=True)
            if len(r):  # interval deltas: summed
                self._merge(w, r.hi, r.lo, r.rule, r.packets, r.drops, np.add)

    def _fold_kernel(self, w: _Watch) -> None:
        """At the end of a short-lived version (a guard rolls back within
        seconds, before the sampler's first samples): the kernel's own
        per-entry totals of its epoch. One batched read of the LRU, so only
        within KERNEL_READ_SECONDS of the activation: later the samples hold
        all but the last interval. An entry's totals count from the epoch's
        start, so they are merged by maximum with the sums of sampled deltas
        (which an eviction can only make smaller)."""
        if w.kind == "promote":  # a promoted set's entries also hold what it counted as the shadow
            return
        if time.monotonic() - w.t_mono > KERNEL_READ_SECONDS:
            return
        try:
            t = self.kf.read_sources()
        except Exception as e:  # the review is still recorded, from the samples alone
            log.warning("reading the per-source table for a review failed: %s", e)
            return
        if not t.count:
            return
        sel = (t.kind == 0) & (t.epoch == w.epoch) & (t.drops > 0)
        if not np.any(sel):
            return
        k, (hi, lo, rule), (packets, drops) = group_rows(
            source_keys(t.addr_hi[sel], t.addr_lo[sel]), [t.addr_hi[sel], t.addr_lo[sel], t.rule[sel]],
            [t.packets[sel], t.drops[sel]], np.add)  # per source: the sum of its entries (one a rule)
        self._merge(w, hi, lo, rule, packets, drops, np.maximum, keys=k)

    def _merge(self, w: _Watch, hi, lo, rule, packets, drops, op, keys=None) -> None:
        """Add rows (sources not dropped before only) to the watch's per-source totals, combined by `op`."""
        k = source_keys(hi, lo) if keys is None else keys
        new = ~np.isin(k, w.before)
        if not np.any(new):
            return
        w.keys, (w.hi, w.lo, w.rule), (w.packets, w.drops) = group_rows(
            np.concatenate([w.keys, k[new]]),
            [np.concatenate([w.hi, hi[new].astype(np.uint64)]), np.concatenate([w.lo, lo[new].astype(np.uint64)]),
             np.concatenate([w.rule, rule[new].astype(np.uint8)])],
            [np.concatenate([w.packets, packets[new].astype(np.uint64)]),
             np.concatenate([w.drops, drops[new].astype(np.uint64)])], op)  # fmt: skip
        if len(w.keys) > MAX_NEWLY_DROPPED:  # keep the heaviest; the count becomes a floor
            keep = np.sort(np.argpartition(-w.drops.astype(np.int64), MAX_NEWLY_DROPPED - 1)[:MAX_NEWLY_DROPPED])
            w.keys, w.hi, w.lo, w.rule = w.keys[keep], w.hi[keep], w.lo[keep], w.rule[keep]
            w.packets, w.drops = w.packets[keep], w.drops[keep]
            w.capped = True

    def _mark(self) -> None:
        """A counter-history reading now, so a version active for a second
        (a guard rollback) still has an "after" side."""
        try:
            self.history.take()
        except Exception as e:  # not attached yet (first start)
            log.debug("no counter reading for the review: %s", e)

    def _finish(self, w: _Watch, end: float, ended: dict) -> None:
        ended = {**ended, "at": _iso(time.time() - (time.monotonic() - end)),
                 "after_seconds": round(end - w.t_mono, 1)}  # fmt: skip
        self._save(w, end, final=True, ended=ended)
        if self._watch is w:
            self._watch = None
        log.info("review recorded", extra={"version": w.version, "ended": ended["kind"]})

    def _save(self, w: _Watch, end: float, final: bool, ended: dict | None = None) -> None:
        data = self._compute(w, end, final, ended)
        self.store.save_review(w.version, json.dumps(data))
        w.persisted = time.monotonic()

    def _guard_events(self, version: int) -> tuple[list[dict], bool]:
        # by version, not among the latest rows: a burst of other rows must not push them out of the review
        events = self.store.list_audit(1000, version=version, action_prefix="guard")
        return ([{"action": g.action, "result": g.result, "detail": g.detail} for g in events],
                any(g.action == "guard-rollback" for g in events))  # fmt: skip

    def _base(self, version: int, kind: str, t_mono: float, t_wall: float, end: float) -> dict:
        rec = self.store.get_version(version, with_content=False)  # author and reason: not megabytes of text
        hist = self.history
        before = hist.between(t_mono - min(self.period, BEFORE_SECONDS), t_mono)
        after = hist.between(t_mono, end)
        guard, fired = self._guard_events(version)
        data = {
            "version": version,
            "author": rec.author,
            "reason": rec.reason,
            "activated": kind,
            "activated_at": _iso(t_wall),
            "complete": end >= t_mono + self.period - 1.0,
            "before": _summary(before),
            "after": _summary(after),
            "guard": guard,
            "guard_fired": fired,
        }
        if before is None or after is None:
            missing = " and ".join(side for side, d in (("before", before), ("after", after)) if d is None)
            data["note"] = (f"no counter history {missing} the activation (the agent keeps it in memory: "
                            "it had just started, or restarted since)")  # fmt: skip
        return data

    def _compute(self, w: _Watch, end: float, final: bool, ended: dict | None = None) -> dict:
        data = self._base(w.version, w.kind, w.t_mono, w.t_wall, end)
        # the guard's own audit entry comes after the rollback that ends the review
        data["guard_fired"] = data["guard_fired"] or (ended or {}).get("cause", "").startswith("guard")
        top = np.argsort(-w.drops.astype(np.int64), kind="stable")[:REVIEW_TOP]
        names = self.sampler.epoch_names.get(w.epoch, {})
        data.update(
            final=final,
            ended=ended,
            newly_dropped_sources=len(w.keys),
            newly_dropped_capped=w.capped,
            before_dropped_sources=len(w.before),
            before_sampled_seconds=round(w.before_seconds, 1),
            top_newly_dropped=[{"address": str(halves_to_address(int(w.hi[i]), int(w.lo[i]))),
                                "rule": names.get(int(w.rule[i]), f"rule{int(w.rule[i])}"),
                                "packets": int(w.packets[i]), "drops": int(w.drops[i])} for i in top],
        )  # fmt: skip
        return data
