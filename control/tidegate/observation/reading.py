"""The insight reading as pure logic: sampler intervals in, figures, a
verdict and a confidence out.

Every figure is taken over a window of seconds (default 30 s) or against
the agent's baseline, never "per sample interval", so a 1 s and a 5 s
sampler give the same reading:

- a source is *new* when the agent first saw it within the baseline window
  (default 120 s; while the agent is younger than 180 s, its first third
  of uptime is the baseline) or since the current episode began: a flood that lasts longer than
  the baseline window does not turn its sources into known ones, and when it
  ends they are forgotten, so a later wave from the same pool is new again;
- packets per source over the window, and the persistence of sources (the
  share of the window's intervals each one sends in);
- prefix concentration (/24 and /16) and spread (share of sources from
  space no real client sends from: 0/8, 127/8, 224/3);
- the share of packets from known sources;
- the shift in the rate distribution against the baseline (total rate,
  median per-source rate).

The baseline follows the traffic slowly (a 5-minute time constant) and not
at all during a flood, so a flood or a surge is measured against what came
before it, and a crowd that stays becomes the new normal.
"""

from __future__ import annotations

import threading

import numpy as np

from tidegate.kernel.layout import halves_to_address
from tidegate.observation.window import SourceWindow, is_ipv4, prefix_keys, prefix_name, source_keys, unique

WINDOW_SECONDS = 30.0
RATE_BUCKETS = (1, 10, 100, 1000, 10000)  # per-source pps upper bounds; +Inf implied
TOP_PREFIXES = 5
MAX_KNOWN = 2_000_000
HUMAN_PPS = 5.0  # a person's client rarely keeps above this for a window
DENSE_PREFIX = 16  # sources in one /24 that no set of real clients reaches
ATTACKS = ("flood", "mixed")
ONSET_SHARE = 0.2  # new sources' share of packets from which a window counts towards a flood's onset
VERDICTS = ("learning", "normal", "unusual", "flood", "mixed", "flash-crowd", "surge", "heavy-hitter", "quiet")


