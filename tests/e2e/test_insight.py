"""Insight on real traffic through the real agent on veth: a surge of known
clients, the lab's /16 flood, a spoofed flood spread over the whole space
whose sources repeat, and a single heavy hitter are told apart, and the
numbers behind each reading hold. (Every shape at every agent age is read
from synthesized intervals in tests/unit/test_insight_reading.py.)"""

from __future__ import annotations

import time

import pytest

from fixtures import rule_set

from .harness import finish, send

pytestmark = pytest.mark.e2e

RULES = rule_set("api-3pps")


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("ins", RULES, extra=["--insight-baseline-seconds", "3", "--insight-window-seconds", "3"])


def reading_during(agent, *sender_args, settle=3.2, propose_to=None):
    bg = send(agent.lab, *sender_args, wait=False)
    time.sleep(settle)
    extra = ["--propose", "--out", str(propose_to)] if propose_to else []
    data = agent.cli("insight", *extra, json_out=True)
    finish(bg)
    return data


def test_legitimate_surge_is_read_as_a_surge(agent):
    # 200 clients at 1 pps each, long enough to become known sources
    send(agent.lab, "--src-net", "10.77.0.0/24", "--sources", "200", "--count", "1600", "--pps", "200",
         "--dport", "8080", "--seed", "5")  # fmt: skip
    time.sleep(1)
    # the same clients surge to ~10 pps each (at least 5 on a loaded machine)
    # against a 3 pps per-source limit
    out = agent.state_dir.parent / "surge-proposal.yaml"
    d = reading_during(agent, "--src-net", "10.77.0.0/24", "--sources", "200", "--count", "8000", "--pps", "2000",
                       "--dport", "8080", "--seed", "5", propose_to=out)  # fmt: skip
    assert d["verdict"] == "surge", d["reading"]
    # nothing to mitigate in a surge, and the reason why; no file written
    assert d["proposal"]["action"] == "none" and "legitimate" in d["proposal"]["reason"]
    assert not out.exists()
    assert d["known_source_packet_share"] >= 0.9
    assert d["new_source_share"] <= 0.05
    assert d["drops_by_rule"]["api"]["sources"] >= 150
    assert d["known_traffic_factor"] >= 1.5
    assert "surge of known clients being limited, not an attack" in d["reading"] and "not a verdict" in d["reading"]
    assert 0 < d["confidence"] <= 1 and f"confidence {d['confidence']:.0%}" in d["reading"]
    # how fresh it is: the newest sample's age, and the sampler's own CPU time
    assert d["sample_age_seconds"] >= 0 and d["stale"] == (d["sample_age_seconds"] > 2)
    assert d["sampler"]["interval_seconds"] == 1 and d["sampler"]["cpu_seconds"] > 0


def test_the_labs_slash16_flood_is_read_as_a_flood(agent):
    # tidegate lab's flood: 2 kpps from a pool of 20,000 in 198.18.0.0/16
    out = agent.state_dir.parent / "lab-flood-proposal.yaml"
    d = reading_during(agent, "--src-net", "198.18.0.0/16", "--sources", "20000", "--count", "8000",
                       "--pps", "2000", "--dport", "9", "--seed", "9", settle=3.8, propose_to=out)  # fmt: skip
    assert d["verdict"] == "flood", d["reading"]
    assert d["new_source_share"] >= 0.8
    assert d["known_source_packet_share"] <= 0.2
    assert d["sources"] >= 1000 and d["distinct_16s"] <= 3
    assert d["dense_prefix_packet_share"] >= 0.5 and d["impossible_source_share"] == 0
    assert "concentrated" in d["reading"]
    import ipaddress

    flood_net = ipaddress.ip_network("198.18.0.0/16")
    assert d["top_16s"][0]["prefix"] == "198.18.0.0/16" and d["top_16s"][0]["packet_share"] >= 0.9
    top = d["top_prefixes"]
    assert len(top) == 5 and all(ipaddress.ip_network(p["prefix"]).subnet_of(flood_net) for p in top)
    # a concentrated flood where no known source sends: a deny entry for its /16
    p = d["proposal"]
    assert p["action"] == "deny" and p["prefixes"] == ["198.18.0.0/16"], p
    assert p["what_if"]["flood_packet_share_dropped"] >= 0.9
    assert p["what_if"]["known_packet_share_dropped"] == 0 and p["what_if"]["known_source_share_dropped"] == 0
    assert "198.18.0.0/16" in out.read_text().split("deny:")[1]


