"""The shipped deployment kit against real tools: a real Prometheus server
(Debian's) scrapes a running agent with deploy/prometheus.yml, the drop
rate query returns the traffic's drop rate, the alerting rules load, and
the Grafana dashboard only references metrics the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request


import pytest

from fixtures import rule_set

from .harness import ROOT, finish, free_port, send

pytestmark = pytest.mark.e2e
DEPLOY = ROOT / "deploy"

RULES = rule_set("sink-10pps")


def test_alert_rules_pass_promtool():
    if not shutil.which("promtool"):
        pytest.skip("promtool is installed by `make install` (Debian package prometheus)")
    r = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "tidegate-alerts.yml")], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


FLOOD_ALERT_TEST = """
rule_files: [tidegate-alerts.yml]
evaluation_interval: 30s
tests:
  - interval: 30s
    input_series:
      # a flood read for 5 minutes on one host; a 1-minute flood reading on another
      - series: 'tidegate_insight_verdict{instance="a", verdict="flood"}'
        values: '0 0 1 1 1 1 1 1 1 1 1 1'
      - series: 'tidegate_insight_verdict{instance="b", verdict="flood"}'
        values: '0 0 1 1 0 0 0 0 0 0 0 0'
      - series: 'tidegate_insight_verdict{instance="b", verdict="surge"}'
        values: '1 1 0 0 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 2m
        alertname: TidegateFloodReading
        exp_alerts: []
      - eval_time: 5m
        alertname: TidegateFloodReading
        exp_alerts:
          - exp_labels: {severity: page, instance: a}
            exp_annotations:
              summary: "tidegate insight has read a flood on a for 3 minutes"
              description: "Run `tidegate insight --propose` for a candidate mitigation and its what-if; apply it with `--shadow` first."
"""


def test_flood_reading_alert_fires_only_for_a_flood_that_lasts(tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool is installed by `make install` (Debian package prometheus)")
    shutil.copy(DEPLOY / "tidegate-alerts.yml", tmp_path / "tidegate-alerts.yml")
    (tmp_path / "flood-test.yml").write_text(FLOOD_ALERT_TEST)
    r = subprocess.run(["promtool", "test", "rules", "flood-test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def agent(start_agent):
    a = start_agent("prom", RULES)
    return a, a.workdir


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read().decode())


def test_real_prometheus_scrapes_the_agent(agent):
    a, tmp = agent
    if not shutil.which("prometheus"):
        pytest.skip("prometheus is installed by `make install` (Debian package prometheus)")
    cfg = (DEPLOY / "prometheus.yml").read_text()
    cfg = cfg.replace("127.0.0.1:9640", f"127.0.0.1:{a.metrics_port}").replace("scrape_interval: 5s",
                                                                               "scrape_interval: 1s")  # fmt: skip
    cfg = cfg.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    (tmp / "prometheus.yml").write_text(cfg)
    shutil.copy(DEPLOY / "tidegate-alerts.yml", tmp / "tidegate-alerts.yml")
    port = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"))  # fmt: skip
    base = f"http://127.0.0.1:{port}/api/v1"
    # 200 pps from 10 sources (20 pps each) against a 10 pps per-source limit, for ~20 s
    bg = send(a.lab, "--src-net", "198.18.4.0/24", "--sources", "10", "--count", "4000", "--pps", "200",
              "--dport", "9", "--time-limit", "25", wait=False)  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        value = None
        q = urllib.parse.quote('sum(rate(tidegate_packets_total{verdict="drop"}[10s]))')
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                res = _get(f"{base}/query?query={q}")["data"]["result"]
            except OSError:
                continue
            if res and float(res[0]["value"][1]) > 0:
                value = float(res[0]["value"][1])
                if value > 50:
                    break
        assert value is not None, (tmp / "prometheus.log").read_text()[-2000:]
        # 200 pps offered, 10 x 10 pps allowed: about 100 pps dropped
        assert 50 < value < 160, value
        rules = _get(f"{base}/rules")["data"]["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert {"TidegateDropShareJumpAfterChange", "TidegateGuardRolledBack", "TidegateAgentDown",
                "TidegateLruInsertFailures"} <= names  # fmt: skip
        assert all(g["rules"] and all(r.get("health", "ok") == "ok" for r in g["rules"]) for g in rules)
        targets = _get(f"{base}/targets")["data"]["activeTargets"]
        assert targets and targets[0]["health"] == "up"
    finally:
        prom.terminate()
        prom.wait(timeout=20)
        finish(bg)


def test_dashboard_references_only_exported_metrics(agent):
    a, tmp = agent
    body = urllib.request.urlopen(f"http://127.0.0.1:{a.metrics_port}/metrics", timeout=10).read().decode()
    exported = set(re.findall(r"^# TYPE (\w+) ", body, re.M))
    exported |= {n + "_total" for n in exported}
    # insight families appear after the first sample; wait for them
    deadline = time.monotonic() + 10
    while "tidegate_insight_active_sources" not in exported and time.monotonic() < deadline:
        send(a.lab, "--src", a.lab.peer_ip, "--count", "20", "--pps", "50", "--dport", "9")
        body = urllib.request.urlopen(f"http://127.0.0.1:{a.metrics_port}/metrics", timeout=10).read().decode()
        exported = set(re.findall(r"^# TYPE (\w+) ", body, re.M))
        exported |= {n + "_total" for n in exported}
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [an["expr"] for an in dash["annotations"]["list"]]
    used = {m for e in exprs for m in re.findall(r"\btidegate_[a-z0-9_]+", e)}
    assert used, "the dashboard queries tidegate metrics"
    missing = used - exported
    assert not missing, f"dashboard uses metrics the agent does not export: {missing}"
    alerts = (DEPLOY / "tidegate-alerts.yml").read_text()
    # the fleet's alerts read the fleet exporter (tidegate fleet exporter), checked in test_fleet.py
    used_alerts = {m for m in re.findall(r"\btidegate_[a-z0-9_]+", alerts) if not m.startswith("tidegate_fleet_")}
    assert used_alerts and not (used_alerts - exported), used_alerts - exported

