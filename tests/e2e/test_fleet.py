"""The fleet on a real etcd with five real agents, each on its own veth pair
in its own namespace with its own legitimate traffic (20 clients and a
canary on the api port). etcd serves clients over TLS and requires client
certificates (--client-cert-auth): every agent and every `tidegate fleet`
run talk to it with --fleet-etcd-ca/cert/key and --etcd-ca/cert/key.

Scenarios (the order matters: they share the agents and go on from the
fleet's state the one before left):
  7. an invalid rule set written into etcd by hand: every agent NACKs with the
     parser's message and nothing changes on any host;
  1. a good rule set in waves of 1, 2 and the rest: order and bake time hold
     (timestamps), every host converges, each host's audit names the rollout
     (one desired state per etcd transaction: a wave spans several revisions);
  `fleet rollback` in waves (to each host's version before scenario 1), then
  `fleet rollback --to V` in waves (back to scenario 1's version);
  2. the outage fleet-wide: refused at the shadow stage with the numbers;
     forced past it, the first wave's guard rolls back, the rollout halts,
     the canary host is back on the last good version within 30 s, and no
     later-wave host ever had it active (kernel active version, drop counters);
  then drift, one driver at a time, the driver SIGKILLed mid-wave and
  `fleet resume`, an agent SIGKILLed mid-wave, etcd stopped mid-rollout;
  and etcd refusing a client without a certificate of its CA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures import rule_set
from tidegate.access.auth import read_token_file
from tidegate.fleet.etcd import Etcd
from tidegate.fleet.keys import Keys, encode

from .conftest import BIN, send
from .fleet_harness import EtcdCluster, EtcdPKI

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HOSTS = 5
CANARY = "10.99.0.2"
GOOD = rule_set("fleet-good")
BETTER = GOOD.replace("pps: 100, burst: 200", "pps: 150, burst: 300")
# the outage: the api limit ten times below a client's rate (10 pps)
TIGHT = GOOD.replace("pps: 100, burst: 200", "pps: 1, burst: 2").replace("pps: 200, burst: 400", "pps: 20, burst: 40")
TRAFFIC_SECONDS = 600  # upper bound; the module stops it when done


def digest_of(text: str) -> str:
    from tidegate.ruleset.parse import parse_rule_set

    return parse_rule_set(text, "t").digest()


class Fleet:
    def __init__(self, etcd: EtcdCluster, agents: list, name: str, tmp: Path):
        self.etcd = etcd
        self.agents = agents
        self.name = name
        self.tmp = tmp
        self.keys = Keys(name)

    def host(self, i: int) -> str:
        return f"h{i + 1}"

    def cli(self, *args: str, timeout: float = 180, wait: bool = True):
        argv = [str(BIN), "fleet", *args, *self.etcd.cli_options(), "--fleet", self.name]
        env = {**os.environ, "TIDEGATE_AUTHOR": "fleet-op@test"}
        if not wait:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    def rollout(self, text: str, *extra: str, name: str = "cand.yaml", wait: bool = True):
        path = self.tmp / name
        path.write_text(text)
        return self.drive("rollout", str(path), *extra, wait=wait)

    def drive(self, verb: str, *extra: str, wait: bool = True):
        return self.cli(verb, *extra, "-o", "json", "--ack-timeout", "20", "--heartbeat-deadline", "6", "--lock-ttl",
                        "3", wait=wait)  # fmt: skip

    def status(self) -> dict:
        r = self.cli("status", "-o", "json")
        assert r.returncode == 0, r.stderr
        return {h["host"]: h for h in json.loads(r.stdout)["hosts"]}

    def etcd_client(self) -> Etcd:
        return self.etcd.client()

    def wait_hosts(self, pred, timeout: float = 30, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"fleet not {what} after {timeout}s: {json.dumps(st, indent=1)[:3000]}")
            time.sleep(0.3)


def _traffic(agent) -> list[subprocess.Popen]:
    """20 clients at 10 pps each and the canary at 20 pps, on the api port."""
    n = TRAFFIC_SECONDS
    return [
        send(agent.lab, src_net="10.50.0.0/24", sources=20, count=200 * n, pps=200, dport=8080, wait=False),
        send(agent.lab, src=CANARY, count=20 * n, pps=20, dport=8080, wait=False),
    ]


@pytest.fixture(scope="module")
def fleet(start_agent, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    etcd = EtcdCluster(tmp, 3, tag="f", pki=EtcdPKI(tmp / "pki")).start()  # 3 members: scenario 6 kills the leader
    name = f"t{os.getpid() % 100000}"
    good = tmp / "good.yaml"
    good.write_text(GOOD)
    agents = []
    for i in range(HOSTS):
        extra = [*etcd.agent_options(), "--fleet", name, "--host-id", f"h{i + 1}", "--label", "role=edge",
                 "--label", f"zone={'a' if i < 3 else 'b'}", "--fleet-heartbeat", "0.5", "--fleet-lease-ttl", "3"]  # fmt: skip
        agents.append(start_agent(f"fl{i}", GOOD, extra, wait=False))
    errors = []

    def start(a):
        try:
            a.start(timeout=240)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    procs = []
    try:
        assert not errors, errors
        for a in agents:
            procs += _traffic(a)
        f = Fleet(etcd, agents, name, tmp)
        f.wait_hosts(lambda st: len([h for h in st.values() if h["alive"]]) == HOSTS, what="all reporting")
        time.sleep(6)  # the samplers learn each host's traffic
        yield f
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for a in agents:
            a.stop()
        etcd.stop()


def active_digest(agent) -> str:
    st = agent.api.GetStatus()
    return agent.api.GetVersion(number=st.active_version).info.digest


def counters(agent) -> dict:
    c = agent.api.GetCounters()
    return {r.rule: (r.pass_packets, r.drop_packets) for r in c.rules}


# ------------------------------------------------------------------ scenario 7
def test_invalid_set_written_by_hand_is_nacked_everywhere(fleet):
    before = {a.lab.tag: (active_digest(a), len(a.api.ListVersions(limit=100).versions)) for a in fleet.agents}
    bad = "defaults:\n  limit: {pps: -5, burst: 10}\nrules: []\n"
    digest = hashlib.sha256(bad.encode()).hexdigest()
    e = fleet.etcd_client()
    e.put(fleet.keys.version(digest), encode({"digest": digest, "yaml": bad}))
    revs = {}
    for i in range(HOSTS):
        h = fleet.host(i)
        revs[h] = e.put(fleet.keys.desired(h), encode({"seq": "hand:1", "rollout": "by-hand", "operator": "test",
                                                        "reason": "typo", "active": digest, "guard_seconds": 5}))  # fmt: skip
    st = fleet.wait_hosts(lambda st: all((st[h]["rollout"] == "by-hand") for h in revs), what="answered")
    for h in revs:
        assert st[h]["result"] == "NACK", st[h]
        assert "invalid rule set" in st[h]["message"] and "defaults.limit.pps" in st[h]["message"], st[h]["message"]
    for a in fleet.agents:
        assert (active_digest(a), len(a.api.ListVersions(limit=100).versions)) == before[a.lab.tag]
        audit = a.api.ListAudit(limit=20).entries
        assert any(x.action == "rejected-fleet-apply" and "by-hand" in x.author for x in audit)
    e.close()


# ------------------------------------------------------------------ scenario 1
def test_good_set_rolls_out_in_waves_with_bake(fleet):
    bake = 3.0
    # --txn-ops 1: each host's desired state is its own etcd revision, so a wave's hosts answer different
    # revisions (as a wave of more than 100 hosts does with the default)
    r = fleet.rollout(BETTER, "--reason", "raise api limit", "--waves", "1,3,100%", "--bake", str(bake),
                      "--shadow-first", "3", "--txn-ops", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["phase"] == "completed" and rec["operator"] == "fleet-op@test"
    assert [len(w) for w in rec["waves"]] == [1, 2, 2]
    assert rec["shadow"]["within_budget"] and rec["shadow"]["total"]["packets"] > 0
    assert_waves_in_order(rec, bake)
    want = digest_of(BETTER)
    for a in fleet.agents:
        assert active_digest(a) == want
        assert_audit_names(a, rec["id"], "raise api limit")
    # the last wave's guards end on their own (guard window = max(bake, 5 s)), then all are in sync
    fleet.wait_hosts(lambda st: all(st[h]["state"] == "in-sync" and st[h]["active_digest"] == want for h in st),
                     timeout=20, what="in sync")  # fmt: skip


def assert_waves_in_order(rec: dict, bake: float) -> None:
    """Every host of each wave ACKed after its wave started; the bake ran
    after the wave's last ACK; no host of the next wave before it ended."""
    ev = rec["events"]
    starts = {e["wave"]: e["t"] for e in ev if e["event"] == "wave-start"}
    acked = {e["wave"]: e["acks"] for e in ev if e["event"] == "wave-acked"}
    baked = {e["wave"]: e["t"] for e in ev if e["event"] == "wave-baked"}
    n = len(rec["waves"])
    assert sorted(starts) == sorted(baked) == list(range(n)), ev
    for i in range(n):
        assert sorted(acked[i]) == sorted(rec["waves"][i])
        assert all(starts[i] <= t for t in acked[i].values())
        assert baked[i] - max(acked[i].values()) >= bake - 0.1  # the bake ran after the last ACK
        if i < n - 1:
            assert starts[i + 1] >= baked[i]
            assert min(acked[i + 1].values()) > baked[i]  # no host of the next wave before the bake ended