class KnownSources:
    """Source keys the agent has seen, with when it first and last saw them
    (`last` only orders who goes over the cap: 4 bytes, ms-close for weeks of
    uptime; a flood fills the set to its cap, 20 bytes a key)."""

    def __init__(self, max_known: int = MAX_KNOWN):
        self.max_known = max_known
        self.keys = np.array([], dtype=np.uint64)
        self.first = np.array([], dtype=np.float64)
        self.last = np.array([], dtype=np.float32)
        self._lock = threading.Lock()

    def update(self, hi: np.ndarray, lo: np.ndarray, now: float) -> None:
        k = unique(source_keys(hi, lo))
        with self._lock:
            idx = np.searchsorted(self.keys, k)
            idx_c = np.minimum(idx, max(0, len(self.keys) - 1))
            found = (self.keys[idx_c] == k) if len(self.keys) else np.zeros(len(k), bool)
            self.last[idx_c[found]] = now
            new = k[~found]
            # one array rebuilt at a time, no sort: a flood's million new keys a
            # sample, into millions known, cost one array's copy at the peak
            if len(new):
                at = idx[~found]  # where each (sorted, distinct) new key goes
                self.keys = np.insert(self.keys, at, new)
                self.first = np.insert(self.first, at, now)
                self.last = np.insert(self.last, at, now)
            over = len(self.keys) - self.max_known
            if over > 0:  # the least recently seen go
                keep = np.ones(len(self.keys), bool)
                keep[np.argpartition(self.last, over - 1)[:over]] = False
                self.keys, self.first, self.last = self.keys[keep], self.first[keep], self.last[keep]

    def forget_after(self, t: float) -> None:
        """Drop the sources first seen after t (a flood's, when it ends): one
        that keeps sending is first seen anew, and known a baseline later."""
        with self._lock:
            keep = self.first <= t
            self.keys, self.first, self.last = self.keys[keep], self.first[keep], self.last[keep]

    def first_seen(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """First-seen time per source (inf when unknown)."""
        return self.first_seen_keys(source_keys(hi, lo))

    def first_seen_keys(self, k: np.ndarray) -> np.ndarray:
        """First-seen time per source key (observation.window.source_keys; inf when unknown)."""
        with self._lock:
            if not len(self.keys):
                return np.full(len(k), np.inf)
            idx = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
            found = self.keys[idx] == k
            return np.where(found, self.first[idx], np.inf)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):  # copyable (the shape runner forks a baseline), the lock is not
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Baseline:
    """What this agent's traffic looks like when it reads normal."""

    def __init__(self):
        self.pps: float | None = None
        self.median_source_pps: float | None = None
        self.sources: float | None = None
        self.seconds = 0.0  # how much traffic it has been fed
        self.episode_start: float | None = None  # when the current flood began
        self.last_attack: float | None = None  # the end of the newest interval that read as a flood
        self.new_since: float | None = None  # start of the run of windows whose traffic is mostly new sources'

    def follow(self, fig: dict, verdict: str, now: float) -> float | None:
        """A flood freezes the baseline, and its sources stay new while it
        lasts; anything else moves the baseline slowly (a 5-minute time
        constant), so a crowd that stays becomes the new normal. Returns the
        start of an episode that ends with this reading (else None): the
        caller forgets the sources first seen after it, so a flood's sources
        never turn known by age alone."""
        if 1.0 - fig["known_source_packet_share"] < ONSET_SHARE or not fig["sources"]:
            self.new_since = None
        elif self.new_since is None:
            self.new_since = fig["window_start"]
        if verdict in ATTACKS and self.pps is not None:
            if self.episode_start is None:
                # it may have ramped up unseen for a window or two, or read as
                # something else while new sources already carried its traffic,
                # before it read as a flood: its first sources must not turn known
                # (sources that new are new by the baseline window anyway)
                self.episode_start = min(fig["window_start"] - fig["window_seconds"],
                                         self.new_since if self.new_since is not None else np.inf)  # fmt: skip
            self.last_attack = now
            return None
        if self.episode_start is not None and fig["window_start"] < (self.last_attack or 0.0):
            return None  # the window still holds the flood's tail: the episode goes on, the baseline stays frozen
        ended, self.episode_start = self.episode_start, None
        w = min(1.0, fig["interval_seconds"] / 300.0) if self.pps is not None else 1.0
        for name, key in (("pps", "pps"), ("median_source_pps", "median_source_pps"), ("sources", "sources")):
            old = getattr(self, name)
            setattr(self, name, fig[key] if old is None else old + w * (fig[key] - old))
        self.seconds += fig["interval_seconds"]
        return ended


P24 = (24, 48)  # IPv4 /24, IPv6 /48
P16 = (16, 32)  # IPv4 /16, IPv6 /32


def _concentration(hi, lo, pk, bits) -> tuple[int, float, list[dict]]:
    key = prefix_keys(hi, lo, *bits)
    uniq, inv = np.unique(key, return_inverse=True)
    if not len(uniq):
        return 0, 0.0, []
    per = np.bincount(inv, weights=pk, minlength=len(uniq))
    srcs = np.bincount(inv, minlength=len(uniq))
    total = float(pk.sum()) or 1.0
    order = np.argsort(per)[::-1]
    top = [{"prefix": prefix_name(int(uniq[j]), *bits), "packet_share": round(float(per[j] / total), 4),
            "sources": int(srcs[j])} for j in order[:TOP_PREFIXES].tolist()]  # fmt: skip
    return len(uniq), float(per[order[:10]].sum() / total), top


def _impossible(hi, lo) -> np.ndarray:
    """Sources no real client sends from: 0/8, 127/8, 224/3 (multicast, reserved)."""
    first = (lo >> np.uint64(32)) & np.uint64(0xFF)
    return is_ipv4(lo) & ((first == 0) | (first == 127) | (first >= 224))


