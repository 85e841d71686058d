"""The outage behind tidegate, replayed on veth: legitimate clients at
steady rates plus a flood, and an operator applying thresholds ten times
too tight.

- With the blast-radius check on, the apply is refused and names the share
  it would have dropped.
- With --shadow, nothing is dropped and the report shows what would have been.
- With --force --guard, the agent rolls back by itself within the window,
  and no canary packet is dropped after the rollback. The cause is in the
  audit log and in tidegate_rollbacks_total{cause}, and the rolled-back
  version's review says the guard fired and whom it newly dropped.
- Reviews are recorded by the agent: the same review after a restart.
- The shadow set survives an agent restart (the kernel keeps its slot; the
  store keeps it as 'shadow')."""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.request

import pytest

from fixtures import rule_set

from .harness import Agent, finish, send

pytestmark = pytest.mark.e2e

GOOD = rule_set("outage-good")
# the change that caused the outage: every threshold ten times too tight
TIGHT = (GOOD.replace("pps: 200, burst: 400", "pps: 20, burst: 40")
         .replace("pps: 100, burst: 200", "pps: 10, burst: 20").replace("pps: 50, burst: 100", "pps: 5, burst: 10"))  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_lab):
    tmp = tmp_path_factory.mktemp("outage")
    lab = make_lab("out")
    (tmp / "good.yaml").write_text(GOOD.replace("{canary}", lab.peer_ip))
    (tmp / "tight.yaml").write_text(TIGHT.replace("{canary}", lab.peer_ip))
    a = Agent(lab, tmp, rules=str(tmp / "good.yaml"), extra=["--guard-seconds", "20"])
    try:
        yield a.start(), tmp
    finally:
        a.stop()


def traffic(agent, seconds: float):
    """50 legitimate clients at 40 pps each (plus the canary at 40 pps) and a flood."""
    lab = agent.lab
    n = int(seconds)
    return [
        send(lab, "--src-net", "10.50.0.0/24", "--sources", "50", "--count", str(2000 * n), "--pps", "2000",
             "--dport", "8080", "--time-limit", str(seconds + 5), wait=False),
        send(lab, "--src", lab.peer_ip, "--count", str(40 * n), "--pps", "40", "--dport", "8080",
             "--time-limit", str(seconds + 5), wait=False),
        send(lab, "--src-net", "198.18.0.0/16", "--sources", "30000", "--count", str(3000 * n), "--pps", "3000",
             "--dport", "9", "--time-limit", str(seconds + 5), wait=False),
    ]  # fmt: skip


def api(agent):
    c = agent.cli("counters", json_out=True)
    r = {x["rule"]: x for x in c["rules"]}.get("api", {})
    return int(r.get("pass_packets", 0)), int(r.get("drop_packets", 0))


def canary_drops(agent) -> int:
    top = agent.cli("top", "-n", "1000", "--by", "drops", json_out=True)
    return sum(int(s["drops"]) for s in top.get("sources", []) if s["address"] == agent.lab.peer_ip)


