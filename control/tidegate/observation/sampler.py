"""Periodic snapshots of the per-source LRU, turned into per-source rates.

One batched map read per interval (default 5 s) is the only work that
scales with the number of tracked sources; every scrape, TopSources call
and blast-radius estimate uses the result, so their cost does not depend
on the map size. Rates are deltas of the per-entry packet and drop counters
between two snapshots (an entry that appeared in between counts from zero).
A ring of intervals covering the estimate window (default 5 min) is kept,
holding only entries that moved in each interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from tidegate.observation.window import SourceRates, SourceWindow, source_keys

log = logging.getLogger("tidegate.observation.sampler")


@dataclass
class Interval:
    """Entries that moved between two snapshots."""

    t0: float
    t1: float
    hi: np.ndarray
    lo: np.ndarray
    epoch: np.ndarray
    rule: np.ndarray
    kind: np.ndarray
    packets: np.ndarray  # delta
    drops: np.ndarray  # delta
    new_drops: np.ndarray  # delta (shadow entries)
    first_ns: np.ndarray
    # the shadow sets' epochs at the interval's start and end (a shadow set
    # cleared or promoted in between counted as one for part of it). Their
    # entries count the same packets a second time, and their drops are
    # would-drops: nothing that measures enforced traffic may add them in.
    shadow_epochs: tuple[int, ...] = ()

    @property
    def seconds(self) -> float:
        return max(1e-9, self.t1 - self.t0)

    def not_shadow(self) -> np.ndarray:
        """Mask of rows of rule sets that enforced throughout the interval."""
        return ~np.isin(self.epoch, np.array(self.shadow_epochs, dtype=np.uint32))

    def enforced(self) -> np.ndarray:
        """Mask of per-source (kind 0) rows of enforcing rule sets."""
        return (self.kind == 0) & self.not_shadow()


def _keys(hi, lo, epoch, rule, kind) -> np.ndarray:
    k = np.empty(len(hi), dtype=[("hi", "<u8"), ("lo", "<u8"), ("meta", "<u8")])
    k["hi"] = hi
    k["lo"] = lo
    k["meta"] = (epoch.astype(np.uint64) << np.uint64(16)) | (rule.astype(np.uint64) << np.uint64(8)) | kind
    return k


class Sampler:
    def __init__(self, kf, interval: float = 5.0, window: float = 300.0):
        self.kf = kf
        self.interval = interval
        self.window = window
        self._lock = threading.Lock()
        self._prev = None  # (t, sorted keys, packets, drops, new_drops, shadow epoch or None)
        self._intervals: deque[Interval] = deque()
        self.tracked_sources = 0
        self.tracked_entries = 0
        self.last_sample: float | None = None
        self.sample_seconds = 0.0
        self.cpu_seconds = 0.0  # this thread's CPU time, sampling and listeners
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listeners: list = []  # called after each sample (insight)
        self.epoch_names: dict[int, dict[int, str]] = {}  # rule names of each epoch seen

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu = time.thread_time()
            try:
                self.sample()
                for fn in self.listeners:
                    fn()
            except Exception as e:  # the filter may be detached for a moment
                log.debug("sample failed: %s", e)
            # CPU spent sampling and in the listeners (insight, reviews): the
            # sampler's share of the machine is its growth over wall time
            self.cpu_seconds += time.thread_time() - cpu
            self._stop.wait(self.interval)

    def sample(self) -> None:
        started = time.monotonic()
        table = self.kf.read_sources()
        state = self.kf.state()
        now = time.monotonic()
        keys = _keys(table.addr_hi, table.addr_lo, table.epoch, table.rule, table.kind)
        hkeys = source_keys(keys["hi"], keys["lo"], keys["meta"])
        order = np.argsort(hkeys, kind="stable")
        keys = keys[order]
        hkeys = hkeys[order]
        packets = table.packets[order]
        drops = table.drops[order]
        new_drops = table.new_drops[order]
        first_ns = table.first_ns[order]
        active_epoch = state.active.epoch if state.active else None
        for info in (state.active, state.shadow):
            if info is not None and not self.epoch_names.get(info.epoch):
                self.epoch_names[info.epoch] = self.kf.slot_names(info.slot)
                while len(self.epoch_names) > 256:
                    self.epoch_names.pop(min(self.epoch_names))
        with self._lock:
            prev = self._prev
            shadow_now = state.shadow.epoch if state.shadow else None
            self._prev = (now, hkeys, packets, drops, new_drops, shadow_now)
            mask_src = keys["meta"] & np.uint64(0xFF) == 0
            if active_epoch is not None:
                ep = keys["meta"] >> np.uint64(16)
                self.tracked_sources = int(np.count_nonzero(mask_src & (ep == np.uint64(active_epoch))))
            else:
                self.tracked_sources = 0
            self.tracked_entries = len(keys)
            self.last_sample = now
            self.sample_seconds = now - started
            if prev is None:
                return
            t0, pkeys, ppk, pdr, pnd, shadow_then = prev
            idx = np.searchsorted(pkeys, hkeys)
            idx_c = np.minimum(idx, max(0, len(pkeys) - 1))
            found = (pkeys[idx_c] == hkeys) if len(pkeys) else np.zeros(len(hkeys), bool)
            base_pk = np.where(found, ppk[idx_c] if len(pkeys) else 0, 0)
            base_dr = np.where(found, pdr[idx_c] if len(pkeys) else 0, 0)
            base_nd = np.where(found, pnd[idx_c] if len(pkeys) else 0, 0)
            # counters only grow; an evicted-and-reinserted entry starts again
            dpk = np.where(packets >= base_pk, packets - base_pk, packets)
            ddr = np.where(drops >= base_dr, drops - base_dr, drops)
            dnd = np.where(new_drops >= base_nd, new_drops - base_nd, new_drops)
            moved = dpk > 0
            meta = keys["meta"][moved]
            self._intervals.append(
                Interval(
                    t0, now, keys["hi"][moved], keys["lo"][moved],
                    (meta >> np.uint64(16)).astype(np.uint32), ((meta >> np.uint64(8)) & np.uint64(0xFF)).astype(np.uint8),
                    (meta & np.uint64(0xFF)).astype(np.uint8), dpk[moved], ddr[moved], dnd[moved], first_ns[moved],
                    tuple({e for e in (shadow_then, shadow_now) if e is not None}),
                )  # fmt: skip
            )
            while self._intervals and self._intervals[0].t1 < now - self.window:
                self._intervals.popleft()

    def last_interval(self) -> Interval | None:
        with self._lock:
            return self._intervals[-1] if self._intervals else None

    def intervals(self, seconds: float | None = None) -> list[Interval]:
        with self._lock:
            if seconds is None:
                return list(self._intervals)
            if not self._intervals:
                return []
            end = self._intervals[-1].t1
            return [iv for iv in self._intervals if iv.t1 > end - seconds]

    def intervals_since(self, t: float) -> list[Interval]:
        """The intervals that end after `t` (the one straddling it included)."""
        with self._lock:
            return [iv for iv in self._intervals if iv.t1 > t]

    def window_rates(self, seconds: float | None = None, kind: int = 0, epochs: set[int] | None = None) -> SourceRates:
        """Per (source, rule name) rates over the window, of the enforcing
        rule sets (SourceWindow.rates)."""
        return SourceWindow(self.intervals(seconds)).rates(self.epoch_names, self.interval, kind, epochs)