def assert_audit_names(agent, rollout_id: str, reason: str) -> None:
    audit = agent.api.ListAudit(limit=30).entries
    assert any(x.action == "fleet-apply" and rollout_id in x.author and reason in x.detail
               for x in audit), [(x.action, x.author, x.detail) for x in audit]  # fmt: skip


# ------------------------------------------------------------------ rollback
def test_rollback_in_waves_then_rollback_to_a_version(fleet):
    good, better = digest_of(GOOD), digest_of(BETTER)  # before and after scenario 1
    hosts = sorted(fleet.host(i) for i in range(HOSTS))
    # no --to: each host goes back to what it ran before the newest rollout (the agents' start-up set,
    # never published in etcd: each host takes it from its own store)
    r = fleet.drive("rollback", "--reason", "undo the raise", "--waves", "1,100%", "--bake", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    back = json.loads(r.stdout)
    assert back["kind"] == "rollback" and back["phase"] == "completed" and not back["failures"]
    assert back["targets"] == {h: good for h in hosts} and [len(w) for w in back["waves"]] == [1, HOSTS - 1]
    assert_waves_in_order(back, 1.0)
    for a in fleet.agents:
        assert active_digest(a) == good
        assert_audit_names(a, back["id"], "undo the raise")
    # --to a version (a digest prefix, as `fleet history` shows it): forward again, in waves of 2 and the rest
    r = fleet.drive("rollback", "--to", better[:12], "--reason", "redo the raise", "--waves", "2,100%", "--bake", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    to = json.loads(r.stdout)
    assert to["kind"] == "rollback" and to["phase"] == "completed" and to["candidate"] == better
    assert to["targets"] == {h: better for h in hosts} and [len(w) for w in to["waves"]] == [2, HOSTS - 2]
    assert to["previous"] == {h: good for h in hosts}
    assert_waves_in_order(to, 1.0)
    for a in fleet.agents:
        assert active_digest(a) == better
        assert_audit_names(a, to["id"], "redo the raise")
    r = fleet.cli("history", "-o", "json")
    assert r.returncode == 0, r.stderr
    kinds = [(x["id"], x["kind"]) for x in json.loads(r.stdout)["rollouts"]][:2]
    assert kinds == [(to["id"], "rollback"), (back["id"], "rollback")]
    fleet.wait_hosts(lambda st: all(st[h]["state"] == "in-sync" and st[h]["active_digest"] == better for h in st),
                     timeout=20, what="in sync")  # fmt: skip


# ------------------------------------------------------------------ scenario 2
def test_outage_refused_at_shadow_then_guard_halts_and_reverts(fleet):
    good = digest_of(BETTER)  # what scenario 1 left
    before = {a.lab.tag: counters(a) for a in fleet.agents}
    r = fleet.rollout(TIGHT, "--reason", "tighten everything", "--waves", "1,3,100%", "--bake", "10",
                      "--shadow-first", "3")  # fmt: skip
    assert r.returncode == 5, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert rec["phase"] == "refused" and "over budget" in rec["cause"]
    tot = rec["shadow"]["total"]
    assert tot["packet_share"] > 0.2 and tot["would_drop_new"] > 0 and len(rec["shadow"]["hosts"]) == HOSTS
    assert f"{tot['packet_share']:.2%}" in rec["cause"]
    assert all(n["packets"] > 0 and n["would_drop_new"] > 0 for n in rec["shadow"]["hosts"].values())
    for a in fleet.agents:
        assert active_digest(a) == good
        assert a.api.GetStatus().shadow_version == 0
    # forced past the shadow stage: the canary host's guard rolls back, the rollout halts
    r = fleet.rollout(TIGHT, "--reason", "tighten everything (forced)", "--waves", "1,3,100%", "--bake", "10",
                      "--shadow-first", "2", "--force")  # fmt: skip
    assert r.returncode == 4, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert rec["phase"] == "halted"
    canary_host = rec["waves"][0][0]
    assert [f["host"] for f in rec["failures"]] == [canary_host]
    assert rec["failures"][0]["kind"] == "ROLLED_BACK" and "guard" in rec["failures"][0]["message"]
    assert rec["enforced"] == [canary_host] and not rec["unconfirmed"]
    ev = {e["event"]: e for e in rec["events"]}
    assert ev["reverted"]["t"] - ev["wave-start"]["t"] < 30
    tight = digest_of(TIGHT)
    for a in fleet.agents:
        host = next(h for h in fleet.status() if h == _host_of(fleet, a))
        assert active_digest(a) == good, host
        versions = a.api.ListVersions(limit=100).versions
        had = [v for v in versions if v.digest == tight and v.state == "applied"]
        after = counters(a)
        if host == canary_host:
            assert had, "the canary host enforced it"
        else:
            assert not had, f"{host} enforced the tight set"
            # the api rule dropped nothing on hosts that never enforced it
            assert after["api"][1] == before[a.lab.tag]["api"][1], host


def _host_of(fleet, agent) -> str:
    return fleet.host(fleet.agents.index(agent))


def wait_rollout(fleet, pred, timeout: float = 60, what: str = "") -> dict:
    from tidegate.fleet.views import current_rollout

    e = fleet.etcd_client()
    deadline = time.monotonic() + timeout
    try:
        while True:
            rec = current_rollout(e, fleet.keys)
            if rec and pred(rec):
                return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"rollout not {what} after {timeout}s: {json.dumps(rec)[:2000]}")
            time.sleep(0.2)
    finally:
        e.close()


def versions_with(agent, digest: str) -> list:
    return [v for v in agent.api.ListVersions(limit=200).versions if v.digest == digest and v.state == "applied"]


def variant(pps: int) -> str:
    return GOOD.replace("pps: 100, burst: 200", f"pps: {pps}, burst: {2 * pps}")


# ------------------------------------------------------------------- drift
def test_local_change_shows_as_drift_and_is_not_overwritten(fleet):
    a = fleet.agents[4]
    host = _host_of(fleet, a)
    a.api.ApplyRuleSet(yaml=variant(170), reason="local hotfix on one host", source="hotfix.yaml")
    st = fleet.wait_hosts(lambda st: st[host]["state"] == "drift", what="drifting")
    d = st[host]["drift"]
    assert d["desired_digest"] == digest_of(BETTER) and d["active_digest"] == digest_of(variant(170))
    assert d["change"]["reason"] == "local hotfix on one host" and d["change"]["author"]
    assert all(st[h]["state"] != "drift" for h in st if h != host)
    time.sleep(2)  # nothing puts it back behind the operator's back
    assert active_digest(a) == digest_of(variant(170))
    r = fleet.cli("status")
    assert r.returncode == 0 and "drift" in r.stdout and "fleet asked" in r.stdout, r.stdout


def test_exporter_shows_hosts_by_state_and_version_and_the_halted_rollout(fleet):
    from .conftest import free_port, parse_metrics

    port = free_port()
    p = fleet.cli("exporter", "--listen", f"127.0.0.1:{port}", wait=False)
    try:
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() else ""
                time.sleep(0.2)
    finally:
        p.terminate()
        p.wait(timeout=20)
    m = parse_metrics(text)
    f = fleet.name

    def g(name, **labels):
        return m.get((name, tuple(sorted({"fleet": f, **labels}.items()))))

    assert g("tidegate_fleet_etcd_up") == 1
    assert g("tidegate_fleet_hosts", state="drift") == 1 and g("tidegate_fleet_hosts", state="in-sync") == HOSTS - 1
    assert g("tidegate_fleet_host_drift", host="h5") == 1
    assert g("tidegate_fleet_hosts_by_version", digest=digest_of(BETTER)[:12]) == HOSTS - 1
    assert g("tidegate_fleet_rollout_phase", phase="halted") == 1  # scenario 2's forced rollout
    assert g("tidegate_fleet_rollout_phase", phase="completed") == 0
    assert g("tidegate_fleet_rollout_failed_hosts") == 1
    # every fleet metric the shipped alert rules read is one this exporter serves
    alerts = (Path(__file__).resolve().parents[2] / "deploy" / "tidegate-alerts.yml").read_text()
    used = set(re.findall(r"\btidegate_fleet_[a-z0-9_]+", alerts))
    served = {name for name, _ in m}
    assert used and not (used - served), used - served


# -------------------------------------------------------------- scenario 5
def test_driver_killed_mid_wave_resume_finishes_and_one_driver_at_a_time(fleet):
    text = variant(180)
    p = fleet.rollout(text, "--reason", "driver dies", "--waves", "1,3,100%", "--bake", "4", "--shadow-first", "0",
                      wait=False)  # fmt: skip
    try:
        wait_rollout(fleet, lambda r: r["phase"] == "wave" and r["wave"] == 1 and
                     any(e["event"] == "wave-start" and e["wave"] == 1 for e in r["events"]), what="in wave 2")  # fmt: skip
        # a second driver is refused while the first is alive, with who holds it
        for argv in (("resume", "-o", "json", "--lock-ttl", "3"),):
            r = fleet.cli(*argv)
            assert r.returncode == 3, r.stdout + r.stderr
            assert "another driver holds the fleet" in r.stderr and "fleet-op@test" in r.stderr
        r = fleet.rollout(variant(190), "--reason", "second driver", "--shadow-first", "0", name="other.yaml")
        assert r.returncode == 3, r.stdout + r.stderr
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    rec = wait_rollout(fleet, lambda r: True)
    assert rec["phase"] == "wave"
    r = fleet.cli("resume", "-o", "json", "--wait-lock", "15", "--lock-ttl", "3", "--ack-timeout", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert rec["phase"] == "completed" and rec["reason"] == "driver dies"
    starts = [e["wave"] for e in rec["events"] if e["event"] == "wave-start"]
    assert starts[:2] == [0, 1] and starts[-1] == 2  # wave 2 was run again by the resumed driver
    want = digest_of(text)
    for a in fleet.agents:
        assert active_digest(a) == want
        assert len(versions_with(a, want)) == 1  # run again, applied once
    st = fleet.status()
    assert all(st[h]["state"] in ("in-sync", "guarding") for h in st), st  # the drifting host was rolled too


# -------------------------------------------------------------- scenario 4
def test_agent_killed_mid_wave_restarts_and_converges(fleet):
    victim = fleet.agents[2]  # h3: in the second wave of 1,3,100%
    text = variant(200)
    p = fleet.rollout(text, "--reason", "agent dies", "--waves", "1,3,100%", "--bake", "3", "--shadow-first", "0",
                      wait=False)  # fmt: skip
    try:
        wait_rollout(fleet, lambda r: r["reason"] == "agent dies" and r["wave"] == 1, what="in wave 2")
        victim.stop(signal.SIGKILL)
        time.sleep(1)
        victim.start(timeout=120)  # adopts the pinned program, resumes after its last etcd revision
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out + err
    rec = json.loads(out)
    assert rec["phase"] == "completed" and not rec["failures"]
    want = digest_of(text)
    for a in fleet.agents:
        assert active_digest(a) == want
        assert len(versions_with(a, want)) == 1  # never applied twice, restart or not


def test_agent_gone_fails_its_wave_after_the_deadline_and_nothing_is_stuck(fleet):
    victim = fleet.agents[4]  # h5: last wave
    host = _host_of(fleet, victim)
    before = digest_of(variant(200))
    text = variant(210)
    p = fleet.rollout(text, "--reason", "agent gone", "--waves", "1,100%", "--bake", "2", "--shadow-first", "0",
                      "--ack-timeout", "8", wait=False)  # fmt: skip
    try:
        wait_rollout(fleet, lambda r: r["reason"] == "agent gone" and r["phase"] == "wave", what="started")
        victim.stop(signal.SIGKILL)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    rec = json.loads(out)
    # the wave failed when h5 did not answer; every host asked was reverted, h5 could not confirm
    assert p.returncode == 6, out + err
    assert rec["phase"] == "halted" and [f["host"] for f in rec["failures"]] == [host]
    assert rec["failures"][0]["kind"] in ("timeout", "heartbeat")
    assert rec["unconfirmed"] == [host]
    for a in fleet.agents:
        if a is not victim:
            assert active_digest(a) == before
    victim.start(timeout=120)  # back: it reads the newest desired state (the revert) and answers it
    st = fleet.wait_hosts(lambda st: st[host]["alive"] and st[host]["rollout"] == rec["id"] and
                          st[host]["result"] == "ACK", what="h5 answering the revert")  # fmt: skip
    assert active_digest(victim) == before and st[host]["state"] != "drift"
    assert not versions_with(victim, digest_of(text))


# -------------------------------------------------------------- scenario 6
def test_etcd_leader_killed_mid_rollout_completes(fleet):
    text = variant(220)
    p = fleet.rollout(text, "--reason", "leader dies", "--waves", "1,3,100%", "--bake", "3", "--shadow-first", "0",
                      wait=False)  # fmt: skip
    leader = None
    try:
        wait_rollout(fleet, lambda r: r["reason"] == "leader dies" and r["wave"] == 1, what="in wave 2")
        leader = fleet.etcd.leader()
        leader.stop(signal.SIGKILL)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
        if leader is not None:
            leader.start(fleet.etcd.cluster, fleet.etcd.token)  # rejoins from its data dir
    assert p.returncode == 0, out + err
    assert json.loads(out)["phase"] == "completed"
    for a in fleet.agents:
        assert active_digest(a) == digest_of(text)
    fleet.etcd.wait_ready()


# -------------------------------------------------------------- scenario 3
def test_etcd_stopped_mid_rollout_hosts_keep_filtering(fleet):
    before = digest_of(variant(220))
    text = variant(230)
    p = fleet.rollout(text, "--reason", "etcd dies", "--waves", "1,3,100%", "--bake", "4", "--shadow-first", "0",
                      "--etcd-patience", "90", wait=False)  # fmt: skip
    try:
        wait_rollout(fleet, lambda r: r["reason"] == "etcd dies" and r["wave"] == 1, what="in wave 2")
        for m in fleet.etcd.members:
            m.stop()
        # every host keeps filtering with what it runs, and its API answers
        time.sleep(3)
        for a in fleet.agents:
            st = a.api.GetStatus()
            assert st.attached and st.active_version
            assert active_digest(a) in (before, digest_of(text))
            assert a.api.GetCounters().rules
        fleet.etcd.start()
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode in (0, 4), out + err
    rec = json.loads(out)
    final = digest_of(text) if rec["phase"] == "completed" else before
    st = fleet.wait_hosts(lambda st: all(h["alive"] for h in st.values()) and len(st) == HOSTS, what="all back")
    for a in fleet.agents:
        assert active_digest(a) == final, (rec["phase"], rec.get("cause"))
    assert all(h["state"] in ("in-sync", "guarding") for h in st.values()), st


# ------------------------------------------------------------------ security
def test_no_api_token_in_etcd(fleet):
    e = fleet.etcd_client()
    kvs, _ = e.get_prefix(fleet.keys.prefix)
    e.close()
    blob = b"\n".join(kv.value for kv in kvs)
    assert kvs
    for a in fleet.agents:
        tokens = read_token_file(a.state_dir / "tokens")  # the tokens, not the file's comment words
        assert len(tokens) == 2
        for token in tokens:
            assert token.encode() not in blob


def test_etcd_refuses_a_client_without_a_certificate_of_its_ca(fleet):
    """The fleet's etcd requires client certificates: a rollout without one,
    or with one from another CA, fails with etcd's TLS refusal (exit 1) and
    writes nothing: no version, no rollout record, no desired state."""
    pki = fleet.etcd.pki
    text = variant(240)
    path = fleet.tmp / "no-cert.yaml"
    path.write_text(text)
    e = fleet.etcd_client()
    current, rev = e.get(fleet.keys.current)
    base = [str(BIN), "fleet", "rollout", str(path), "--reason", "who am I", "--shadow-first", "0", "--etcd",
            fleet.etcd.endpoints, "--fleet", fleet.name, "--etcd-ca", str(pki.ca)]  # fmt: skip
    cert, key = pki.stranger
    for extra in ([], ["--etcd-cert", str(cert), "--etcd-key", str(key)]):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "etcd unreachable" in r.stderr and "certificate" in r.stderr.lower(), r.stderr
    # a certificate without its key is a usage error, before any connection
    r = subprocess.run(base + ["--etcd-cert", str(pki.cert)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--etcd-cert and --etcd-key go together" in r.stderr, r.stderr
    assert e.get(fleet.keys.version(digest_of(text)))[0] is None
    kvs, _ = e.get_prefix(fleet.keys.prefix)
    e.close()
    assert [kv.key for kv in kvs if kv.mod_revision > rev and "/status/" not in kv.key] == []
    rollout = json.loads(fleet.cli("status", "-o", "json").stdout).get("rollout")
    if current is None:  # run on its own: still no rollout
        assert not rollout, rollout
    else:
        assert rollout["id"] == current.value.decode()
