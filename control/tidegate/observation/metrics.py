"""Prometheus metrics: a custom collector that reads the kernel at scrape
time, so a scrape is always current. Cardinality is bounded: labels are
verdicts, reasons and rule names, never sources. The tracked-source count
comes from the sampler's last snapshot, so a scrape does no per-source work.
"""

from __future__ import annotations

import logging
import time
from http.server import ThreadingHTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry, ProcessCollector, PlatformCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from tidegate.kernel.layout import DROP_REASONS, RULE_DROP_REASONS

log = logging.getLogger("tidegate.observation.metrics")


class FilterCollector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        up = GaugeMetricFamily("tidegate_agent_up", "1 while the agent serves")
        up.add_metric([], 1)
        yield up
        attached = a.attached()
        g = GaugeMetricFamily("tidegate_attached", "1 when the XDP program is attached")
        g.add_metric([], 1 if attached else 0)
        yield g
        st = a.kf.state()
        av = GaugeMetricFamily("tidegate_active_version", "version number of the active rule set (0 = none)")
        av.add_metric([], st.active.version if st.active else 0)
        yield av
        since = GaugeMetricFamily("tidegate_active_version_since_timestamp_seconds",
                                  "Unix time the active rule set last became active (0 = none)")
        since.add_metric([], (a.store.activated_at(st.active.version) or 0.0) if st.active else 0.0)
        yield since
        sv = GaugeMetricFamily("tidegate_shadow_version", "version number of the shadow rule set (0 = none)")
        sv.add_metric([], st.shadow.version if st.shadow else 0)
        yield sv
        ts = GaugeMetricFamily("tidegate_tracked_sources", "sources with state under the active rule set "
                               "(from the last per-source sample)")
        ts.add_metric([], a.sampler.tracked_sources)
        yield ts
        # the sampler's own cost: one batched read of the per-source LRU per --sample-interval
        sd = GaugeMetricFamily("tidegate_sample_duration_seconds", "time the last per-source snapshot took")
        sd.add_metric([], a.sampler.sample_seconds)
        yield sd
        if a.sampler.last_sample is not None:
            sa = GaugeMetricFamily("tidegate_sample_age_seconds", "seconds since the last per-source snapshot")
            sa.add_metric([], max(0.0, time.monotonic() - a.sampler.last_sample))
            yield sa
        ch = CounterMetricFamily("tidegate_rule_set_changes", "rule-set changes by result", labels=["result"])
        for result, n in a.change_results.items():
            ch.add_metric([result], n)
        yield ch
        rb = CounterMetricFamily("tidegate_rollbacks", "rollbacks by cause", labels=["cause"])
        for cause in sorted(set(a.rollbacks) | {"manual", "guard-drop-share", "guard-dropped-sources",
                                                "guard-canary"}):  # fmt: skip
            rb.add_metric([cause], a.rollbacks.get(cause, 0))
        yield rb
        ra = CounterMetricFamily("tidegate_reattaches", "times the program was found detached and attached again")
        ra.add_metric([], getattr(a, "reattaches", 0))
        yield ra
        if a.admission is not None:
            rf = CounterMetricFamily("tidegate_api_refused", "API calls refused before they ran, by reason",
                                     labels=["reason"])  # fmt: skip
            for reason, n in a.admission.refused_total.items():
                rf.add_metric([reason], n)
            yield rf
        mit = getattr(a, "mitigation", None)
        if mit is not None:
            am = CounterMetricFamily("tidegate_auto_mitigations", "auto-mitigations (--auto-mitigate) by result",
                                     labels=["result"])  # fmt: skip
            for result, n in mit.results.items():
                am.add_metric([result], n)
            yield am
            aa = GaugeMetricFamily("tidegate_auto_mitigation_active", "1 while an auto-mitigation is active")
            aa.add_metric([], 1 if mit.active else 0)
            yield aa
        gw = GaugeMetricFamily("tidegate_guard_active", "1 while a guarded apply is being watched")
        gw.add_metric([], 1 if (a.guard and a.guard.watching) else 0)
        yield gw
        try:
            c = a.kf.counters()
        except Exception as e:  # not loaded: still export the gauges above
            log.debug("no counters: %s", e)
            return
        pk = CounterMetricFamily("tidegate_packets", "packets seen by the XDP program", labels=["verdict", "reason"])
        by = CounterMetricFamily("tidegate_bytes", "bytes seen by the XDP program", labels=["verdict", "reason"])
        for reason, (p, b) in c.reasons.items():
            verdict = "drop" if reason in DROP_REASONS else "pass"
            pk.add_metric([verdict, reason], p)
            by.add_metric([verdict, reason], b)
        yield pk
        yield by
        rp = CounterMetricFamily("tidegate_rule_packets", "packets per rule and verdict", labels=["rule", "verdict"])
        rd = CounterMetricFamily("tidegate_rule_drops", "drops per rule and reason", labels=["rule", "reason"])
        for name, rc in sorted(c.rules.items()):
            rp.add_metric([name, "pass"], rc.pass_packets)
            rp.add_metric([name, "drop"], rc.drop_packets)
            for reason in RULE_DROP_REASONS:
                rd.add_metric([name, reason], getattr(rc, f"drop_{reason}"))
        yield rp
        yield rd
        sw = CounterMetricFamily("tidegate_shadow_would_drop", "packets the shadow set would drop, per rule",
                                 labels=["rule"])  # fmt: skip
        sn = CounterMetricFamily("tidegate_shadow_would_drop_new",
                                 "packets the shadow set would drop that the active set passes", labels=["rule"])
        for name, sc in sorted(c.shadow.items()):
            sw.add_metric([name], sc.would_drop)
            sn.add_metric([name], sc.would_drop_new)
        yield sw
        yield sn
        li = CounterMetricFamily("tidegate_lru_inserts", "new per-source state entries")
        li.add_metric([], c.lru_inserts)
        yield li
        lf = CounterMetricFamily("tidegate_lru_insert_failures", "per-source state entries that could not be created")
        lf.add_metric([], c.lru_insert_failures)
        yield lf
        ev = CounterMetricFamily("tidegate_lru_evictions_estimated",
                                 "entries evicted from the per-source LRU (inserts minus entries present)")
        ev.add_metric([], max(0, c.lru_inserts - a.sampler.tracked_entries))
        yield ev
        extra = getattr(a, "insight_metrics", None)
        if extra is not None:
            yield from extra()


def build_registry(agent) -> CollectorRegistry:
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    reg.register(FilterCollector(agent))
    return reg


def serve(agent, host: str, port: int) -> ThreadingHTTPServer:
    reg = build_registry(agent)
    handler = MetricsHandler.factory(reg)
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    Thread(target=srv.serve_forever, name="metrics", daemon=True).start()
    return srv