def figures(intervals: list, known: KnownSources, known_before: float, now: float,
            rule_name=lambda r: f"rule{r}") -> dict:
    """The figures behind a reading, over `intervals` (enforced per-source
    rows only; the caller picks the window)."""
    ivs = [iv for iv in intervals if iv is not None]
    t0, t1 = ivs[0].t0, ivs[-1].t1
    secs = max(1e-9, t1 - t0)
    rows = SourceWindow(ivs).select(enforced=True)
    rule_rows = rows.rule
    pk_rows, dr_rows = rows.packets.astype(np.float64), rows.drops.astype(np.float64)
    uk, first_row, inv = rows.sources()
    n = len(uk)
    pk = np.bincount(inv, weights=pk_rows, minlength=n)
    hi_u, lo_u = rows.hi[first_row], rows.lo[first_row]
    del rows, uk, first_row  # the rows' other columns: a flood's interval holds a row per LRU entry
    present = np.bincount(inv, minlength=n)  # intervals each source sent in
    total = float(pk.sum())
    fig: dict = {"window_seconds": round(secs, 1), "window_start": t0, "interval_seconds": round(ivs[-1].seconds, 2),
                 "intervals": len(ivs), "newest_interval_start": ivs[-1].t0,
                 "sample_age_seconds": round(max(0.0, now - t1), 1),
                 "pps": round(total / secs, 1), "sources": n}  # fmt: skip
    first = known.first_seen(hi_u, lo_u)
    new = first > known_before
    spps = pk / secs
    fig["new_sources"] = int(new.sum())
    fig["new_source_share"] = round(float(new.mean()), 4) if n else 0.0
    fig["known_source_packet_share"] = round(float(pk[~new].sum() / total), 4) if total else 0.0
    fig["known_pps"] = round(float(pk[~new].sum() / secs), 1)
    fig["new_pps"] = round(float(pk[new].sum() / secs), 1)
    fig["median_source_pps"] = round(float(np.median(spps)), 3) if n else 0.0
    fig["median_new_source_pps"] = round(float(np.median(spps[new])), 3) if new.any() else 0.0
    fig["median_known_source_pps"] = round(float(np.median(spps[~new])), 3) if (~new).any() else 0.0
    fig["packets_per_source"] = round(float(np.median(pk)), 1) if n else 0.0
    fig["persistence"] = round(float(np.median(present / len(ivs))), 3) if n else 0.0
    fig["new_persistence"] = round(float(np.median(present[new] / len(ivs))), 3) if new.any() else 0.0
    hist = [int(np.count_nonzero(spps <= b)) for b in RATE_BUCKETS] + [n]
    fig["rate_histogram"] = {**{f"le_{b}": hist[i] for i, b in enumerate(RATE_BUCKETS)}, "le_inf": hist[-1]}
    # concentration and spread of the new sources (a flood's), else of all
    sel = new if new.sum() >= 50 else np.ones(n, bool)
    npx, top10, top = _concentration(hi_u[sel], lo_u[sel], pk[sel], P24)
    n16, top10_16, top16 = _concentration(hi_u[sel], lo_u[sel], pk[sel], P16)
    fig["distinct_prefixes"] = npx
    fig["sources_per_prefix"] = round(int(sel.sum()) / npx, 1) if npx else 0.0
    fig["top_prefixes_packet_share"] = round(top10, 4)
    fig["top_prefixes"] = top
    fig["distinct_16s"] = n16
    fig["top_16_packet_share"] = top16[0]["packet_share"] if top16 else 0.0
    fig["top_16s"] = top16
    # packets from /24 prefixes that hold 16 or more of these sources: real
    # clients rarely share a /24 by the dozen, a concentrated spoof packs them
    k24 = prefix_keys(hi_u[sel], lo_u[sel], *P24)
    u24, i24 = np.unique(k24, return_inverse=True)
    dense = (np.bincount(i24, minlength=len(u24)) >= DENSE_PREFIX)[i24] if len(u24) else np.zeros(0, bool)
    fig["dense_prefix_sources"] = int(dense.sum())
    fig["dense_prefix_packet_share"] = round(float(pk[sel][dense].sum() / max(1.0, pk[sel].sum())), 4)
    fig["impossible_source_share"] = round(float(_impossible(hi_u[sel], lo_u[sel]).mean()), 4) if sel.any() else 0.0
    order = np.argsort(pk)[::-1][:10]
    shares = pk[order] / total if total else np.zeros(len(order))
    fig["heaviest_source"] = str(halves_to_address(int(hi_u[order[0]]), int(lo_u[order[0]]))) if n else None
    fig["heaviest_source_share"] = round(float(shares[0]), 4) if n else 0.0
    hitters = [(str(halves_to_address(int(hi_u[j]), int(lo_u[j]))), round(float(s), 4))
               for j, s in zip(order.tolist(), shares.tolist()) if s >= 0.05]  # fmt: skip
    fig["heavy_hitters"] = [{"source": a, "packet_share": s} for a, s in hitters]
    drops_by_rule = {}
    for r in unique(rule_rows[dr_rows > 0]).tolist():
        m = rule_rows == r
        drops_by_rule[rule_name(int(r))] = {
            "sources": int(len(unique(inv[m & (dr_rows > 0)]))),
            "drop_pps": round(float(dr_rows[m].sum() / secs), 1),
            "drop_share_of_rule": round(float(dr_rows[m].sum() / max(1.0, pk_rows[m].sum())), 4)}
    fig["drops_by_rule"] = drops_by_rule
    # which rules the new sources' packets hit (the rule a flood hits)
    new_rows = new[inv] if n else np.zeros(0, bool)
    new_total = float(pk_rows[new_rows].sum())
    fig["new_packets_by_rule"] = {
        rule_name(int(r)): round(float(pk_rows[new_rows & (rule_rows == r)].sum() / new_total), 4)
        for r in unique(rule_rows[new_rows]).tolist()} if new_total else {}  # fmt: skip
    fig["known_before"] = known_before
    return fig


