"""Traffic insight: tell a flash crowd from a flood, from the kernel's own
per-source state.

The sampler's intervals (entries that moved in each; one batched map read
per interval) are folded into a `reading.Reader`: a set of known source
keys (a sorted numpy array of 64-bit hashes with first/last-seen times,
capped), the agent's baseline, and the last 30 s of intervals. The figures
and the verdict are pure logic in reading.py; this module ties them to the
agent and exports them. The reading is a hint built from the numbers it
prints, not a verdict.
"""

from __future__ import annotations

import time

from tidegate.observation.reading import RATE_BUCKETS, VERDICTS, KnownSources, Reader  # noqa: F401  (KnownSources: re-export)


class Insight:
    """Keeps the reader fed from the sampler; serves the latest reading."""

    def __init__(self, kf, sampler, baseline_seconds: float = 120.0, window_seconds: float = 30.0):
        """kf: the kernel filter (the active set's rule names); sampler: the intervals read."""
        self.kf, self.sampler = kf, sampler
        self.baseline_seconds = baseline_seconds
        self.reader = Reader(baseline_seconds, sampler.interval, start=time.monotonic(),
                             window_seconds=window_seconds)
        self.known = self.reader.known
        self.latest: dict | None = None
        self._last_iv = None

    def _rule_name(self):
        st = self.kf.state()
        if st.active is None:
            return lambda r: f"rule{r}"
        return lambda r: self.kf.rule_name(st.active.slot, r)

    def on_sample(self) -> None:
        """Sampler listener: fold the new interval in and keep its reading
        for the metrics and for readers."""
        iv = self.sampler.last_interval()
        if iv is None or iv is self._last_iv:
            return
        self._last_iv = iv
        # the window as the sampler holds it now: the reader keeps no interval the sampler folded
        window = self.sampler.intervals(self.reader.window_seconds + self.sampler.interval)
        self.latest = self.reader.add(iv, self._rule_name(), window=window)

    def read(self) -> dict:
        """The reading as of now: a reading whose newest sample is older
        than two sample intervals says so."""
        d = self.reader.read(time.monotonic(), self._rule_name())
        s = self.sampler
        d["sampler"] = {"interval_seconds": s.interval, "cpu_seconds": round(s.cpu_seconds, 3),
                        "last_sample_seconds": round(s.sample_seconds, 4)}
        return d


def metrics(latest: dict | None):
    """Metric families of the latest reading, for the collector (bounded: fixed buckets, rule labels)."""
    from prometheus_client.core import GaugeMetricFamily

    d = latest
    if not d or "sources" not in d:
        return
    vm = GaugeMetricFamily("tidegate_insight_verdict",
                           "the latest insight reading: 1 for its verdict, 0 for the others", labels=["verdict"])
    for name in VERDICTS:
        vm.add_metric([name], 1.0 if d["verdict"] == name else 0.0)
    yield vm
    for name, key, help_ in (
        ("tidegate_insight_confidence", "confidence", "confidence of the latest insight reading (0 to 1)"),
        ("tidegate_insight_active_sources", "sources", "sources that sent in the insight window (30 s)"),
        ("tidegate_insight_new_sources", "new_sources", "sources in the window first seen within the baseline window"),
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