def test_repeating_spoofed_flood_over_the_whole_space_is_a_flood(agent):
    # the outage's flood, scaled down: 10,000 random sources anywhere in IPv4,
    # each repeating (so after its first second none is new "per interval")
    out = agent.state_dir.parent / "spread-flood-proposal.yaml"
    d = reading_during(agent, "--src-net", "0.0.0.0/0", "--sources", "10000", "--count", "40000",
                       "--pps", "8000", "--dport", "9", "--seed", "11", settle=4.0, propose_to=out)  # fmt: skip
    assert d["verdict"] == "flood", d["reading"]
    assert d["new_source_share"] >= 0.8 and d["known_source_packet_share"] <= 0.2
    assert d["packets_per_source"] >= 2  # they repeat within the window
    # 0/8, 127/8 and 224/3 are an eighth of the space; no client sends from there
    assert d["impossible_source_share"] >= 0.05
    assert "space no client sends from" in d["reading"]
    # spread over the space: a /0 aggregate limit on the rule it hits ('sink',
    # where no known client sends), which spares the known clients on 'api'
    p = d["proposal"]
    assert p["action"] == "aggregate-limit" and p["rule"] == "sink", p
    w = p["what_if"]
    assert w["flood_packet_share_dropped"] >= 0.5 and w["flood_sources"] >= 1000
    assert w["known_sources"] >= 150  # the surge test's clients, still in the estimate window
    assert w["known_packet_share_dropped"] == 0 and w["known_source_share_dropped"] == 0
    # the file is a rule set `apply --shadow` takes as it is
    r = agent.cli("apply", str(out), "--shadow", "--reason", "insight proposal", json_out=True)
    assert r["shadow"] and r["version"] == p["based_on_version"] + 1
    assert "ipv4_prefix: 0" in out.read_text(), out.read_text()
    agent.cli("shadow", "clear", "--reason", "test done")


def test_single_heavy_hitter_is_named(agent):
    bg = send(agent.lab, "--src-net", "10.88.0.0/24", "--sources", "50", "--count", "200", "--pps", "50",
              "--dport", "9", wait=False)  # fmt: skip
    out = agent.state_dir.parent / "hitter-proposal.yaml"
    d = reading_during(agent, "--src", "203.0.113.99", "--count", "6000", "--pps", "1500", "--dport", "9",
                       propose_to=out)  # fmt: skip
    finish(bg)
    assert d["verdict"] == "heavy-hitter", d["reading"]
    assert d["heaviest_source"] == "203.0.113.99"
    assert d["heaviest_source_share"] >= 0.8
    assert "203.0.113.99" in d["reading"]
    # a per-source limit on its rule, far below its rate and above the others'
    p = d["proposal"]
    assert p["action"] == "per-source-limit" and p["rule"] == "sink" and p["sources"] == ["203.0.113.99"], p
    assert 10 <= p["pps"] < 200
    # the known clients in the estimate window (the floods' sources, no longer
    # new, are among them) are all slower than the limit, bar at most a few
    assert p["what_if"]["known_source_share_dropped"] <= 0.001


def test_insight_metrics_exported(agent):
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("tidegate_insight_known_source_share", "tidegate_source_rate_sources",
                 "tidegate_insight_new_sources", "tidegate_insight_confidence"):  # fmt: skip
        assert name in body
    # one verdict series per verdict, the latest reading's set to 1
    verdicts = {ln.split('"')[1]: float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
                if ln.startswith("tidegate_insight_verdict{")}  # fmt: skip
    assert {"normal", "flood", "surge", "flash-crowd", "heavy-hitter"} <= set(verdicts)
    assert sum(verdicts.values()) == 1.0
