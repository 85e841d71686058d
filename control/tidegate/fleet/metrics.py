"""Fleet metrics for Prometheus, read from etcd at scrape time by
`tidegate fleet exporter` (one per fleet, anywhere that can read etcd).

    tidegate_fleet_hosts{state}                 live hosts by state (in-sync, guarding, drift, nack, rolled-back)
    tidegate_fleet_hosts_by_version{digest}     live hosts by active version (12-character digest)
    tidegate_fleet_hosts_gone                   hosts with desired state but no status (lease expired)
    tidegate_fleet_host_drift{host}             1 for each host in drift (absent otherwise)
    tidegate_fleet_rollout_phase{phase}         1 for the newest rollout's phase
    tidegate_fleet_rollout_wave                 its wave (1-based) and number of waves, failures
    tidegate_fleet_shadow_*                     summed over live hosts with a shadow loaded: packets,
                                                would-drop packets, sources seen and would-drop sources
    tidegate_fleet_etcd_up                      1 when the last read of etcd worked

Cardinality: states and phases are fixed sets; versions are the few a fleet
runs at once; drift is per host but only for hosts in drift.
"""

from __future__ import annotations

import logging
from http.server import ThreadingHTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from tidegate.fleet.etcd import Etcd, EtcdUnavailable
from tidegate.fleet.keys import COMPLETED, FAILED, HALTED, HALTING, REFUSED, SHADOW, WAVE, Keys
from tidegate.fleet.views import current_rollout, hosts

log = logging.getLogger("tidegate.fleet.metrics")

STATES = ("in-sync", "guarding", "drift", "nack", "rolled-back")
PHASES = (SHADOW, WAVE, HALTING, COMPLETED, HALTED, REFUSED, FAILED)


class FleetCollector:
    def __init__(self, etcd: Etcd, keys: Keys):
        self.etcd = etcd
        self.keys = keys

    def collect(self):
        up = GaugeMetricFamily("tidegate_fleet_etcd_up", "1 when the exporter could read the fleet from etcd",
                               labels=["fleet"])  # fmt: skip
        f = self.keys.fleet
        try:
            rows = hosts(self.etcd, self.keys)
            rec = current_rollout(self.etcd, self.keys)
        except EtcdUnavailable as e:
            log.warning("etcd unreachable: %s", e)
            up.add_metric([f], 0)
            yield up
            return
        up.add_metric([f], 1)
        yield up
        live = [r for r in rows if r["alive"]]
        st = GaugeMetricFamily("tidegate_fleet_hosts", "live hosts by state", labels=["fleet", "state"])
        for s in STATES:
            st.add_metric([f, s], sum(1 for r in live if r["state"] == s))
        yield st
        bv = GaugeMetricFamily("tidegate_fleet_hosts_by_version", "live hosts by active version digest",
                               labels=["fleet", "digest"])  # fmt: skip
        counts: dict[str, int] = {}
        for r in live:
            counts[r["active_digest"][:12]] = counts.get(r["active_digest"][:12], 0) + 1
        for d, n in sorted(counts.items()):
            bv.add_metric([f, d], n)
        yield bv
        gone = GaugeMetricFamily("tidegate_fleet_hosts_gone", "hosts with a desired state but no live status",
                                 labels=["fleet"])  # fmt: skip
        gone.add_metric([f], len(rows) - len(live))
        yield gone
        dr = GaugeMetricFamily("tidegate_fleet_host_drift", "1 for a host whose active version is not the one "
                               "the fleet asked for (a local change)", labels=["fleet", "host"])  # fmt: skip
        for r in live:
            if r["drift"]:
                dr.add_metric([f, r["host"]], 1)
        yield dr
        ph = GaugeMetricFamily("tidegate_fleet_rollout_phase", "1 for the phase of the newest rollout",
                               labels=["fleet", "phase"])  # fmt: skip
        for p in PHASES:
            ph.add_metric([f, p], 1 if rec and rec.get("phase") == p else 0)
        yield ph
        if rec:
            w = GaugeMetricFamily("tidegate_fleet_rollout_wave", "wave of the newest rollout (1-based)",
                                  labels=["fleet"])  # fmt: skip
            w.add_metric([f], min(rec.get("wave", 0) + 1, len(rec.get("waves", []))))
            yield w
            nw = GaugeMetricFamily("tidegate_fleet_rollout_waves", "waves of the newest rollout", labels=["fleet"])
            nw.add_metric([f], len(rec.get("waves", [])))
            yield nw
            fl = GaugeMetricFamily("tidegate_fleet_rollout_failed_hosts", "failed hosts of the newest rollout",
                                   labels=["fleet"])  # fmt: skip
            fl.add_metric([f], len(rec.get("failures", [])))
            yield fl
        sums = {"packets": 0, "would_drop_new": 0, "sources_seen": 0, "sources_would_drop": 0}
        for r in live:
            n = r.get("shadow_numbers") or {}
            for k in sums:
                sums[k] += int(n.get(k, 0))
        for k, help_ in (("packets", "packets the shadow sets saw"),
                         ("would_drop_new", "packets the shadow sets would newly drop"),
                         ("sources_seen", "sources the shadow sets saw"),
                         ("sources_would_drop", "sources the shadow sets would newly drop")):  # fmt: skip
            g = GaugeMetricFamily(f"tidegate_fleet_shadow_{k}", f"summed over live hosts: {help_}", labels=["fleet"])
            g.add_metric([f], sums[k])
            yield g


def serve(etcd: Etcd, keys: Keys, host: str, port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    registry.register(FleetCollector(etcd, keys))
    srv = ThreadingHTTPServer((host, port), MetricsHandler.factory(registry))
    Thread(target=srv.serve_forever, name="fleet-metrics", daemon=True).start()
    return srv
