"""Per-source window maths over the sampler's intervals: the one owner.

A `SourceWindow` is a run of sampler intervals (entries that moved in each,
as deltas). Everything that asks "which sources, how much, over which
seconds" reads it: top sources, the shadow report, the insight reading,
post-deployment reviews, the guard, the blast-radius estimate.

- selection: which intervals (the last N seconds, those ending after an
  activation, at most N rows newest first) and which rows (per-source kind,
  one epoch, the enforcing sets only, dropped or would-drop rows);
- merging: rows of one source (and rule) summed across intervals;
- grouping: by source key, by prefix, by rule name;
- top-K by a column, with ties in a fixed order;
- dropped sources (the set a review compares against) and prefix matching
  (which sources fall in given networks: canaries, deny candidates).

Source addresses are the kernel's keys: 16 bytes loaded as two
little-endian u64 halves (hi, lo), IPv4 as ::ffff:a.b.c.d.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields

import numpy as np

from tidegate.kernel.layout import V4_MAPPED, addr_halves, halves_to_address, mask_halves, network_key

PER_SOURCE = 0  # the per-source entry kind (the others are prefix buckets)


def unique(a: np.ndarray) -> np.ndarray:
    """np.unique(a), its sorted distinct values, by sorting: numpy 2.3 and
    later find them with a hash set instead, slower on a million keys and
    leaving ~20 MB of small blocks in the heap each time."""
    s = np.sort(np.asarray(a).ravel())
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) > 1 else s


def source_keys(hi: np.ndarray, lo: np.ndarray, meta=None) -> np.ndarray:
    """One 64-bit key per source (or per entry, with `meta` packing epoch,
    rule and kind): sorting u64 is ~20x faster than sorting a structured
    array. A collision (2^-64 per pair) would only mix up two entries."""
    with np.errstate(over="ignore"):
        h = np.asarray(hi, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= np.asarray(lo, np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        if meta is not None:
            h ^= np.asarray(meta, np.uint64) * np.uint64(0x165667B19E3779F9)
        h ^= h >> np.uint64(29)
    return h


def address_halves(addresses) -> tuple[np.ndarray, np.ndarray]:
    """Addresses (text or ipaddress objects) as the kernel keys them."""
    hi = np.zeros(len(addresses), np.uint64)
    lo = np.zeros(len(addresses), np.uint64)
    for i, a in enumerate(addresses):
        ip = ipaddress.ip_address(a)
        hi[i], lo[i] = addr_halves(V4_MAPPED | int(ip) if ip.version == 4 else int(ip))
    return hi, lo


def addresses(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    return [str(halves_to_address(int(h), int(x))) for h, x in zip(hi, lo)]


def network_index(hi: np.ndarray, lo: np.ndarray, networks) -> np.ndarray:
    """Per source, the index of the first of `networks` holding it (-1: none).
    An IPv4 network matches IPv4 sources (::ffff:0:0/96 and its prefix)."""
    out = np.full(len(hi), -1, np.int64)
    for j, net in enumerate(networks):
        addr, plen = network_key(ipaddress.ip_network(net))
        m = mask_halves(plen)
        nh, nl = addr_halves(addr)
        hit = ((hi & np.uint64(m.hi)) == np.uint64(nh & m.hi)) & ((lo & np.uint64(m.lo)) == np.uint64(nl & m.lo))
        out[(out < 0) & hit] = j
    return out


def is_ipv4(lo: np.ndarray) -> np.ndarray:
    return (lo & np.uint64(0xFFFFFFFF)) == np.uint64(0xFFFF0000)


def prefix_masks(bits4: int, bits6: int) -> tuple[int, int]:
    """(mask over lo for an IPv4 /bits4, mask over hi for an IPv6 /bits6)."""
    return mask_halves(96 + bits4).lo, mask_halves(bits6).hi


def prefix_keys(hi: np.ndarray, lo: np.ndarray, bits4: int, bits6: int) -> np.ndarray:
    """One key per source for its IPv4 /bits4 or IPv6 /bits6 prefix (bits6 <= 56:
    the top bit of hi marks IPv6)."""
    m4, m6 = prefix_masks(bits4, bits6)
    return np.where(is_ipv4(lo), lo & np.uint64(m4), (hi & np.uint64(m6)) | np.uint64(1) << np.uint64(63))


def prefix_name(key: int, bits4: int, bits6: int) -> str:
    if key >> 63:
        return f"{halves_to_address(key & ((1 << 63) - 1), 0)}/{bits6}"
    return f"{halves_to_address(0, key)}/{bits4}"


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a stable order sorting `keys`, the start of each run of equal keys in it)."""
    order = np.argsort(keys, kind="stable")  # u64 sort: ~10x faster than np.unique on records
    ks = keys[order]
    return order, np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1]))) if len(ks) else np.array([], np.int64)


