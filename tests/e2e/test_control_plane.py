"""The real agent, driven by the real CLI and a real gRPC channel, filtering
real traffic on a veth pair."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest

from .conftest import BASE_RULES
from .harness import BIN, finish, pinned_dump, send

pytestmark = pytest.mark.e2e

BASE = "\n" + BASE_RULES  # line numbers in the assertions below count this first empty line


DROP_APP = BASE.replace("""    limit: {pps: 500, burst: 500}""", """    action: drop""")


@pytest.fixture(scope="module")
def env(start_agent):
    agent = start_agent("cpl", BASE)
    tmp = agent.workdir
    (tmp / "base.yaml").write_text(BASE)
    (tmp / "drop-app.yaml").write_text(DROP_APP)
    return agent, tmp


def rule(agent, name):
    c = agent.cli("counters", json_out=True)
    for r in c.get("rules", []):
        if r["rule"] == name:
            return int(r["pass_packets"]), int(r["drop_packets"])
    return 0, 0


def legit(agent, n=20) -> dict:
    return send(agent.lab, "--src", agent.lab.peer_ip, "--dport", "5555", "--count", str(n), "--pps", "200")


def test_apply_and_rollback_change_what_traffic_gets(env):
    agent, tmp = env
    v_before = int(agent.cli("status", json_out=True)["active_version"])
    p0, d0 = rule(agent, "app")
    legit(agent)
    p1, d1 = rule(agent, "app")
    assert (p1 - p0, d1 - d0) == (20, 0)

    r = agent.cli("apply", str(tmp / "drop-app.yaml"), "--reason", "block app for the test", "--force",
                  json_out=True)  # fmt: skip
    v_new = int(r["version"])
    legit(agent)
    p2, d2 = rule(agent, "app")
    assert (p2 - p1, d2 - d1) == (0, 20), "the new set drops app traffic"

    r = agent.cli("rollback", "--reason", "undo", json_out=True)
    assert int(r["version"]) == v_before
    legit(agent)
    p3, d3 = rule(agent, "app")
    assert (p3 - p2, d3 - d2) == (20, 0), "the old set is back"

    versions = agent.cli("versions", json_out=True)
    by_number = {int(v["number"]): v for v in versions}
    assert by_number[v_new]["author"] == "token:admin (as e2e-test)"
    assert by_number[v_new]["reason"] == "block app for the test"
    assert by_number[v_before]["active"] is True


def test_restart_keeps_program_and_version(env):
    agent, tmp = env
    before = agent.cli("status", json_out=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        agent.stop(sig)
        # no agent: the program keeps filtering with the last rule set
        send(agent.lab, "--src", agent.lab.peer_ip, "--dport", "5555", "--count", "10", "--pps", "200")
        agent.start()
        after = agent.cli("status", json_out=True)
        assert after["active_version"] == before["active_version"]
        assert after["prog_id"] == before["prog_id"], "the program was adopted, never re-attached"
        assert after["attached"] is True
    log = agent.log()
    assert "adopted=True" in log


def test_grpc_error_codes_and_field_errors(env):
    agent, tmp = env
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    token = [ln.split()[1] for ln in (agent.state_dir / "tokens").read_text().splitlines()
             if ln.startswith("admin ")][0]  # fmt: skip
    md = [("authorization", f"Bearer {token}")]
    stub = pbg.FilterStub(grpc.insecure_channel(agent.server))
    with pytest.raises(grpc.RpcError) as e:
        stub.ApplyRuleSet(pb.ApplyRequest(yaml="rules:\n  - name: x\n    limit: {pps: -1}\n", source="bad.yaml",
                                          reason="r"), metadata=md)  # fmt: skip
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    errs = dict(e.value.trailing_metadata())["tidegate-errors-bin"]
    v = pb.ValidationErrors.FromString(errs).violations[0]
    assert (v.path, v.line) == ("rules[0].limit.pps", 3)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetVersion(pb.GetVersionRequest(number=999), metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    for call, req in ((stub.PromoteShadow, pb.PromoteRequest(reason="x")),
                      (stub.ShadowReport, pb.ShadowReportRequest())):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            call(req, metadata=md)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        stub.GetStatus(pb.GetStatusRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    read = [ln.split()[1] for ln in (agent.state_dir / "tokens").read_text().splitlines() if ln.startswith("read ")][0]
    stub.GetStatus(pb.GetStatusRequest(), metadata=[("authorization", f"Bearer {read}")])
    with pytest.raises(grpc.RpcError) as e:
        stub.Rollback(pb.RollbackRequest(reason="x"), metadata=[("authorization", f"Bearer {read}")])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    audit = agent.cli("audit", "--action", "auth-denied", json_out=True)
    assert {a["result"] for a in audit} >= {"unauthenticated", "permission-denied"}
    assert all(a["peer"].startswith("ipv4:127.0.0.1") for a in audit)


def test_bad_inputs_change_nothing(env):
    agent, tmp = env
    pin_dir = f"/sys/fs/bpf/tidegate/{agent.pin_name}"
    maps0 = pinned_dump(pin_dir)
    versions0 = agent.cli("versions", json_out=True)
    (tmp / "malformed.yaml").write_text("rules: [\n")
    (tmp / "invalid.yaml").write_text(BASE.replace("pps: 500", "pps: 0"))
    (tmp / "unknown-key.yaml").write_text(BASE.replace("dst_ports", "dst_port"))
    cases = [
        (("apply", str(tmp / "malformed.yaml"), "--reason", "x"), 1, "syntax"),
        (("apply", str(tmp / "invalid.yaml"), "--reason", "x"), 1, "rules[0].limit.pps"),
        (("apply", str(tmp / "unknown-key.yaml"), "--reason", "x"), 1, "did you mean `dst_ports`"),
        (("apply", str(tmp / "missing.yaml"), "--reason", "x"), 2, "no such file"),
        (("apply", str(tmp / "base.yaml")), 1, "reason is required"),
        (("rollback", "--to", "999", "--reason", "x"), 1, "NOT_FOUND"),
        (("set-limit", "nosuchrule", "--pps", "5", "--reason", "x"), 1, "no rule named"),
        (("show", "999"), 1, "NOT_FOUND"),
    ]
    for argv, code, text in cases:
        r = agent.cli(*argv, check=False)
        assert r.returncode == code, (argv, r.stdout, r.stderr)
        assert text in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr
    assert pinned_dump(pin_dir) == maps0, "rejected inputs left the kernel maps byte-identical"
    assert agent.cli("versions", json_out=True) == versions0
    rejected = agent.cli("audit", "--action", "rejected-apply", json_out=True)
    assert len(rejected) >= 4


def test_invalid_file_errors_name_line(env):
    agent, tmp = env
    (tmp / "invalid.yaml").write_text(BASE.replace("pps: 500", "pps: 0"))
    r = agent.cli("apply", str(tmp / "invalid.yaml"), "--reason", "x", check=False)
    assert f"{tmp / 'invalid.yaml'}:8: rules[0].limit.pps" in r.stderr


def test_metrics_scrape_matches_traffic(env):
    agent, tmp = env
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode()
        vals = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                vals[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return vals, body

    m0, _ = scrape()
    sent = send(agent.lab, "--src-net", "198.18.0.0/20", "--sources", "500", "--dport", "9", "--count", "3000")["sent"]
    m1, body = scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0) - m0.get(key, 0)

    sink = delta("tidegate_rule_packets_total", rule="sink", verdict="pass") + delta(
        "tidegate_rule_packets_total", rule="sink", verdict="drop"
    )
    assert sink == sent
    assert m1[("tidegate_active_version", ())] >= 1
    assert m1[("tidegate_attached", ())] == 1
    assert "process_resident_memory_bytes" in body
    # bounded cardinality: no label carries an address
    assert "198.18." not in body


def test_every_cli_verb_in_both_modes(env):
    agent, tmp = env
    v_a = int(agent.cli("status", json_out=True)["active_version"])  # its own two versions, whatever ran before
    v_b = int(agent.cli("apply", str(tmp / "drop-app.yaml"), "--reason", "for diff", "--force", json_out=True)["version"])
    agent.cli("rollback", "--to", str(v_a), "--reason", "back for the verbs")
    send(agent.lab, "--src", agent.lab.peer_ip, "--dport", "5555", "--count", "30", "--pps", "100")
    verbs = [
        ("status",), ("versions",), ("show", str(v_a)), ("diff", str(v_a), str(v_b)), ("counters",), ("top", "-n", "5"),
        ("audit", "--limit", "5"), ("watch", "--count", "2", "--interval", "0.2"), ("whatif", str(tmp / "base.yaml")),
        ("validate", str(tmp / "base.yaml")), ("version",), ("review", str(v_b)),
    ]  # fmt: skip
    for argv in verbs:
        table = agent.cli(*argv)
        assert table.stdout.strip(), argv
        js = agent.cli("-o", "json", *argv)
        if argv[0] == "watch":
            lines = [ln for ln in js.stdout.splitlines() if ln.strip()]
            assert len(lines) == 2
        else:
            import json

            json.loads(js.stdout)
    # a source of its own, so its entry (and first-seen time) is this flow's
    bg = send(agent.lab, "--src", FRESH, "--dport", "5555", "--count", "200", "--pps", "50", wait=False)
    top = wait_for_top(agent, FRESH)
    res = finish(bg)
    rate = res["sent"] / res["seconds"]  # what the sender managed, not what it was asked for
    assert 0.5 * rate <= top["pps"] <= 1.5 * rate and top["rule"] == "app", (top, res)
    diff = agent.cli("diff", str(v_a), str(v_b)).stdout
    assert "-    limit: {pps: 500, burst: 500}" in diff and "+    action: drop" in diff
    comp = agent.cli("completion", "bash").stdout
    # the script registers a completion function for the tidegate command (what it completes: test_cli_offline)
    assert re.search(r"^complete .*-F \S+ tidegate$", comp, re.M), comp[-500:]


FRESH = "198.51.100.77"


def wait_for_top(agent, address: str, deadline_s: float = 20) -> dict:
    """The source's row in `top` once the last sample interval lies wholly
    inside its traffic (it was first seen two intervals ago or more)."""
    deadline = time.monotonic() + deadline_s
    while True:
        top = agent.cli("top", "-n", "5", json_out=True)
        mine = [s for s in top.get("sources", []) if s["address"] == address]
        if mine and mine[0]["first_seen_seconds_ago"] >= 2 * top["interval_seconds"] + 0.3:
            return mine[0]
        assert time.monotonic() < deadline, top
        time.sleep(0.3)


def test_shadow_promote_and_clear(env):
    agent, tmp = env
    (tmp / "candidate.yaml").write_text(BASE.replace("pps: 500, burst: 500", "pps: 5, burst: 5"))
    v = int(agent.cli("apply", str(tmp / "candidate.yaml"), "--shadow", "--reason", "try", json_out=True)["version"])
    p0, d0 = rule(agent, "app")
    res = legit(agent, 40)
    p1, d1 = rule(agent, "app")
    assert (p1 - p0, d1 - d0) == (40, 0), "the shadow set enforces nothing"
    rep = agent.cli("shadow", "report", json_out=True)
    app = [r for r in rep["rules"] if r["rule"] == "app"][0]
    # the candidate's 5 pps with a burst of 5 would have passed the burst and 5 pps for as long as the
    # sender took (one more for the 4 ms clock): the rest of the 40 would have been dropped
    assert 40 - (5 + 5 * res["seconds"] + 1) <= int(app["would_drop_new"]) <= 35, (app, res)
    assert int(rep["shadow_version"]) == v
    agent.cli("shadow", "clear", "--reason", "done")
    assert agent.cli("status", json_out=True)["shadow_version"] in ("0", 0)
    # load again and promote: atomic, versioned
    v2 = int(agent.cli("apply", str(tmp / "candidate.yaml"), "--shadow", "--reason", "again", json_out=True)["version"])
    r = agent.cli("promote", "--reason", "looks fine", json_out=True)
    assert int(r["version"]) == v2
    st = agent.cli("status", json_out=True)
    assert int(st["active_version"]) == v2 and st["shadow_version"] in ("0", 0)
    agent.cli("rollback", "--reason", "restore base")


def test_agent_refuses_bad_starts(env, tmp_path):
    agent, tmp = env
    bin_ = str(BIN)
    cases = [
        (["--interface", "nosuchif0", "--listen", "127.0.0.1:0"], "does not exist"),
        (["--interface", agent.lab.host_if, "--listen", agent.server], "not available"),
        (["--interface", agent.lab.host_if, "--listen", "0.0.0.0:50999"], "without TLS"),
    ]
    for extra, text in cases:
        r = subprocess.run([bin_, "agent", "--state-dir", str(tmp_path / "s"), "--metrics-listen", "off", *extra],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode != 0 and text in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr
    # the running agent's program is untouched
    assert agent.cli("status", json_out=True)["attached"] is True


def test_unreachable_agent_is_one_line(env):
    agent, tmp = env
    r = subprocess.run([str(BIN), "--server", "127.0.0.1:1", "status"], capture_output=True, text=True)
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "cannot reach the agent" in r.stderr