def judge(fig: dict, base: Baseline, baseline_seconds: float, baseline_covered: float,
          sample_interval: float, learning: bool = False) -> tuple[str, float, str]:
    """(verdict, confidence 0..1, plain words) from the figures."""
    f = fig
    f["baseline_pps"] = round(base.pps, 1) if base.pps is not None else None
    f["baseline_median_source_pps"] = round(base.median_source_pps, 3) if base.median_source_pps is not None else None
    # against at least 1 pps: from silence, any traffic is a jump
    f["traffic_factor"] = round(f["pps"] / max(1.0, base.pps), 2) if base.pps is not None else None
    f["known_traffic_factor"] = round(f["known_pps"] / max(1.0, base.pps), 2) if base.pps is not None else None
    f["rate_shift"] = (round(f["median_source_pps"] / base.median_source_pps, 2)
                       if base.median_source_pps else None)  # fmt: skip
    f["baseline_seconds"] = round(baseline_covered, 1)
    factor = f["traffic_factor"] or 1.0
    known_factor = f["known_traffic_factor"] or 1.0
    nn = f["new_sources"]
    new_share_pk = 1.0 - f["known_source_packet_share"]
    spoof = f["impossible_source_share"] >= 0.01 and nn >= 100
    concentrated = f["dense_prefix_sources"] >= 200 and f["dense_prefix_packet_share"] >= 0.5
    never_repeat = nn >= 1000 and f["packets_per_source"] <= 1.5 and f["new_persistence"] <= 0.34
    botnet = nn >= 1000 and f["median_new_source_pps"] > HUMAN_PPS and f["new_persistence"] >= 0.5
    flood = new_share_pk >= 0.3 and (spoof or concentrated or never_repeat or botnet) and factor >= 1.5
    hitters = f["heavy_hitters"]
    hitter_share = sum(h["packet_share"] for h in hitters)
    strength = 0.6
    if learning:
        verdict, hint = "learning", "the first sample: this is the baseline the next readings are measured against"
        strength = 0.2
    elif f["sources"] == 0 or f["pps"] < 1:
        verdict, hint = "quiet", "no traffic to speak of"
    elif hitters and hitter_share >= 0.5 and len(hitters) <= 5 and f["sources"] > len(hitters):
        verdict = "heavy-hitter"
        names = ", ".join(f"{h['source']} ({h['packet_share']:.0%})" for h in hitters)
        hint = (f"{len(hitters)} heavy hitter{'s' if len(hitters) > 1 else ''} send {hitter_share:.0%} "
                f"of packets: {names}")  # fmt: skip
        strength = min(1.0, 0.5 + hitter_share / 2)
    elif flood:
        why = []
        if spoof:
            why.append(f"{f['impossible_source_share']:.0%} of new sources from space no client sends from "
                       "(random spoofing, spread over the whole space)")  # fmt: skip
        if concentrated:
            where = ", ".join(p["prefix"] for p in (f["top_16s"] if f["top_16_packet_share"] >= 0.5
                                                    else f["top_prefixes"])[:3])  # fmt: skip
            why.append(f"concentrated: {f['dense_prefix_sources']:,} new sources packed {DENSE_PREFIX} or more "
                       f"to a /24 send {f['dense_prefix_packet_share']:.0%} of their packets "
                       f"(heaviest {where})")  # fmt: skip
        if never_repeat:
            why.append(f"sources never repeat ({f['packets_per_source']:g} packets each in "
                       f"{f['window_seconds']:g} s)")  # fmt: skip
        if botnet:
            why.append(f"{nn:,} new sources keep a rate no person does ({f['median_new_source_pps']:g} pps "
                       f"each, in {f['new_persistence']:.0%} of intervals): a botnet")  # fmt: skip
        strength = min(1.0, 0.55 + 0.15 * len(why) + 0.2 * min(1.0, new_share_pk))
        if known_factor >= 1.5 and f["known_source_packet_share"] >= 0.05:
            verdict = "mixed"
            hint = (f"a flood during a surge of known clients (known traffic x{known_factor:g}): "
                    + "; ".join(why))  # fmt: skip
        else:
            verdict = "flood"
            hint = "looks like a flood: " + "; ".join(why)
    elif new_share_pk >= 0.2 and nn >= 30 and factor >= 1.2:
        verdict = "flash-crowd"
        hint = (f"a crowd of {nn:,} new clients at human rates ({f['median_new_source_pps']:g} pps each, "
                f"real address space)" + (", being limited" if f["drops_by_rule"] else ""))  # fmt: skip
        strength = 0.7 if f["median_new_source_pps"] <= HUMAN_PPS else 0.5
    elif f["known_source_packet_share"] >= 0.7 and (known_factor >= 1.5 or (f["rate_shift"] or 1) >= 1.5):
        verdict = "surge"
        hint = "a surge of known clients" + (" being limited" if f["drops_by_rule"] else "") + ", not an attack"
        strength = min(1.0, 0.5 + f["known_source_packet_share"] / 2)
    elif base.pps is None or (0.5 <= factor <= 1.5 and f["known_source_packet_share"] >= 0.7
                              and 0.5 <= (f["rate_shift"] or 1) <= 2):
        verdict, hint = "normal", "like its own baseline"
        strength = 0.8
    else:
        verdict, hint = "unusual", "unlike its baseline, but no known pattern"
        strength = 0.4
    coverage = min(1.0, baseline_covered / baseline_seconds) if baseline_seconds else 1.0
    confidence = strength * (0.5 + 0.5 * coverage)
    stale = f["sample_age_seconds"] > 2 * sample_interval
    if stale:
        confidence *= 0.5
    if f["sources"] < 20 and verdict != "quiet":
        confidence *= 0.7
    f["stale"] = stale
    return verdict, round(confidence, 2), _words(f, verdict, hint, confidence, stale)


