"""The sampler's window kept bounded: older intervals folded into a summary.

Under a flood from millions of spoofed sources every sampled interval holds
up to a row per LRU entry, and the estimate window (5 min) holds dozens of
intervals: the window's rows, not the map, are what the agent's memory grows
with. So the sampler keeps full per-source rows only for its newest
intervals, as many as fit a row budget (`Sampler.max_rows`; the newest one
always), and folds each older interval once:

- kept as rows: every entry that is not a per-source one (prefix buckets),
  and every source that sent at or above the lowest per-source limit a rule
  can be given (LOWEST_LIMIT_PPS: `pps` is at least 1) over the interval,
  the heaviest MAX_KEPT of them;
- folded: the other per-source rows, summed per (epoch, rule, prefix):
  sources, packets, drops, would-drops and the most packets one of them
  sent (`peak`). The prefix is the longest of /24, /16, /8, /0 (IPv6 /48,
  /32, /16, /0) that gives at most MAX_GROUPS groups.

Why this is safe to fold for the blast-radius estimate: a source under the
lowest limit any rule can be given is never cut by a per-source limit, so
its own rate is not needed; what can still drop it is its address (a deny
list, a drop rule) and its prefix's sum (a prefix limit). The fold keeps
the sums per prefix, so the estimate counts folded sources as a class,
judged by its prefix's network address: exact unless the candidate splits
the prefix (a CIDR or a prefix-limit granularity longer than the fold's).
A class's sources are source-intervals (a source folded in two intervals
counts twice): an upper bound on its distinct sources. Sources at or above
the floor beyond MAX_KEPT are folded too (`above_floor` counts them): the
class's `peak` then says how fast its fastest one went, and the estimate
applies a per-source limit to the whole class at that rate (errs towards
refusing).

What an operator loses on folded intervals (each answer that rests on them
says so): the addresses of sources that sent under 1 pps (top sources and
the shadow report list the kept ones), distinct source counts (classes
count source-intervals) and anything finer than the fold's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tidegate.observation.window import (PER_SOURCE, SourceRates, group_rows, prefix_keys, prefix_name, source_keys,
                                         unique)  # fmt: skip

LOWEST_LIMIT_PPS = 1  # the schema's minimum `pps` for any limit (ruleset/schema.py)
MAX_KEPT = 16_384  # per-source rows a folded interval keeps (the heaviest at or above the floor)
MAX_GROUPS = 4_096  # folded groups per interval, at most
FOLD_PREFIXES = ((24, 48), (16, 32), (8, 16), (0, 0))  # (IPv4, IPv6) prefix lengths, longest first


@dataclass
class Folded:
    """The per-source rows a folded interval did not keep, one row per
    (epoch, rule, prefix). `key` is the prefix's key (window.prefix_keys at
    bits4 / bits6)."""

    key: np.ndarray
    epoch: np.ndarray
    rule: np.ndarray
    sources: np.ndarray
    packets: np.ndarray
    drops: np.ndarray
    new_drops: np.ndarray
    peak: np.ndarray  # the most packets one folded source of the group sent in the interval
    bits4: int
    bits6: int
    above_floor: int = 0  # sources at or above the floor folded for want of room (MAX_KEPT)

    def __len__(self) -> int:
        return len(self.key)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, c).nbytes for c in ("key", "epoch", "rule", "sources", "packets", "drops",
                                                      "new_drops", "peak"))  # fmt: skip

    def network(self, i: int) -> tuple[str, int]:
        """(network address, prefix length) of group i."""
        k = int(self.key[i])
        net, bits = prefix_name(k, self.bits4, self.bits6).split("/")
        return net, int(bits)

    def take(self, mask: np.ndarray) -> Folded:
        cols = {c: getattr(self, c)[mask] for c in ("key", "epoch", "rule", "sources", "packets", "drops",
                                                     "new_drops", "peak")}  # fmt: skip
        return Folded(**cols, bits4=self.bits4, bits6=self.bits6, above_floor=self.above_floor)


def kept_rows(kind: np.ndarray, packets: np.ndarray, seconds: float,
              max_kept: int = MAX_KEPT) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """(mask of the rows a folded interval keeps, mask of the per-source rows
    it folds, how many of those sent at or above the floor). Kept: every row
    that is not a per-source one, and the heaviest `max_kept` sources that
    sent at or above LOWEST_LIMIT_PPS over the interval."""
    per = kind == PER_SOURCE
    fast = np.flatnonzero(per & (packets >= LOWEST_LIMIT_PPS * seconds))
    above = max(0, len(fast) - max_kept)
    if above:
        fast = fast[np.argsort(-packets[fast].astype(np.int64), kind="stable")[:max_kept]]
    keep = ~per
    keep[fast] = True
    return keep, per & ~keep, above


def fold_rows(hi, lo, epoch, rule, packets, drops, new_drops, above_floor: int = 0,
              max_groups: int = MAX_GROUPS) -> Folded:  # fmt: skip
    """Per-source rows summed per (epoch, rule, prefix), at the longest of
    FOLD_PREFIXES that gives at most `max_groups` groups."""
    meta = (epoch.astype(np.uint64) << np.uint64(8)) | rule.astype(np.uint64)
    for bits4, bits6 in FOLD_PREFIXES:
        key = prefix_keys(hi, lo, bits4, bits6)
        groups = source_keys(key, np.zeros(len(key), np.uint64), meta)
        if len(unique(groups)) <= max_groups or (bits4, bits6) == FOLD_PREFIXES[-1]:
            break
    ones = np.ones(len(key), np.uint64)
    _, (k, e, r), (n, pk, dr, nd) = group_rows(groups, [key, epoch, rule], [ones, packets, drops, new_drops], np.add)
    _, _, (peak,) = group_rows(groups, [], [packets], np.maximum)
    return Folded(k, e.astype(np.uint32), r.astype(np.uint8), n.astype(np.uint32), pk.astype(np.uint64),
                  dr.astype(np.uint64), nd.astype(np.uint64), peak.astype(np.uint64), bits4, bits6,
                  above_floor)  # fmt: skip


def empty() -> Folded:
    z = np.array([], np.uint64)
    return Folded(z, z.astype(np.uint32), z.astype(np.uint8), z.astype(np.uint32), z, z, z, z, 24, 48)


def with_classes(rates: SourceRates, intervals, epoch_names: dict, min_seen: float,
                 epochs: set[int] | None = None) -> SourceRates:  # fmt: skip
    """`rates` (of the kept rows) and, after them, one entry per (prefix, rule
    name) for the sources the window's folded intervals summed: their
    packets and drops, the source-intervals they count, the fastest one's
    pps, seen from the class's first interval to the window's end. Rows of
    the sets that were a shadow in an interval are left out, as for sources."""
    parts = []
    for iv in intervals:
        f = getattr(iv, "folded", None)
        if f is None or not len(f):
            continue
        m = ~np.isin(f.epoch, np.array(iv.shadow_epochs, np.uint32))
        if epochs is not None:
            m &= np.isin(f.epoch, np.array(sorted(epochs), np.uint32))
        parts.append((iv, f.take(m)))
    if not parts:
        return rates
    names: dict[str, int] = {}
    cols: dict[str, list] = {c: [] for c in ("key", "bits", "name", "sources", "packets", "drops", "peak", "t0")}
    for iv, f in parts:
        nm = [names.setdefault(epoch_names.get(int(e), {}).get(int(r), f"rule{int(r)}"), len(names))
              for e, r in zip(f.epoch.tolist(), f.rule.tolist())]  # fmt: skip
        cols["key"].append(f.key)
        cols["bits"].append(np.full(len(f), f.bits4 << 8 | f.bits6, np.uint64))
        cols["name"].append(np.array(nm, np.uint64))
        cols["sources"].append(f.sources.astype(np.float64))
        cols["packets"].append(f.packets.astype(np.float64))
        cols["drops"].append(f.drops.astype(np.float64))
        cols["peak"].append(f.peak / iv.seconds)
        cols["t0"].append(np.full(len(f), iv.t0))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    groups = source_keys(c["key"], c["bits"], c["name"])
    _, (key, bits, name), (n, pk, dr) = group_rows(groups, [c["key"], c["bits"], c["name"]],
                                                   [c["sources"], c["packets"], c["drops"]], np.add)  # fmt: skip
    _, _, (peak,) = group_rows(groups, [], [c["peak"]], np.maximum)
    _, _, (first,) = group_rows(groups, [], [c["t0"]], np.minimum)
    seen = np.maximum(intervals[-1].t1 - first, min_seen)
    nets = [prefix_name(int(k), int(b) >> 8, int(b) & 0xFF) for k, b in zip(key.tolist(), bits.tolist())]
    by_id = {i: nm for nm, i in names.items()}
    return SourceRates(
        rates.addresses + [n_.split("/")[0] for n_ in nets], rates.rules + [by_id[int(i)] for i in name.tolist()],
        np.concatenate([rates.epochs, np.zeros(len(key), np.uint32)]), np.concatenate([rates.pps, pk / seen]),
        np.concatenate([rates.drop_pps, dr / seen]), rates.seconds, np.concatenate([rates.packets, pk]),
        np.concatenate([rates.drops, dr]), np.concatenate([rates.seen, seen]), rates.networks + nets,
        np.concatenate([rates.sources, n.astype(np.int64)]), np.concatenate([rates.peak_pps, peak]),
    )  # fmt: skip
