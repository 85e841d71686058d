"""Traffic insight: tell a flash crowd from a flood, from the kernel's own
per-source state.

Inputs are bounded whatever the number of sources: the sampler's last
interval (entries that moved in it; one batched map read per interval) and
a set of known source keys kept here as a sorted numpy array of 64-bit
hashes with first/last-seen times, capped at `MAX_KNOWN` (the least
recently seen are forgotten first). A source is "known" when the agent saw
it more than `baseline_seconds` before now (default 120 s) and within the
last hour. The reading is a hint built from the numbers it prints, not a
verdict.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .kernel_layout import DROP_REASONS, halves_to_address

MAX_KNOWN = 2_000_000
RATE_BUCKETS = (1, 10, 100, 1000, 10000)  # per-source pps upper bounds; +Inf implied
TOP_PREFIXES = 5  # /24 and /48 prefixes named in a reading


def _hash(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return (hi * np.uint64(0x9E3779B97F4A7C15)) ^ lo


class KnownSources:
    """Source keys the agent has seen, with when it first and last saw them."""

    def __init__(self, max_known: int = MAX_KNOWN):
        self.max_known = max_known
        self.keys = np.array([], dtype=np.uint64)
        self.first = np.array([], dtype=np.float64)
        self.last = np.array([], dtype=np.float64)
        self._lock = threading.Lock()

    def update(self, hi: np.ndarray, lo: np.ndarray, now: float) -> None:
        k = np.unique(_hash(hi, lo))
        with self._lock:
            idx = np.searchsorted(self.keys, k)
            idx_c = np.minimum(idx, max(0, len(self.keys) - 1))
            found = (self.keys[idx_c] == k) if len(self.keys) else np.zeros(len(k), bool)
            self.last[idx_c[found]] = now
            new = k[~found]
            if len(new):
                keys = np.concatenate([self.keys, new])
                first = np.concatenate([self.first, np.full(len(new), now)])
                last = np.concatenate([self.last, np.full(len(new), now)])
                order = np.argsort(keys)
                self.keys, self.first, self.last = keys[order], first[order], last[order]
            if len(self.keys) > self.max_known:
                keep = np.sort(np.argsort(-self.last)[: self.max_known])
                self.keys, self.first, self.last = self.keys[keep], self.first[keep], self.last[keep]

    def first_seen(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """First-seen time per key (inf when unknown)."""
        k = _hash(hi, lo)
        with self._lock:
            if not len(self.keys):
                return np.full(len(k), np.inf)
            idx = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
            found = self.keys[idx] == k
            return np.where(found, self.first[idx], np.inf)

    def __len__(self) -> int:
        return len(self.keys)


class Insight:
    """Keeps the known-source set fresh from the sampler, reads the picture."""

    def __init__(self, agent, baseline_seconds: float = 120.0):
        self.agent = agent
        self.baseline_seconds = baseline_seconds
        self.known = KnownSources()

        self.latest: dict | None = None
        self._lock = threading.Lock()

    def on_sample(self) -> None:
        """Sampler listener: fold the new interval into the known set, then
        refresh the cached reading the metrics export."""
        iv = self.agent.sampler.last_interval()
        if iv is None or iv is getattr(self, "_last_iv", None):
            return
        self._last_iv = iv
        sel = iv.kind == 0
        # read before updating, so this interval's new sources count as new
        latest = self._compute()
        self.known.update(iv.hi[sel], iv.lo[sel], iv.t1)
        with self._lock:
            self.latest = latest

    def read(self) -> dict:
        with self._lock:
            if self.latest is not None:
                return self.latest
        return self._compute()

    def _compute(self) -> dict:
        a = self.agent
        st = a.kf.state()
        iv = a.sampler.last_interval()
        now = time.monotonic()
        data: dict = {"disclaimer": "a hint from counters, not a verdict"}
        if iv is None or st.active is None:
            data["reading"] = "no per-source samples yet: wait a few seconds"
            return data
        sel = (iv.kind == 0) & (iv.epoch == st.active.epoch)
        hi, lo = iv.hi[sel], iv.lo[sel]
        pk, dr, rules = iv.packets[sel].astype(np.float64), iv.drops[sel].astype(np.float64), iv.rule[sel]
        secs = iv.seconds
        total = float(pk.sum())
        pps = pk / secs
        first = self.known.first_seen(hi, lo)
        known_mask = first <= now - self.baseline_seconds
        new_mask = first >= iv.t0 - 0.001
        known_share = float(pk[known_mask].sum() / total) if total else 0.0
        new_sources = int(new_mask.sum())
        # concentration in /24 (IPv4) and /48 (IPv6) prefixes
        v4 = (lo & np.uint64(0xFFFFFFFF)) == np.uint64(0xFFFF0000)
        p24 = np.where(v4, lo & np.uint64(0x00FFFFFFFFFFFFFF), hi & np.uint64(0x0000FFFFFFFFFFFF))
        pfx_key = np.where(v4, p24, p24 | np.uint64(1) << np.uint64(63))
        uniq, inv = np.unique(pfx_key, return_inverse=True)
        per_pfx = np.bincount(inv, weights=pk, minlength=len(uniq)) if len(uniq) else np.array([])
        top_pfx_share = float(np.sort(per_pfx)[::-1][:10].sum() / total) if total else 0.0
        # the heaviest prefixes by name: what an operator would put on a deny
        # list or give a prefix limit, if the reading says flood
        top_prefixes = []
        if total and len(uniq):
            srcs = np.bincount(inv, minlength=len(uniq))
            for j in np.argsort(per_pfx)[::-1][:TOP_PREFIXES].tolist():
                key = int(uniq[j])
                if key >> 63:
                    net = f"{halves_to_address(key & ((1 << 63) - 1), 0)}/48"
                else:
                    net = f"{halves_to_address(0, key)}/24"
                top_prefixes.append({"prefix": net, "packet_share": round(float(per_pfx[j] / total), 4),
                                     "sources": int(srcs[j])})
        top_i = int(np.argmax(pk)) if len(pk) else -1
        top_share = float(pk[top_i] / total) if total and top_i >= 0 else 0.0
        hist = [int(np.count_nonzero(pps <= b)) for b in RATE_BUCKETS] + [len(pps)]
        # traffic trend from the counter history: now vs two minutes ago
        hist_now = a.history.between(now - 10, now)
        hist_then = a.history.between(now - 130, now - 120)
        rate_now = _rate(hist_now)
        rate_then = _rate(hist_then)
        factor = (rate_now / rate_then) if rate_then else None
        median_now = float(np.median(pps)) if len(pps) else 0.0
        older = a.sampler.intervals(180)
        median_then = None
        if len(older) > 2:
            o = older[0]
            osel = o.enforced()
            if np.any(osel):
                median_then = float(np.median(o.packets[osel] / o.seconds))
        drops_by_rule = {}
        for r in np.unique(rules[dr > 0]):
            m = (rules == r) & (dr > 0)
            drops_by_rule[a.kf.rule_name(st.active.slot, int(r))] = {
                "sources": int(m.sum()),
                "drop_pps": float(dr[m].sum() / secs),
                "drop_share_of_rule": float(dr[rules == r].sum() / max(1.0, pk[rules == r].sum())),
            }
        data.update({
            "interval_seconds": round(secs, 2),
            "active_sources": int(len(pk)),
            "pps": round(total / secs, 1),
            "traffic_factor_2min": round(factor, 2) if factor else None,
            "new_sources": new_sources,
            "new_source_share": round(new_sources / len(pk), 4) if len(pk) else 0.0,
            "known_source_packet_share": round(known_share, 4),
            "known_sources_tracked": len(self.known),
            "top_prefixes_packet_share": round(top_pfx_share, 4),
            "top_prefixes": top_prefixes,
            "distinct_prefixes": int(len(uniq)),
            # a spoofed flood drawn from a few prefixes packs many sources into
            # each; real clients rarely share a /24 by the hundred
            "sources_per_prefix": round(len(pk) / len(uniq), 1) if len(uniq) else 0.0,
            "median_source_pps": round(median_now, 2),
            "median_source_pps_before": round(median_then, 2) if median_then is not None else None,
            "rate_histogram": {**{f"le_{b}": hist[i] for i, b in enumerate(RATE_BUCKETS)}, "le_inf": hist[-1]},
            "heaviest_source": str(halves_to_address(int(hi[top_i]), int(lo[top_i]))) if top_i >= 0 else None,
            "heaviest_source_share": round(top_share, 4),
            "drops_by_rule": drops_by_rule,
            "drop_reasons_pps": {k: round(v / hist_now["_seconds"], 1) for k, v in (hist_now or {}).items()
                                 if k in DROP_REASONS and v} if hist_now else {},
        })  # fmt: skip
        data["verdict"], data["reading"] = _reading(data)
        return data


def _rate(delta: dict | None) -> float:
    if not delta or not delta.get("_seconds"):
        return 0.0
    return sum(v for k, v in delta.items() if not k.startswith("_")) / delta["_seconds"]


def _reading(d: dict) -> tuple[str, str]:
    parts = []
    if d["traffic_factor_2min"]:
        parts.append(f"traffic x{d['traffic_factor_2min']:g} in 2 min ({d['pps']:,.0f} pps)")
    else:
        parts.append(f"{d['pps']:,.0f} pps")
    parts.append(f"{d['known_source_packet_share']:.0%} of packets from sources seen before")
    parts.append(f"{d['active_sources']:,} active sources, {d['new_source_share']:.0%} new in the last "
                 f"{d['interval_seconds']:g} s")  # fmt: skip
    parts.append(f"median {d['median_source_pps']:g} pps per source" + (
        f" (was {d['median_source_pps_before']:g})" if d["median_source_pps_before"] is not None else ""))
    drops = "; ".join(f"rule '{r}' drops {v['drop_share_of_rule']:.0%} of its packets from {v['sources']:,} sources"
                      for r, v in sorted(d["drops_by_rule"].items(), key=lambda kv: -kv[1]["drop_pps"]))  # fmt: skip
    if drops:
        parts.append(drops)
    if d["heaviest_source_share"] >= 0.5 and d["active_sources"] > 1:
        verdict = "heavy-hitter"
        hint = (f"a single heavy hitter: {d['heaviest_source']} sends {d['heaviest_source_share']:.0%} of packets")
    elif d["new_source_share"] >= 0.5 and d["known_source_packet_share"] < 0.5 and d["median_source_pps"] <= 10 \
            and d["active_sources"] >= 100:
        verdict = "flood"
        if d["sources_per_prefix"] >= 16:
            heaviest = ", ".join(p["prefix"] for p in d["top_prefixes"][:3])
            where = (f"concentrated in {d['distinct_prefixes']:,} prefixes ({d['sources_per_prefix']:g} sources "
                     f"each, top 10 send {d['top_prefixes_packet_share']:.0%}; heaviest {heaviest})")  # fmt: skip
        else:
            where = (f"spread over {d['distinct_prefixes']:,} prefixes (random spoofing, "
                     f"{d['sources_per_prefix']:g} sources each)")  # fmt: skip
        hint = f"looks like a spoofed flood: mostly new sources at a low rate each, {where}"
    elif d["known_source_packet_share"] >= 0.7 and (d["drops_by_rule"] or (d["traffic_factor_2min"] or 1) >= 1.5):
        verdict = "surge"
        hint = ("looks like a legitimate surge" + (" being limited" if d["drops_by_rule"] else "") +
                ", not an attack")  # fmt: skip
    else:
        verdict = "normal"
        hint = "no clear surge or flood pattern"
    return verdict, f"{'; '.join(parts)} — {hint} (a hint, not a verdict)"


def read(agent) -> dict:
    return agent.insight.read()


def metrics(agent):
    """Metric families for the collector (bounded: fixed buckets, rule labels)."""
    from prometheus_client.core import GaugeMetricFamily

    d = agent.insight.latest
    if not d or "active_sources" not in d:
        return
    for name, key, help_ in (
        ("tidegate_insight_active_sources", "active_sources", "sources that sent in the last sample interval"),
        ("tidegate_insight_new_sources", "new_sources", "sources first seen in the last sample interval"),
        ("tidegate_insight_known_source_share", "known_source_packet_share",
         "share of packets from sources seen before the baseline window"),
        ("tidegate_insight_top_prefix_share", "top_prefixes_packet_share",
         "share of packets from the 10 busiest /24 (IPv4) or /48 (IPv6) prefixes"),
        ("tidegate_insight_heaviest_source_share", "heaviest_source_share", "share of packets from the top source"),
        ("tidegate_insight_median_source_pps", "median_source_pps", "median per-source packet rate"),
    ):
        g = GaugeMetricFamily(name, help_)
        g.add_metric([], float(d[key]))
        yield g
    h = GaugeMetricFamily("tidegate_source_rate_sources", "active sources with a packet rate <= le (cumulative)",
                          labels=["le"])
    for b in RATE_BUCKETS:
        h.add_metric([str(b)], d["rate_histogram"][f"le_{b}"])
    h.add_metric(["+Inf"], d["rate_histogram"]["le_inf"])
    yield h
    r = GaugeMetricFamily("tidegate_rule_dropping_sources", "distinct sources a rule dropped in the last interval",
                          labels=["rule"])
    for rule, v in d["drops_by_rule"].items():
        r.add_metric([rule], v["sources"])
    yield r