def _words(f: dict, verdict: str, hint: str, confidence: float, stale: bool) -> str:
    parts = [f"{f['pps']:,.0f} pps" + (f" (x{f['traffic_factor']:g} its baseline of {f['baseline_pps']:,.0f})"
                                        if f["traffic_factor"] is not None else ", no baseline yet")]  # fmt: skip
    parts.append(f"{f['known_source_packet_share']:.0%} of packets from known sources")
    parts.append(f"{f['sources']:,} sources in {f['window_seconds']:g} s, {f['new_sources']:,} first seen within "
                 f"the baseline window")  # fmt: skip
    parts.append(f"median {f['median_source_pps']:g} pps and {f['packets_per_source']:g} packets per source, "
                 f"present in {f['persistence']:.0%} of intervals")  # fmt: skip
    for r, v in sorted(f["drops_by_rule"].items(), key=lambda kv: -kv[1]["drop_pps"]):
        parts.append(f"rule '{r}' drops {v['drop_share_of_rule']:.0%} of its packets from {v['sources']:,} sources")
    text = f"{verdict}: {hint}. " + "; ".join(parts) + f" (confidence {confidence:.0%}; a hint, not a verdict)"
    if stale:
        text = (f"STALE: the newest sample is {f['sample_age_seconds']:g} s old, more than two sample "
                f"intervals. " + text)  # fmt: skip
    return text


