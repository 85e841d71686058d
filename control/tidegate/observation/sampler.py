"""Periodic snapshots of the per-source LRU, turned into per-source rates.

One batched map read per interval (default 5 s) is the only work that
scales with the number of tracked sources; every scrape, TopSources call
and blast-radius estimate uses the result, so their cost does not depend
on the map size. Rates are deltas of the per-entry packet and drop counters
between two snapshots (an entry that appeared in between counts from zero).
A ring of intervals covering the estimate window (default 5 min) is kept,
holding only entries that moved in each interval; the newest intervals that
fit `max_rows` rows keep every row, older ones are folded (observation/fold.py:
the sources under the lowest per-source limit summed per prefix), so the
window's memory is bounded however many sources a flood spoofs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from tidegate.observation.fold import MAX_KEPT, Folded, fold_rows, kept_rows, with_classes
from tidegate.observation.window import SourceRates, SourceWindow, source_keys

log = logging.getLogger("tidegate.observation.sampler")


class Column:
    """One column of unsigned integers kept in as few bytes as its values
    allow: `values()` gives back exactly the array it was made from (its
    dtype included).

    A sampled interval of a flood holds a row per moving source (up to the
    whole LRU, kept for the estimate window), so its columns are stored as
    base + stored * scale with `stored` in the narrowest unsigned dtype:
    one value repeated (the all-zero `hi` of IPv4 sources, one epoch, no
    would-drops) is kept once; counters and deltas that fit in 8, 16 or 32
    bits take that; an IPv4 source's `lo` (the address in its upper 32 bits
    over a constant ::ffff marker) keeps the address alone."""

    __slots__ = ("dtype", "n", "base", "scale", "stored")

    def __init__(self, values: np.ndarray, dtype=None):
        v = np.asarray(values)
        self.dtype = np.dtype(dtype or v.dtype)
        self.n = len(v)
        self.base, self.scale, self.stored = 0, 1, None
        if self.n == 0 or v.dtype.kind not in "ui" or (v.dtype.kind == "i" and v.min() < 0):
            self.stored = v.astype(self.dtype, copy=True)
            return
        v = v.astype(np.uint64, copy=False)
        lowest, highest = int(v.min()), int(v.max())
        if lowest == highest:
            self.base = lowest  # stored stays None: n copies of base
            return
        low32 = v & np.uint64(0xFFFFFFFF)
        if highest - lowest >= 1 << 32 and bool(np.all(low32 == low32[0])):
            self.base, self.scale = int(low32[0]), 1 << 32
            self.stored = _narrow(v >> np.uint64(32), 0, int(highest >> 32))
        else:
            self.base = lowest
            self.stored = _narrow(v - np.uint64(lowest) if lowest else v, 0, highest - lowest)

    @property
    def nbytes(self) -> int:
        return 0 if self.stored is None else self.stored.nbytes

    def values(self) -> np.ndarray:
        if self.stored is None:
            return np.full(self.n, self.base, self.dtype)
        if self.base == 0 and self.scale == 1:
            return self.stored.astype(self.dtype)
        out = self.stored.astype(np.uint64)
        if self.scale != 1:
            out <<= np.uint64(self.scale.bit_length() - 1)
        if self.base:
            out += np.uint64(self.base)
        return out.astype(self.dtype, copy=False)


def _narrow(v: np.ndarray, lowest: int, highest: int) -> np.ndarray:
    for dt in (np.uint8, np.uint16, np.uint32):
        if highest < 1 << (8 * np.dtype(dt).itemsize):
            return v.astype(dt)
    return v.astype(np.uint64, copy=True)


COLUMNS = {"hi": np.uint64, "lo": np.uint64, "epoch": np.uint32, "rule": np.uint8, "kind": np.uint8,
           "packets": np.uint64, "drops": np.uint64, "new_drops": np.uint64, "first_ns": np.uint64}


class Interval:
    """Entries that moved between two snapshots: one row an entry, each
    column (COLUMNS) read as a numpy array of its own dtype; kept compact
    (Column) while the interval is in the window."""

    def __init__(self, t0: float, t1: float, hi, lo, epoch, rule, kind, packets, drops, new_drops, first_ns,
                 shadow_epochs: tuple[int, ...] = ()):  # fmt: skip
        self.t0 = t0
        self.t1 = t1
        given = (hi, lo, epoch, rule, kind, packets, drops, new_drops, first_ns)
        self._columns = {name: Column(v, dt) for (name, dt), v in zip(COLUMNS.items(), given)}
        # the shadow sets' epochs at the interval's start and end (a shadow set
        # cleared or promoted in between counted as one for part of it). Their
        # entries count the same packets a second time, and their drops are
        # would-drops: nothing that measures enforced traffic may add them in.
        self.shadow_epochs = tuple(shadow_epochs)
        self.folded: Folded | None = None  # set on a folded interval: what it summed instead of keeping

    def fold(self, max_kept: int = MAX_KEPT) -> Interval:
        """This interval folded (observation/fold.py): a new one holding the
        rows it keeps, with the others summed per prefix in `folded`."""
        keep, gone, above = kept_rows(self.kind, self.packets, self.seconds, max_kept)
        cols = [self._columns[name].values() for name in COLUMNS]
        out = Interval(self.t0, self.t1, *(c[keep] for c in cols), shadow_epochs=self.shadow_epochs)
        hi, lo, epoch, rule, _kind, packets, drops, new_drops, _first = (c[gone] for c in cols)
        out.folded = fold_rows(hi, lo, epoch, rule, packets, drops, new_drops, above)
        return out

    hi = property(lambda self: self._columns["hi"].values())
    lo = property(lambda self: self._columns["lo"].values())
    epoch = property(lambda self: self._columns["epoch"].values())
    rule = property(lambda self: self._columns["rule"].values())
    kind = property(lambda self: self._columns["kind"].values())
    packets = property(lambda self: self._columns["packets"].values(), doc="delta")
    drops = property(lambda self: self._columns["drops"].values(), doc="delta")
    new_drops = property(lambda self: self._columns["new_drops"].values(), doc="delta (shadow entries)")
    first_ns = property(lambda self: self._columns["first_ns"].values())

    def __len__(self) -> int:
        return self._columns["hi"].n

    @property
    def nbytes(self) -> int:
        """Memory its rows take (and its folded summary's)."""
        return sum(c.nbytes for c in self._columns.values()) + (self.folded.nbytes if self.folded else 0)

    @property
    def seconds(self) -> float:
        return max(1e-9, self.t1 - self.t0)

    def not_shadow(self) -> np.ndarray:
        """Mask of rows of rule sets that enforced throughout the interval."""
        return ~np.isin(self.epoch, np.array(self.shadow_epochs, dtype=np.uint32))

    def enforced(self) -> np.ndarray:
        """Mask of per-source (kind 0) rows of enforcing rule sets."""
        return (self.kind == 0) & self.not_shadow()


# Rows the window's newest full intervals may hold together (the newest one is
# always full); older ones are folded (observation/fold.py). Half a 1M-entry
# LRU: an interval of a flood that churns it holds up to its every entry, and
# the insight figures, the window's biggest reader, read every full row.
MAX_FULL_ROWS = 1 << 19

# the per-source fields a sample keeps (read chunk by chunk: the entries' other fields are never all held)
SAMPLED = ("addr_hi", "addr_lo", "epoch", "rule", "kind", "packets", "drops", "new_drops", "first_ns")


class Sampler:
    def __init__(self, kf, interval: float = 5.0, window: float = 300.0, max_rows: int = MAX_FULL_ROWS):
        self.kf = kf
        self.interval = interval
        self.window = window
        self.max_rows = max_rows  # rows the newest full intervals may hold together (the newest one always full)
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
        table = self.kf.read_sources(columns=SAMPLED)
        state = self.kf.state()
        now = time.monotonic()
        # one u64 key per entry (source, epoch, rule, kind), sorted; the columns taken in that order
        meta = ((table.epoch.astype(np.uint64) << np.uint64(16)) | (table.rule.astype(np.uint64) << np.uint64(8))
                | table.kind)  # fmt: skip
        hkeys = source_keys(table.addr_hi, table.addr_lo, meta)
        del meta
        order = np.argsort(hkeys, kind="stable")
        hkeys = hkeys[order]
        # the counters in key order; the snapshot's own copies go at once (a flood fills the LRU: 8 MB each)
        packets, table.packets = table.packets[order], None
        active_epoch = state.active.epoch if state.active else None
        for info in (state.active, state.shadow):
            if info is not None and not self.epoch_names.get(info.epoch):
                self.epoch_names[info.epoch] = self.kf.slot_names(info.slot)
                while len(self.epoch_names) > 256:
                    self.epoch_names.pop(min(self.epoch_names))
        with self._lock:
            prev = self._prev
            shadow_now = state.shadow.epoch if state.shadow else None
            drops, table.drops = table.drops[order], None
            new_drops, table.new_drops = table.new_drops[order], None
            # the next sample's base, compact: counters that fit in 32 bits take 4 bytes
            self._prev = (now, hkeys, Column(packets), Column(drops), Column(new_drops), shadow_now)
            if active_epoch is not None:
                self.tracked_sources = int(np.count_nonzero((table.kind == 0) & (table.epoch == active_epoch)))
            else:
                self.tracked_sources = 0
            self.tracked_entries = table.entries  # the LRU's entries, not rows of shadow state
            self.last_sample = now
            self.sample_seconds = now - started
            if prev is None:
                return
            t0, pkeys, ppk, pdr, pnd, shadow_then = prev
            idx = np.searchsorted(pkeys, hkeys)
            np.minimum(idx, max(0, len(pkeys) - 1), out=idx)
            found = (pkeys[idx] == hkeys) if len(pkeys) else np.zeros(len(hkeys), bool)
            del pkeys, prev

            def delta(now_col, base_col):
                # counters only grow; an evicted-and-reinserted entry starts again
                base = np.where(found, base_col.values()[idx], 0) if base_col.n else np.zeros(len(now_col), np.uint64)
                return np.where(now_col >= base, now_col - base, now_col)

            dpk = delta(packets, ppk)
            moved = dpk > 0
            rows = order[moved]  # the moved entries' rows in the snapshot
            iv = Interval(t0, now, table.addr_hi[rows], table.addr_lo[rows], table.epoch[rows], table.rule[rows],
                          table.kind[rows], dpk[moved], delta(drops, pdr)[moved], delta(new_drops, pnd)[moved],
                          table.first_ns[rows], tuple({e for e in (shadow_then, shadow_now) if e is not None}))  # fmt: skip
            self._intervals.append(iv)
            while self._intervals and self._intervals[0].t1 < now - self.window:
                self._intervals.popleft()
            due = self._due()
        self._fold(due)

    def _due(self) -> list[Interval]:
        """The full intervals that no longer fit `max_rows` behind the newer ones (lock held)."""
        rows, due = 0, []
        for i, iv in enumerate(reversed(self._intervals)):
            if iv.folded is not None:
                continue
            rows += len(iv)
            if i and rows > self.max_rows:
                due.append(iv)
        return due

    def _fold(self, due: list[Interval]) -> None:
        """Fold each interval in `due` (outside the lock: readers keep reading
        the full one meanwhile) and put the folded one in its place."""
        for iv in due:
            folded = iv.fold()
            with self._lock:
                for i, cur in enumerate(self._intervals):
                    if cur is iv:
                        self._intervals[i] = folded
                        break

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
        rule sets (SourceWindow.rates); for per-source kind, the sources that
        folded intervals summed follow as classes (fold.with_classes)."""
        ivs = self.intervals(seconds)
        rates = SourceWindow(ivs).rates(self.epoch_names, self.interval, kind, epochs)
        return with_classes(rates, ivs, self.epoch_names, self.interval, epochs) if kind == 0 else rates