def group_rows(keys: np.ndarray, first_cols: list, reduce_cols: list, op):
    """Rows grouped by key (in key order): the first row's value of each
    `first_cols` column and `op` (np.add, np.maximum) over each
    `reduce_cols` column."""
    order, starts = _runs(keys)
    first = order[starts]
    return keys[first], [c[first] for c in first_cols], [op.reduceat(c[order], starts) for c in reduce_cols]


@dataclass
class SourceRates:
    """Per-source rates over a window (kind 0 entries of one epoch or all)."""

    addresses: list[str]
    rules: list[str]  # rule names
    epochs: np.ndarray
    pps: np.ndarray
    drop_pps: np.ndarray
    seconds: float
    packets: np.ndarray = None  # per source, over the window
    drops: np.ndarray = None
    seen: np.ndarray = None  # seconds from first appearance to the end of the window
    # an entry may be a class of folded sources (observation/fold.py): its network
    # ("" for a source), the source-intervals it counts and its fastest source's pps
    networks: list[str] = None
    sources: np.ndarray = None
    peak_pps: np.ndarray = None

    def __post_init__(self):
        n = len(self.addresses)
        if self.networks is None:
            self.networks = [""] * n
        if self.sources is None:
            self.sources = np.ones(n, np.int64)
        if self.peak_pps is None:
            self.peak_pps = np.asarray(self.pps, float)

    @property
    def folded(self) -> np.ndarray:
        """Mask of the entries that are classes of folded sources."""
        return np.array([bool(n) for n in self.networks], bool)

    def take(self, idx) -> SourceRates:
        idx = np.flatnonzero(idx) if np.asarray(idx).dtype == bool else np.asarray(idx, np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return SourceRates([self.addresses[i] for i in idx], [self.rules[i] for i in idx], pick(self.epochs),
                           pick(self.pps), pick(self.drop_pps), self.seconds, pick(self.packets), pick(self.drops),
                           pick(self.seen), [self.networks[i] for i in idx], pick(self.sources),
                           pick(self.peak_pps))  # fmt: skip


@dataclass
class Rows:
    """Selected per-entry rows of a window, one column each; `first_row`
    (after a merge) is each group's earliest row, `seconds` the span of the
    intervals they come from."""

    hi: np.ndarray
    lo: np.ndarray
    epoch: np.ndarray
    rule: np.ndarray
    kind: np.ndarray
    packets: np.ndarray
    drops: np.ndarray
    new_drops: np.ndarray
    first_ns: np.ndarray
    t0: np.ndarray
    t1: np.ndarray
    seconds: float = 0.0
    intervals: int = 0
    first_row: np.ndarray = None

    def __post_init__(self):
        if self.first_row is None:
            self.first_row = np.arange(len(self.hi))

    def __len__(self) -> int:
        return len(self.hi)

    def columns(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}

    def take(self, idx) -> Rows:
        return Rows(**{k: v[idx] for k, v in self.columns().items()}, seconds=self.seconds, intervals=self.intervals)

    def keys(self) -> np.ndarray:
        """One key per source (not per entry: a source has one a rule and epoch)."""
        return source_keys(self.hi, self.lo)

    def source_count(self) -> int:
        """Distinct sources among the rows."""
        return len(unique(self.keys()))

    def addresses(self, idx=None) -> list[str]:
        idx = np.arange(len(self)) if idx is None else idx
        return addresses(self.hi[idx], self.lo[idx])

    def per_source_rule(self) -> Rows:
        """Rows of one source and rule index summed (packets, drops,
        new_drops); the other columns from the earliest row. In key order,
        so ties rank the same on every call."""
        order, starts = _runs(source_keys(self.hi, self.lo, self.rule))
        out = self.take(order[starts])
        if len(starts):
            for c in ("packets", "drops", "new_drops"):
                setattr(out, c, np.add.reduceat(getattr(self, c)[order], starts))
        return out

    def sources(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source keys in key order, each one's first row, each row's source)."""
        return np.unique(self.keys(), return_index=True, return_inverse=True)

    def top(self, n: int, column: str) -> np.ndarray:
        """Row indices of the n largest non-zero values of `column`, largest
        first."""
        key = getattr(self, column).astype(np.int64)
        cand = np.argpartition(-key, n - 1)[:n] if len(key) > n else np.arange(len(key))
        order = cand[np.argsort(-key[cand], kind="stable")]
        return order[key[order] > 0]

    def ranked(self, column: str) -> np.ndarray:
        """Row indices by `column`, largest first; ties in row order."""
        return np.lexsort((self.first_row, -getattr(self, column).astype(np.int64)))

    def first_network(self, networks) -> str | None:
        """The first of `networks` (in their order) holding one of the rows' sources."""
        idx = network_index(self.hi, self.lo, networks)
        for j, net in enumerate(networks):
            if np.any(idx == j):
                return str(net)
        return None


class SourceWindow:
    """A run of sampler intervals, oldest first."""

    def __init__(self, intervals):
        self.intervals = [iv for iv in intervals if iv is not None]

    @classmethod
    def of(cls, sampler, seconds: float | None = None) -> SourceWindow:
        """The sampler's intervals of the last `seconds` (all it keeps: None)."""
        return cls(sampler.intervals(seconds))

    def __len__(self) -> int:
        return len(self.intervals)

    @property
    def seconds(self) -> float:
        return max(1e-9, self.intervals[-1].t1 - self.intervals[0].t0) if self.intervals else 0.0

    @property
    def end(self) -> float | None:
        """The end of the newest interval: what the window covers up to."""
        return self.intervals[-1].t1 if self.intervals else None

    def since(self, t: float) -> SourceWindow:
        """The intervals that end after `t` (the one straddling it included)."""
        return SourceWindow([iv for iv in self.intervals if iv.t1 > t])

    def select(self, kind: int | None = PER_SOURCE, epoch: int | None = None, *, enforced: bool = False,
               dropped: bool = False, would_drop: bool = False, exclude_epoch: int | None = None,
               max_rows: int | None = None) -> Rows:  # fmt: skip
        """Rows of one entry kind, one epoch (or all); `enforced`: only the
        sets that enforced throughout an interval (a shadow set's rows count
        the same packets again, and its drops are would-drops); `dropped` /
        `would_drop`: rows with drops / newly would-drop packets.
        `max_rows`: the newest intervals whose rows sum to at most that
        (at least one interval)."""
        ivs = self.intervals
        masks = []
        for iv in ivs:
            m = iv.not_shadow() if enforced else np.ones(len(iv.hi), bool)
            if kind is not None:
                m = m & (iv.kind == kind)
            if epoch is not None:
                m = m & (iv.epoch == epoch)
            if exclude_epoch is not None:
                m = m & (iv.epoch != exclude_epoch)
            if dropped:
                m = m & (iv.drops > 0)
            if would_drop:
                m = m & (iv.new_drops > 0)
            masks.append(m)
        if max_rows is not None:
            rows, keep = 0, 0
            for m in reversed(masks):
                rows += int(np.count_nonzero(m))
                if keep and rows > max_rows:
                    break
                keep += 1
            ivs, masks = ivs[len(ivs) - keep:], masks[len(masks) - keep:]
        cat = np.concatenate

        def col(name, dtype):
            if not ivs:
                return np.array([], dtype)
            return cat([np.asarray(getattr(iv, name))[m] for iv, m in zip(ivs, masks)]).astype(dtype, copy=False)

        return Rows(
            col("hi", np.uint64), col("lo", np.uint64), col("epoch", np.uint32), col("rule", np.uint8),
            col("kind", np.uint8), col("packets", np.uint64), col("drops", np.uint64), col("new_drops", np.uint64),
            col("first_ns", np.uint64),
            cat([np.full(int(m.sum()), iv.t0) for iv, m in zip(ivs, masks)]) if ivs else np.array([]),
            cat([np.full(int(m.sum()), iv.t1) for iv, m in zip(ivs, masks)]) if ivs else np.array([]),
            seconds=max(1e-9, ivs[-1].t1 - ivs[0].t0) if ivs else 0.0, intervals=len(ivs),
        )  # fmt: skip

    def top(self, n: int, column: str, epoch: int, max_rows: int | None = None) -> tuple[Rows, np.ndarray]:
        """The n (source, rule) entries of one epoch's per-source rows with
        the most `column` (packets, drops), summed over the window; and the
        rows they rank among."""
        rows = self.select(PER_SOURCE, epoch, max_rows=max_rows)
        if rows.intervals > 1:  # one interval holds each entry once; a window sums them per source and rule
            rows = rows.per_source_rule()
        return rows, rows.top(n, column)

    def dropped_sources(self, exclude_epoch: int | None = None) -> np.ndarray:
        """Sorted keys of the sources the enforcing sets dropped, leaving out
        the rows of `exclude_epoch` (a version under review)."""
        rows = self.select(PER_SOURCE, enforced=True, dropped=True, exclude_epoch=exclude_epoch)
        return unique(rows.keys())

    def rates(self, epoch_names: dict, min_seen: float, kind: int = PER_SOURCE,
              epochs: set[int] | None = None) -> SourceRates:  # fmt: skip
        """Per (source, rule name) rates of the enforcing rule sets.

        Rows of different epochs are joined by rule name (`epoch_names`:
        epoch -> rule index -> name, as sampled), so an apply in the middle
        of the window does not reset what is known about a source. Each
        source's rate is taken from its first appearance to the end of the
        window (at least `min_seen`, one sample interval), not over the
        whole window: a source that started 10 s ago at 40 pps is a 40 pps
        source, one that sent a single packet 8 s ago is not."""
        if not self.intervals:
            e = np.array([])
            return SourceRates([], [], np.array([], np.uint32), e, e, 0.0, e, e, e)
        r = self.select(kind, enforced=True)
        if epochs is not None:
            r = r.take(np.isin(r.epoch, np.array(sorted(epochs), dtype=np.uint32)))
        # rule names per (epoch, rule index), as they were when sampled
        pair = (r.epoch.astype(np.uint64) << np.uint64(8)) | r.rule.astype(np.uint64)
        upairs, pinv = np.unique(pair, return_inverse=True)
        names: list[str] = []
        name_ids: dict[str, int] = {}
        pair_name = np.empty(len(upairs), dtype=np.uint64)
        for i, pv in enumerate(upairs.tolist()):
            nm = epoch_names.get(pv >> 8, {}).get(pv & 0xFF, f"rule{pv & 0xFF}")
            if nm not in name_ids:
                name_ids[nm] = len(names)
                names.append(nm)
            pair_name[i] = name_ids[nm]
        row_name = pair_name[pinv] if len(pinv) else np.array([], np.uint64)
        keys = np.empty(len(r), dtype=[("hi", "<u8"), ("lo", "<u8"), ("meta", "<u8")])
        keys["hi"], keys["lo"], keys["meta"] = r.hi, r.lo, row_name
        uniq, inv = np.unique(keys, return_inverse=True)
        n = len(uniq)
        first = np.full(n, np.inf)
        np.minimum.at(first, inv, r.t0)
        # from its first appearance to the end of the window: right for a
        # steady source that started recently and for a sparse one alike
        seen = np.maximum(self.intervals[-1].t1 - first, min_seen)
        packets = np.bincount(inv, weights=r.packets.astype(float), minlength=n)
        drops = np.bincount(inv, weights=r.drops.astype(float), minlength=n)
        rule_names = [names[int(m)] for m in uniq["meta"]]
        return SourceRates(addresses(uniq["hi"], uniq["lo"]), rule_names, np.zeros(n, np.uint32), packets / seen,
                           drops / seen, self.seconds, packets, drops, seen)  # fmt: skip


class DroppedSince:
    """The distinct sources one epoch dropped since a moment, and the first
    of `networks` (canaries) one of them fell in: each sampler interval is
    folded in once, so a watch that asks every second costs one interval's
    rows per sample, not the whole window's."""

    def __init__(self, t: float, networks=()):
        self.t = t  # intervals that end after it are still to be folded in
        self.networks = list(networks)
        self.keys = np.array([], np.uint64)
        self.network: str | None = None

    def fold(self, intervals, epoch: int) -> DroppedSince:
        for iv in SourceWindow(intervals).since(self.t).intervals:
            self.t = iv.t1
            rows = SourceWindow([iv]).select(epoch=epoch, dropped=True)
            self.keys = unique(np.concatenate([self.keys, rows.keys()]))
            if self.network is None and self.networks:
                self.network = rows.first_network(self.networks)
        return self

    def __len__(self) -> int:
        return len(self.keys)