class Reader:
    """Known sources, the baseline and the last window of intervals: feed it
    intervals as the sampler makes them, read at any time."""

    def __init__(self, baseline_seconds: float = 120.0, sample_interval: float = 5.0, start: float = 0.0,
                 window_seconds: float = WINDOW_SECONDS):
        self.baseline_seconds = baseline_seconds
        self.sample_interval = sample_interval
        self.window_seconds = window_seconds
        self.start = start
        self.known = KnownSources()
        self.baseline = Baseline()
        self.window: list = []
        self.first_sample: float | None = None  # the end of the first interval: its sources are the first known
        self._last: tuple[dict, float] | None = None  # the reading as of the newest interval, and its end
        self._lock = threading.Lock()

    def __getstate__(self):  # copyable (the shape runner forks a baseline), the lock is not
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def covered(self, now: float) -> float:
        """Seconds of baseline a young agent has: its sources seen in its first
        third of uptime are the known ones."""
        return max(0.0, now - self.start) * 2 / 3

    def known_before(self, now: float) -> float:
        eff = min(self.baseline_seconds, self.covered(now))
        cut = now - eff
        if self.baseline.episode_start is not None:
            cut = min(cut, self.baseline.episode_start)
        # the first sample's sources are the agent's first baseline
        return max(cut, self.first_sample if self.first_sample is not None else now)

    def add(self, iv, rule_name=lambda r: f"rule{r}", window=None) -> dict:
        """Fold one interval in; returns the reading as of its end. `window`:
        the intervals before it as their owner holds them now (the sampler
        folds its older ones: the reader must not keep the full ones alive)."""
        with self._lock:
            if self.first_sample is None:
                self.first_sample = iv.t1
            if window is not None:
                self.window = [w for w in window if w is not iv and w.t1 <= iv.t0 + 1e-6]
            self.window.append(iv)
            while self.window and self.window[0].t0 < iv.t1 - self.window_seconds - 1e-6:
                self.window.pop(0)
            d = self._read(iv.t1, rule_name)
            self._last = (d, iv.t1)
            if "verdict" in d:
                ended = self.baseline.follow(d, d["verdict"], iv.t1)
                if ended is not None:  # the sources that were new to the episode (the first sample's stay)
                    self.known.forget_after(max(ended, self.first_sample))
            m = iv.enforced()
            self.known.update(iv.hi[m], iv.lo[m], iv.t1)
            return d

    def read(self, now: float, rule_name=lambda r: f"rule{r}") -> dict:
        """The reading made when the newest interval came in (figures over a
        window of up to millions of rows are not recomputed per call), with
        its age as of now."""
        last = self._last  # swapped whole by add(): no lock, so a call never waits for a sample
        if last is None or "verdict" not in last[0]:
            with self._lock:
                return self._read(now, rule_name)
        d, t1 = dict(last[0]), last[1]
        d["sample_age_seconds"] = round(max(0.0, now - t1), 1)
        d["stale"] = d["sample_age_seconds"] > 2 * self.sample_interval
        if d["stale"]:
            d["confidence"] = round(d["confidence"] * 0.5, 2)
            d["reading"] = (f"STALE: the newest sample is {d['sample_age_seconds']:g} s old, more than two sample "
                            f"intervals. " + d["reading"])  # fmt: skip
        return d

    def _read(self, now: float, rule_name) -> dict:
        data: dict = {"disclaimer": "a hint from counters, not a verdict"}
        if not self.window:
            data["reading"] = "no per-source samples yet: wait a few seconds"
            return data
        # the figures need every source's row: over the newest intervals the
        # sampler has not folded (observation/fold.py), and they say so
        start = len(self.window) - 1
        while start > 0 and getattr(self.window[start - 1], "folded", None) is None:
            start -= 1
        f = figures(self.window[start:], self.known, self.known_before(now), now, rule_name)
        verdict, conf, text = judge(f, self.baseline, self.baseline_seconds,
                                    min(self.baseline_seconds, self.covered(now)), self.sample_interval,
                                    learning=now <= self.first_sample + 1e-9)
        if start:  # figures over fewer seconds than the window: the sampler folded the older intervals
            f["folded_intervals"] = start
            text = (f"over the newest {f['window_seconds']:g} s only: the {start} older interval(s) of the "
                    f"{self.window_seconds:g} s window were folded (too many sources to keep each one's row). "
                    + text)  # fmt: skip
        data.update(f)
        data.update({"verdict": verdict, "confidence": conf, "reading": text})
        return data
