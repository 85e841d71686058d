"""/metrics of a real agent, scraped over HTTP and parsed with
prometheus_client's text parser, against traffic whose every packet is
accounted for: 60-byte frames from the test's namespace, bounded in count,
from source networks no other test in this module uses (each test starts
with fresh per-source state, so LRU inserts are exact too).
"""

from __future__ import annotations

import ipaddress
import time
import urllib.request

import pytest

from fixtures import rule_set

from .conftest import FRAME_BYTES, send

pytestmark = pytest.mark.e2e

RULES = rule_set("open-tight-closed")

# what the collector exports (insight adds gauges of its own once it has samples)
FAMILIES = {
    "tidegate_packets_total": ("verdict", "reason"), "tidegate_bytes_total": ("verdict", "reason"),
    "tidegate_rule_packets_total": ("rule", "verdict"), "tidegate_rule_drops_total": ("rule", "reason"),
    "tidegate_shadow_would_drop_total": ("rule",), "tidegate_active_version": (), "tidegate_shadow_version": (),
    "tidegate_active_version_since_timestamp_seconds": (),
    "tidegate_tracked_sources": (), "tidegate_rule_set_changes_total": ("result",),
    "tidegate_rollbacks_total": ("cause",), "tidegate_lru_inserts_total": (),
    "tidegate_lru_insert_failures_total": (), "tidegate_attached": (), "tidegate_agent_up": (),
}  # fmt: skip


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("met", RULES)


