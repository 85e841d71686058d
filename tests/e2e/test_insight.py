"""Insight on real traffic: a legitimate surge, a spoofed flood and a single
heavy hitter are told apart, and the numbers behind each reading hold."""

from __future__ import annotations

import os
import time

import pytest

from tidegate.labnet import VethLab

from .harness import AgentProc, finish, send

pytestmark = pytest.mark.e2e

RULES = """
defaults:
  limit: {pps: 100000, burst: 100000}
rules:
  - name: api
    protocol: udp
    dst_ports: [8080]
    limit: {pps: 3, burst: 6}
  - name: sink
    protocol: udp
    dst_ports: [9]
    limit: {pps: 100000, burst: 100000}
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF and network namespaces")
    tmp = tmp_path_factory.mktemp("insight")
    (tmp / "rules.yaml").write_text(RULES)
    lab = VethLab(f"i{os.getpid() % 100000}", subnet="10.203.9").create()
    a = AgentProc(lab, tmp / "state", extra=["--insight-baseline-seconds", "3"])
    try:
        a.start(rules=str(tmp / "rules.yaml"))
        yield a
    finally:
        a.stop()
        a.cleanup_kernel()
        lab.remove()


def reading_during(agent, *sender_args, settle=2.6):
    bg = send(agent.lab, *sender_args, wait=False)
    time.sleep(settle)
    data = agent.cli("insight", json_out=True)
    finish(bg)
    return data


def test_legitimate_surge_is_read_as_a_surge(agent):
    # 200 clients at 1 pps each, long enough to become known sources
    send(agent.lab, "--src-net", "10.77.0.0/24", "--sources", "200", "--count", "1600", "--pps", "200",
         "--dport", "8080", "--seed", "5")  # fmt: skip
    time.sleep(1)
    # the same clients surge to ~10 pps each (at least 5 on a loaded machine)
    # against a 3 pps per-source limit
    d = reading_during(agent, "--src-net", "10.77.0.0/24", "--sources", "200", "--count", "8000", "--pps", "2000",
                       "--dport", "8080", "--seed", "5")  # fmt: skip
    assert d["verdict"] == "surge", d["reading"]
    assert d["known_source_packet_share"] >= 0.9
    assert d["new_source_share"] <= 0.05
    assert d["drops_by_rule"]["api"]["sources"] >= 150
    assert "legitimate surge" in d["reading"] and "not a verdict" in d["reading"]


def test_spoofed_flood_is_read_as_a_flood(agent):
    # every packet from a fresh address, all inside 64 /24 prefixes
    d = reading_during(agent, "--src-net", "198.18.0.0/18", "--sources", "12000", "--count", "12000",
                       "--pps", "3000", "--dport", "9", "--seed", "9")  # fmt: skip
    assert d["verdict"] == "flood", d["reading"]
    assert d["new_source_share"] >= 0.8
    assert d["known_source_packet_share"] <= 0.2
    assert d["median_source_pps"] <= 2
    assert d["active_sources"] >= 1000 and d["distinct_prefixes"] <= 64
    assert d["sources_per_prefix"] >= 16 and d["top_prefixes_packet_share"] >= 10 / 64
    assert "concentrated in" in d["reading"]
    import ipaddress

    flood_net = ipaddress.ip_network("198.18.0.0/18")
    top = d["top_prefixes"]
    assert len(top) == 5 and all(ipaddress.ip_network(p["prefix"]).subnet_of(flood_net) for p in top)
    assert all(p["sources"] >= 50 for p in top) and top[0]["prefix"] in d["reading"]


def test_single_heavy_hitter_is_named(agent):
    bg = send(agent.lab, "--src-net", "10.88.0.0/24", "--sources", "50", "--count", "200", "--pps", "50",
              "--dport", "9", wait=False)  # fmt: skip
    d = reading_during(agent, "--src", "203.0.113.99", "--count", "6000", "--pps", "1500", "--dport", "9")
    finish(bg)
    assert d["verdict"] == "heavy-hitter", d["reading"]
    assert d["heaviest_source"] == "203.0.113.99"
    assert d["heaviest_source_share"] >= 0.8
    assert "203.0.113.99" in d["reading"]


def test_insight_metrics_exported(agent):
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("tidegate_insight_known_source_share", "tidegate_source_rate_sources",
                 "tidegate_insight_new_sources"):  # fmt: skip
        assert name in body