def rollbacks(agent) -> dict[str, float]:
    """tidegate_rollbacks_total by cause, scraped from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=20).read().decode()
    return {s.labels["cause"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "tidegate_rollbacks_total"}  # fmt: skip


def legitimate(agent, address: str) -> bool:
    """One of the 50 clients or the canary: the traffic the tight set hurts."""
    return address == agent.lab.peer_ip or ipaddress.ip_address(address) in ipaddress.ip_network("10.50.0.0/24")


def test_outage_is_prevented(env):
    agent, tmp = env
    procs = traffic(agent, 40)
    try:
        time.sleep(6)  # the sampler learns the per-source rates
        # 1. the check refuses the change and says how much it would drop
        r = agent.cli("apply", str(tmp / "tight.yaml"), "--reason", "tighten", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "refused by the blast-radius check" in r.stderr and "of passing packets" in r.stderr
        share = float(r.stderr.split("would newly drop ")[1].split("%")[0])
        assert share > 30, r.stderr
        r = agent.cli("whatif", str(tmp / "tight.yaml"), json_out=True, check=False)
        assert r.returncode == 5, r.stderr  # over budget: a pipeline's gate fails
        est = json.loads(r.stdout)
        assert est["within_budget"] is False and est["packet_share"] > 0.3
        api_est = {x["rule"]: x for x in est["rules"]}["api"]
        # 51 clients at (asked for) 40 pps against 10 pps: each newly loses what it sends above 10 pps;
        # what it sends is what the agent saw of it (the senders may not keep up on a loaded machine)
        seen = [s for s in agent.cli("top", "-n", "1000", json_out=True)["sources"] if s["rule"] == "api"]
        assert len(seen) >= 45 and all(s["pps"] > 15 for s in seen), seen
        over = sum(s["pps"] - 10 for s in seen)
        assert api_est["sources_newly_dropped"] >= 45
        assert 0.7 * over < api_est["newly_dropped_pps"] < 1.3 * over, (api_est, over)

        # 2. shadow: nothing is dropped, the report shows what would have been
        p0, d0 = api(agent)
        agent.cli("apply", str(tmp / "tight.yaml"), "--shadow", "--reason", "try it on live traffic")
        deadline = time.monotonic() + 30
        while (p1 := api(agent)[0]) - p0 < 2000:  # the clients' traffic under the shadow set
            assert time.monotonic() < deadline, "the clients' traffic did not arrive"
            time.sleep(0.5)
        time.sleep(1.5)  # and a sample of it for the report
        p1, d1 = api(agent)
        assert d1 == d0 and p1 - p0 >= 2000, "the shadow set enforces nothing"
        rep = agent.cli("shadow", "report", json_out=True)
        shadow_api = {x["rule"]: x for x in rep["rules"]}["api"]
        assert int(shadow_api["would_drop_new"]) > 0.5 * (p1 - p0)
        assert int(shadow_api["sources"]) >= 40
        # who each rule would hurt, per rule and bounded: the clients, under api
        top_api = shadow_api["top_affected"]
        assert 0 < len(top_api) <= 10 and all(x["rule"] == "api" and legitimate(agent, x["address"]) for x in top_api)
        assert all(x["rule"] == r["rule"] for r in rep["rules"] for x in r["top_affected"])
        # the shadow set survives an agent restart
        agent.stop()
        agent.start()
        st = agent.cli("status", json_out=True)
        assert int(st["shadow_version"]) > 0
        agent.cli("shadow", "clear", "--reason", "seen enough")

        # 3. forced with the guard: rolled back by the agent within the window
        before = agent.cli("status", json_out=True)["active_version"]
        rb0 = rollbacks(agent)
        t0 = time.monotonic()
        r = agent.cli("apply", str(tmp / "tight.yaml"), "--force", "--guard", "--guard-seconds", "20",
                      "--reason", "forced: on-call insists", check=False, timeout=120)  # fmt: skip
        took = time.monotonic() - t0
        assert r.returncode == 4, r.stdout + r.stderr
        assert "ROLLED BACK" in r.stdout and took < 25
        assert agent.cli("status", json_out=True)["active_version"] == before
        audit = agent.cli("audit", "--action", "guard-rollback", json_out=True)
        assert audit and audit[0]["result"] == "rolled-back"
        tight_v = audit[0]["version"]
        cause, _, target = audit[0]["detail"].rpartition("; rolled back to ")
        assert int(target) == before and tight_v > before
        label = ("guard-canary" if cause.startswith("canary ") else "guard-drop-share" if cause.startswith("drop share")
                 else "guard-dropped-sources")  # fmt: skip
        assert label != "guard-dropped-sources" or "distinct sources dropped" in cause, cause
        # the rollback itself is audited with the guard as author and the cause as reason
        rb_audit = agent.cli("audit", "--action", "rollback", json_out=True)[0]
        assert (rb_audit["version"], rb_audit["author"], rb_audit["detail"]) == (before, "guard", f"guard: {cause}")
        rb1 = rollbacks(agent)
        assert rb1[label] == rb0.get(label, 0) + 1, (label, rb0, rb1)
        assert {k: v for k, v in rb1.items() if k != label} == {k: v for k, v in rb0.items() if k != label}
        # the rolled-back version's review: recorded when it was replaced, guard fired, whom it newly dropped
        rev = agent.cli("review", str(tight_v), json_out=True)
        assert rev["final"] is True and rev["complete"] is False
        assert (rev["ended"]["kind"], rev["ended"]["by_version"], rev["ended"]["how"], rev["ended"]["cause"]) == (
            "replaced", before, "rollback", label)
        assert rev["guard_fired"] is True
        assert any(g["action"] == "guard-rollback" and cause in g["detail"] for g in rev["guard"])
        assert rev["newly_dropped_sources"] >= 10 and len(rev["top_newly_dropped"]) == 10
        # the heaviest newly dropped are the clients the tight limit hit, not flood sources
        assert all(legitimate(agent, x["address"]) and x["rule"] == "api" and x["drops"] > 0
                   for x in rev["top_newly_dropped"]), rev["top_newly_dropped"]  # fmt: skip
        table = agent.cli("review", str(tight_v)).stdout
        assert "guard fired: YES" in table and "newly dropped sources: " in table
        assert f"replaced by version {before} (rollback, {label})" in table
        # no canary packet is dropped after the rollback
        time.sleep(2.5)
        c0 = api(agent)
        time.sleep(3)
        c1 = api(agent)
        assert c1[1] == c0[1], "no legitimate (api) drops after the rollback"
        assert canary_drops(agent) == 0
        metrics = agent.cli("counters", json_out=True)
        assert metrics  # still serving
        review = agent.cli("review", str(before), json_out=True)
        assert review["version"] == before
        # right after an apply (a new epoch, fresh buckets), the check still
        # knows the traffic: it is not blinded by the change it follows
        agent.cli("apply", str(tmp / "good.yaml"), "--force", "--reason", "same rules, new version")
        r = agent.cli("whatif", str(tmp / "tight.yaml"), json_out=True, check=False)
        assert r.returncode == 5, r.stderr  # over budget: a pipeline's gate fails
        est = json.loads(r.stdout)
        assert est["within_budget"] is False and est["sources_seen"] >= 50

        # 4. reviews are kept in the store: the same review after a restart
        agent.stop()
        agent.start()
        assert agent.cli("review", str(tight_v), json_out=True) == rev
    finally:
        for p in procs:
            p.terminate()
            try:
                finish(p, timeout=10)
            except Exception:
                pass