def delta(m0: dict, m1: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in m1, f"{key} not exported"
    return m1[key] - m0.get(key, 0)


def total(m: dict, name: str, **match) -> float:
    return sum(v for (n, labels), v in m.items() if n == name and set(match.items()) <= set(labels))


def test_counters_match_the_traffic_sent(agent):
    lab = agent.lab
    m0 = agent.scrape()
    sent_open = send(lab, src_net="198.18.0.0/20", sources=500, dport=9, count=1000, pps=3000)["sent"]
    sent_closed = send(lab, src=lab.peer_ip, dport=13, count=50, pps=500)["sent"]
    sent_deny = send(lab, src="198.51.100.7", dport=9, count=30, pps=500)["sent"]
    # one source at 1000 pps against 10 pps with a burst of 10: the burst and 10 pps for as long as the
    # sender took pass, the rest are dropped for rate
    tight = send(lab, src="198.18.100.1", dport=7, count=200, pps=1000)
    sent_tight = tight["sent"]
    m1 = agent.scrape()

    assert delta(m0, m1, "tidegate_rule_packets_total", rule="open", verdict="pass") == sent_open == 1000
    assert delta(m0, m1, "tidegate_rule_packets_total", rule="open", verdict="drop") == 0
    assert delta(m0, m1, "tidegate_rule_packets_total", rule="closed", verdict="drop") == sent_closed
    assert delta(m0, m1, "tidegate_rule_drops_total", rule="closed", reason="deny") == sent_closed
    t_pass = delta(m0, m1, "tidegate_rule_packets_total", rule="tight", verdict="pass")
    t_drop = delta(m0, m1, "tidegate_rule_packets_total", rule="tight", verdict="drop")
    assert t_pass + t_drop == sent_tight and 10 <= t_pass <= 10 + 10 * (tight["seconds"] + 0.004) + 1, (
        t_pass, t_drop, tight)
    assert delta(m0, m1, "tidegate_rule_drops_total", rule="tight", reason="rate") == t_drop

    assert delta(m0, m1, "tidegate_packets_total", verdict="drop", reason="deny") == sent_closed + sent_deny
    assert delta(m0, m1, "tidegate_packets_total", verdict="drop", reason="rate") == t_drop
    assert delta(m0, m1, "tidegate_packets_total", verdict="pass", reason="pass") == sent_open + t_pass
    everything = sent_open + sent_closed + sent_deny + sent_tight
    assert total(m1, "tidegate_packets_total") - total(m0, "tidegate_packets_total") == everything
    for key, value in m1.items():
        if key[0] == "tidegate_packets_total":
            labels = dict(key[1])
            pk = value - m0.get(key, 0)
            assert delta(m0, m1, "tidegate_bytes_total", **labels) == pk * FRAME_BYTES, labels

    # one per-source entry per new source: 500 spoofed + the tight one (deny and drop rules keep no state)
    assert delta(m0, m1, "tidegate_lru_inserts_total") == 501
    assert delta(m0, m1, "tidegate_lru_insert_failures_total") == 0
    # the tracked-source gauge comes from the sampler (every second here), not from the scrape
    deadline = time.monotonic() + 10
    while agent.scrape()[("tidegate_tracked_sources", ())] < 501 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert agent.scrape()[("tidegate_tracked_sources", ())] >= 501


def test_no_per_source_labels_and_bounded_series(agent):
    body0 = agent.scrape_text()
    send(agent.lab, src_net="198.18.64.0/20", sources=2000, dport=9, count=2000, pps=4000)
    time.sleep(1.5)
    body1 = agent.scrape_text()
    from .conftest import parse_metrics

    m0, m1 = parse_metrics(body0), parse_metrics(body1)
    ours0 = {k for k in m0 if k[0] in FAMILIES}
    ours1 = {k for k in m1 if k[0] in FAMILIES}
    assert ours0 == ours1, "2000 new sources added no series"
    # (shadow families have samples only while a shadow set is loaded)
    assert {k[0] for k in ours1} == set(FAMILIES) - {"tidegate_shadow_would_drop_total"}, "documented families"
    for name, labels in ours1:
        assert tuple(sorted(dict(labels))) == tuple(sorted(FAMILIES[name])), (name, labels)
    for (name, labels), _ in m1.items():
        for _, value in labels:
            with pytest.raises(ValueError):
                ipaddress.ip_network(value, strict=False)
    assert "198.18." not in body1
    assert len(m1) < 400, "series count is bounded by rules, reasons and verdicts"


def test_changes_rollbacks_and_versions(agent):
    api = agent.api
    m0 = agent.scrape()
    v0 = m0[("tidegate_active_version", ())]
    assert v0 == api.GetStatus().active_version >= 1
    r = api.ApplyRuleSet(yaml=RULES.replace("pps: 10, burst: 10", "pps: 20, burst: 20"), reason="looser tight",
                         force=True)  # fmt: skip
    err = api.error("ApplyRuleSet", yaml="rules: [\n", reason="broken")
    assert err.code().name == "INVALID_ARGUMENT"
    m1 = agent.scrape()
    assert m1[("tidegate_active_version", ())] == r.version
    # the new version's activation time: after the one before it, and not in the future
    since0, since1 = (m[("tidegate_active_version_since_timestamp_seconds", ())] for m in (m0, m1))
    assert 0 < since0 < since1 <= time.time()
    assert delta(m0, m1, "tidegate_rule_set_changes_total", result="ok") == 1
    assert delta(m0, m1, "tidegate_rule_set_changes_total", result="rejected") == 1
    assert delta(m0, m1, "tidegate_rule_set_changes_total", result="error") == 0
    api.Rollback(reason="back")
    m2 = agent.scrape()
    assert m2[("tidegate_active_version", ())] == v0
    # a rollback is an activation of its own: the old version is active since the rollback
    assert m2[("tidegate_active_version_since_timestamp_seconds", ())] >= since1
    assert delta(m1, m2, "tidegate_rollbacks_total", cause="manual") == 1
    assert delta(m1, m2, "tidegate_rule_set_changes_total", result="ok") == 1


def test_shadow_would_drops(agent):
    api = agent.api
    v = api.ApplyRuleSet(yaml=RULES.replace("pps: 100000, burst: 100000}\n  - name: tight",
                                            "pps: 10, burst: 10}\n  - name: tight"),
                         reason="try a tight open", shadow=True).version  # fmt: skip
    m0 = agent.scrape()
    assert m0[("tidegate_shadow_version", ())] == v
    # 300 packets from one source against the candidate's 10 pps with a burst of 10: all but the burst and
    # 10 pps for as long as the sender took would drop, none does
    res = send(agent.lab, src="198.18.200.1", dport=9, count=300, pps=1000)
    m1 = agent.scrape()
    assert delta(m0, m1, "tidegate_rule_packets_total", rule="open", verdict="pass") == res["sent"] == 300
    would = delta(m0, m1, "tidegate_shadow_would_drop_total", rule="open")
    assert 300 - (10 + 10 * (res["seconds"] + 0.004) + 1) <= would <= 290, (would, res)
    assert delta(m0, m1, "tidegate_shadow_would_drop_new_total", rule="open") == would
    api.ClearShadow(reason="done")
    assert agent.scrape()[("tidegate_shadow_version", ())] == 0


def test_exposition_and_process_metrics(agent):
    resp = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=20)
    assert resp.headers["Content-Type"].startswith("text/plain")
    body = resp.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    types = {f.name: f.type for f in text_string_to_metric_families(body)}
    for name in ("tidegate_packets", "tidegate_bytes", "tidegate_rule_packets", "tidegate_rule_drops",
                 "tidegate_shadow_would_drop", "tidegate_rule_set_changes", "tidegate_rollbacks",
                 "tidegate_lru_inserts", "tidegate_lru_insert_failures", "process_cpu_seconds"):  # fmt: skip
        assert types[name] == "counter", name
    for name in ("tidegate_active_version", "tidegate_shadow_version", "tidegate_tracked_sources",
                 "tidegate_attached", "tidegate_agent_up", "process_resident_memory_bytes",
                 "process_open_fds"):  # fmt: skip
        assert types[name] == "gauge", name
    m = agent.scrape()
    assert m[("tidegate_agent_up", ())] == 1 and m[("tidegate_attached", ())] == 1
    # the sampler (not the scrape) reads the LRU, once a second here; its cost is exported
    assert 0 < m[("tidegate_sample_duration_seconds", ())] < 2 and m[("tidegate_sample_age_seconds", ())] < 5
    assert m[("process_resident_memory_bytes", ())] > 10 << 20
    assert "# HELP tidegate_packets_total" in body
