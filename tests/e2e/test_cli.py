"""Every `tidegate` verb against a real agent (subprocess, real XDP on a veth
pair, real gRPC on loopback), in both output modes, through the installed
`tidegate` command exactly as an operator runs it.

What is asserted is what an operator relies on: apply creates version N+1
with the author and reason; rollback changes the active version; diff shows
the changed line; JSON has the documented fields with JSON types; errors
have the documented exit code and one clear first line; a guard that rolls
back is exit 4; the lab PKI from `tidegate certs` gives working mTLS with
the two roles; `detach` removes what a stopped agent left attached."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from .conftest import BASE_RULES
from .conftest import BIN, Agent, finish, send, xdp_prog_id

pytestmark = pytest.mark.e2e

BASE = "\n" + BASE_RULES  # line numbers in the assertions below count this first empty line


# raises a limit: never newly drops anything, so the blast-radius check lets it through
LOOSER = BASE.replace("pps: 500, burst: 500", "pps: 800, burst: 800")
TIGHT_SINK = BASE.replace("pps: 1000, burst: 1000", "pps: 5, burst: 5")
INVALID = BASE.replace("protocol: udp\n    dst_ports: [5555]", "protocol: udpx\n    dst_ports: [5555]")
AUTHOR = "e2e-cli"


class Cli:
    """The installed `tidegate` against one agent, as an operator runs it:
    the server, the token file and the author come from the environment."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.lab = agent.lab
        self.server = agent.server
        self.state_dir = agent.state_dir

    def env(self) -> dict:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
        return {**base, "TIDEGATE_SERVER": self.server, "TIDEGATE_TOKEN_FILE": str(self.state_dir / "tokens"),
                "TIDEGATE_AUTHOR": AUTHOR}  # fmt: skip

    def cli(self, *args: str, check: bool = True, json_out: bool = False, env: dict | None = None):
        argv = [str(BIN)] + (["-o", "json"] if json_out else []) + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, env={**self.env(), **(env or {})}, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        if json_out and r.returncode == 0:
            return json.loads(r.stdout)
        return r


@pytest.fixture(scope="module")
def env(start_agent, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    for name, text in (("base", BASE), ("looser", LOOSER), ("tight-sink", TIGHT_SINK), ("invalid", INVALID)):
        (tmp / f"{name}.yaml").write_text(text)
    return Cli(start_agent("cli", BASE)), tmp


def both(agent: Cli, *argv: str) -> tuple[str, object]:
    """Run a read-only verb in table mode and in JSON mode: (table text, parsed JSON)."""
    table = agent.cli(*argv)
    assert table.stdout.strip(), argv
    assert "Traceback" not in table.stderr
    return table.stdout, agent.cli(*argv, json_out=True)


def fail(agent: Cli, *argv: str) -> subprocess.CompletedProcess:
    r = agent.cli(*argv, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def active(agent: Cli) -> int:
    return agent.cli("status", json_out=True)["active_version"]


def newest(agent: Cli) -> int:
    return max(v["number"] for v in agent.cli("versions", json_out=True))


def legit(agent: Cli, n: int = 30, pps: int = 100) -> dict:
    return send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=n, pps=pps)


# ----------------------------------------------------------------- reading
def test_status(env):
    agent, _ = env
    table, st = both(agent, "status")
    assert agent.lab.host_if in table and "active version" in table
    assert st["interface"] == agent.lab.host_if
    assert st["attached"] is True and st["xdp_mode"] in ("native", "generic")
    for key in ("active_version", "shadow_version", "tracked_sources", "prog_id", "guard_version"):
        assert isinstance(st[key], int), key
    assert st["active_version"] >= 1 and st["prog_id"] > 0
    assert isinstance(st["uptime_seconds"], float) and isinstance(st["guard_active"], bool)


def test_counters_and_top_follow_traffic(env):
    agent, _ = env
    c0 = agent.cli("counters", json_out=True)
    app0 = next(r for r in c0["rules"] if r["rule"] == "app")
    fresh = "198.51.100.79"  # a source of its own: its entry (and first-seen time) is this flow's
    bg = send(agent.lab, src=fresh, dport=5555, count=150, pps=50, wait=False)
    deadline = time.monotonic() + 20
    while True:  # until the last sample interval (one second here) lies wholly inside the flow
        table, top = both(agent, "top", "-n", "5")
        mine = [s for s in top["sources"] if s["address"] == fresh]
        if mine and mine[0]["first_seen_seconds_ago"] >= 2 * top["interval_seconds"] + 0.3:
            break
        assert time.monotonic() < deadline, top
        time.sleep(0.3)
    res = finish(bg)
    sent, rate = res["sent"], res["sent"] / res["seconds"]  # the rate the sender reached
    assert mine[0]["rule"] == "app" and 0.5 * rate <= mine[0]["pps"] <= 1.5 * rate, (top, res)
    assert isinstance(top["tracked_sources"], int) and isinstance(top["interval_seconds"], float)
    assert fresh in table and "top sources by packets" in table
    _, drops = both(agent, "top", "--by", "drops", "-n", "3")
    assert isinstance(drops["sources"], list)

    table, c1 = both(agent, "counters")
    app1 = next(r for r in c1["rules"] if r["rule"] == "app")
    assert app1["pass_packets"] - app0["pass_packets"] == sent
    assert isinstance(c1["packets"], int) and c1["packets"] >= sent and isinstance(c1["time"], float)
    assert {"verdict", "reason", "packets", "bytes"} <= set(c1["reasons"][0])
    assert "per rule" in table and "app" in table


def test_watch(env):
    agent, _ = env
    bg = send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=100, pps=100, wait=False)
    r = agent.cli("-o", "json", "watch", "--count", "3", "--interval", "0.3")
    updates = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(updates) == 3
    assert updates[0]["time"] < updates[1]["time"] < updates[2]["time"]
    assert updates[2]["packets"] >= updates[0]["packets"]
    table = agent.cli("watch", "--count", "3", "--interval", "0.3").stdout
    finish(bg)
    assert "by verdict and reason" in table and "per rule" in table and f"active v{active(agent)}" in table


def test_version_validate_insight(env):
    agent, tmp = env
    table, v = both(agent, "version")
    assert v["tidegate"] == v["agent"] and f"agent {v['agent']} at {agent.server}" in table
    table, val = both(agent, "validate", str(tmp / "base.yaml"))
    assert val["valid"] is True and val["rules"] == 2 and "valid (2 rules" in table
    table, ins = both(agent, "insight")
    assert isinstance(ins, dict) and "reading" in ins and table.strip()


# ---------------------------------------------------------------- changing
def test_apply_creates_next_version_with_author_and_reason(env):
    agent, tmp = env
    before = agent.cli("versions", json_out=True)
    n = max(v["number"] for v in before)
    r = agent.cli("apply", str(tmp / "looser.yaml"), "--reason", "raise app limit (table)")
    assert r.stdout.startswith(f"applied {tmp / 'looser.yaml'} as version {n + 1}\n"), r.stdout
    out = agent.cli("apply", str(tmp / "base.yaml"), "--reason", "back to base (json)", json_out=True)
    assert out["version"] == n + 2 and out["shadow"] is False and out["guard_outcome"] in ("", "kept", "watching")
    assert active(agent) == n + 2

    table, versions = both(agent, "versions")
    by_number = {v["number"]: v for v in versions}
    assert by_number[n + 1]["reason"] == "raise app limit (table)" and by_number[n + 1]["author"] == f"token:admin (as {AUTHOR})"
    assert by_number[n + 2]["active"] is True and by_number[n + 1]["active"] is False
    assert isinstance(by_number[n + 1]["activations"], int) and by_number[n + 1]["state"]
    assert "raise app limit (table)" in table and AUTHOR in table

    table, shown = both(agent, "show", str(n + 1))
    assert shown["info"]["number"] == n + 1 and "pps: 800, burst: 800" in shown["yaml"]
    assert "# reason: raise app limit (table)" in table and "pps: 800, burst: 800" in table

    table, diff = both(agent, "diff", str(n + 1), str(n + 2))
    assert "-    limit: {pps: 800, burst: 800}" in table and "+    limit: {pps: 500, burst: 500}" in table
    assert diff["identical"] is False and "-    limit: {pps: 800, burst: 800}" in diff["diff"]
    table, same = both(agent, "diff", str(n + 2), str(n + 2))
    assert same == {"a": n + 2, "b": n + 2, "identical": True, "diff": []}
    assert table.strip() == f"versions {n + 2} and {n + 2} are identical"


def test_rollback_changes_the_active_version(env):
    agent, tmp = env
    prev = active(agent)
    agent.cli("apply", str(tmp / "looser.yaml"), "--reason", "to roll back")
    v = active(agent)
    assert v == newest(agent) and v != prev
    r = agent.cli("rollback", "--reason", "undo (table)")
    assert r.stdout.strip() == f"rolled back: version {prev} is active"
    assert active(agent) == prev
    out = agent.cli("rollback", "--to", str(v), "--reason", "redo (json)", json_out=True)
    assert out["version"] == v and active(agent) == v
    agent.cli("rollback", "--reason", "restore")


def test_set_limit(env):
    agent, _ = env
    v, n = active(agent), newest(agent)
    r = agent.cli("set-limit", "app", "--pps", "600", "--burst", "700", "--reason", "more app")
    assert r.stdout.startswith(f"limit of app set to 600 pps, burst 700: version {n + 1} is active\n")
    out = agent.cli("set-limit", "app", "--pps", "650", "--reason", "more app (json)", json_out=True)
    assert out["version"] == n + 2 and active(agent) == n + 2
    shown = agent.cli("show", str(n + 2), json_out=True)
    assert "pps: 650" in shown["yaml"] and shown["info"]["source"] == "set-limit"
    agent.cli("rollback", "--to", str(v), "--reason", "restore")


def test_whatif(env):
    agent, tmp = env
    table, est = both(agent, "whatif", str(tmp / "looser.yaml"))
    assert est["within_budget"] is True and isinstance(est["packet_share"], float)
    assert isinstance(est["sources_seen"], int) and isinstance(est["rules"], list)
    assert "within budget" in table and "over the last" in table


def test_shadow_report_promote_clear(env):
    agent, tmp = env
    v0 = active(agent)
    r = agent.cli("apply", str(tmp / "looser.yaml"), "--shadow", "--reason", "candidate (table)")
    assert "as shadow version" in r.stdout
    legit(agent, 20)
    table, rep = both(agent, "shadow", "report")
    assert rep["shadow_version"] > v0 and rep["active_version"] == v0
    assert {"rule", "packets", "would_drop", "would_drop_new", "sources", "share"} <= set(rep["rules"][0])
    assert "per rule" in table and f"shadow version {rep['shadow_version']}" in table
    r = agent.cli("shadow", "clear", "--reason", "not now")
    assert r.stdout.strip() == f"shadow version {rep['shadow_version']} cleared"
    assert agent.cli("status", json_out=True)["shadow_version"] == 0

    out = agent.cli("apply", str(tmp / "looser.yaml"), "--shadow", "--reason", "candidate (json)", json_out=True)
    assert out["shadow"] is True
    r = agent.cli("promote", "--reason", "looks fine")
    assert r.stdout.strip() == f"promoted: shadow version {out['version']} is now active"
    st = agent.cli("status", json_out=True)
    assert st["active_version"] == out["version"] and st["shadow_version"] == 0
    agent.cli("apply", str(tmp / "looser.yaml"), "--shadow", "--reason", "again")
    assert agent.cli("-o", "json", "shadow", "clear", "--reason", "done", json_out=False).returncode == 0
    agent.cli("rollback", "--to", str(v0), "--reason", "restore")


def test_review_and_audit(env):
    agent, tmp = env
    # its own apply and rollback, so the audit has both whatever ran before
    agent.cli("apply", str(tmp / "looser.yaml"), "--reason", "for the audit")
    agent.cli("rollback", "--reason", "for the audit")
    v = active(agent)
    table, rev = both(agent, "review", str(v))
    assert rev["version"] == v and isinstance(rev["complete"], bool) and "guard_fired" in rev
    assert f"review of version {v}" in table
    table, audit = both(agent, "audit", "--limit", "50")
    mine = [a for a in audit if a["author"] == f"token:admin (as {AUTHOR})" and a["action"] == "apply"]
    assert mine and all(isinstance(a["version"], int) for a in audit)
    assert {"time", "action", "result", "author", "peer", "version", "detail"} <= set(audit[0])
    assert "audit log" in table and AUTHOR in table
    _, rollbacks = both(agent, "audit", "--action", "rollback")
    assert rollbacks and {a["action"] for a in rollbacks} == {"rollback"}


def rollbacks_by_cause(agent: Cli) -> dict:
    return {dict(k[1])["cause"]: v for k, v in agent.agent.scrape().items() if k[0] == "tidegate_rollbacks_total"}


GUARD_CAUSE = re.compile(r"drop share \d+\.\d% vs \d+\.\d% before the change \(limit \+5%\)")


def test_guarded_apply_rolled_back_is_exit_4(env):
    """50 sources at about 40 pps each on the sink, none dropped; the tight
    sink (5 pps) drops most of their packets: the drop share rises far past
    the 5-point limit. 50 newly dropped sources are not more than the 50
    allowed, so the drop share, and nothing else, is the cause."""
    agent, tmp = env
    v0 = active(agent)
    rb0 = rollbacks_by_cause(agent)
    flood = send(agent.lab, src_net="198.18.0.0/24", sources=50, dport=9, count=30000, pps=2000, wait=False)
    try:
        time.sleep(3)  # a baseline for the guard
        r = fail(agent, "apply", str(tmp / "tight-sink.yaml"), "--force", "--guard", "--guard-seconds", "15",
                 "--reason", "tight sink, guarded")  # fmt: skip
        assert r.returncode == 4, (r.stdout, r.stderr)
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("GUARD ROLLED BACK"))
        assert line.startswith(f"GUARD ROLLED BACK to version {v0}: drop share "), line
        assert GUARD_CAUSE.fullmatch(line.split(": ", 1)[1]), line
        assert active(agent) == v0
        time.sleep(1)
        r = fail(agent, "-o", "json", "apply", str(tmp / "tight-sink.yaml"), "--force", "--guard", "--guard-seconds",
                 "15", "--reason", "tight sink, guarded (json)")  # fmt: skip
        assert r.returncode == 4, (r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert out["guard_outcome"] == "rolled-back" and out["rolled_back_to"] == v0
        assert GUARD_CAUSE.fullmatch(out["guard_cause"]), out["guard_cause"]
    finally:
        flood.kill()
        flood.communicate()
    assert active(agent) == v0
    guard = agent.cli("audit", "--action", "guard-rollback", json_out=True)
    assert len(guard) >= 2 and all(GUARD_CAUSE.match(g["detail"]) for g in guard[:2]), guard[:2]
    rb1 = rollbacks_by_cause(agent)
    assert rb1.get("guard-drop-share", 0) - rb0.get("guard-drop-share", 0) == 2, (rb0, rb1)
    assert {k: v for k, v in rb1.items() if k != "guard-drop-share"} == {
        k: v for k, v in rb0.items() if k != "guard-drop-share"}


def test_guarded_benign_change_is_kept(env, start_agent):
    """Drops before and after the change (a denied flood next to the
    legitimate stream, the same share throughout): a guard watching a change
    that only raises a limit keeps it. Its own agent, so the guard's 30 s
    baseline holds this traffic and nothing an earlier test sent."""
    _, tmp = env
    deny = BASE + 'deny: ["198.18.7.0/24"]\n'
    (tmp / "deny-looser.yaml").write_text(deny.replace("pps: 500, burst: 500", "pps: 800, burst: 800"))
    agent = Cli(start_agent("kept", deny))
    flood = send(agent.lab, src_net="198.18.7.0/24", sources=10, dport=9, count=4000, pps=300, wait=False)
    stream = send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=1200, pps=100, wait=False, seed=2)
    try:
        deadline = time.monotonic() + 20
        while agent.cli("counters", json_out=True)["dropped"] < 300:  # the guard's baseline has drops in it
            assert time.monotonic() < deadline, "the denied flood did not arrive"
            time.sleep(0.5)
        time.sleep(2)  # and more than one history sample of them
        r = agent.cli("-o", "json", "apply", str(tmp / "deny-looser.yaml"), "--guard", "--guard-seconds", "4",
                      "--reason", "raise app, guarded", check=False)  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert (out["guarded"], out["guard_outcome"], out["guard_cause"]) == (True, "kept", ""), out
        assert active(agent) == out["version"] == 2
    finally:
        for p in (flood, stream):
            p.kill()
            p.communicate()
    kept = agent.cli("audit", "--action", "guard", json_out=True)
    assert [(k["version"], k["detail"]) for k in kept] == [(2, "kept after 4s")]
    agent.agent.stop()


# ------------------------------------------------------------------ errors
def test_error_exit_codes_and_lines(env):
    agent, tmp = env
    versions0 = agent.cli("versions", json_out=True)
    r = fail(agent, "show", "999")
    assert r.returncode == 1 and r.stderr.startswith("tidegate: NOT_FOUND: ") and r.stderr.count("\n") == 1
    r = fail(agent, "-o", "json", "rollback", "--to", "999", "--reason", "x")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and r.stdout == ""
    r = fail(agent, "apply", str(tmp / "invalid.yaml"), "--reason", "x")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith("tidegate: INVALID_ARGUMENT: ")
    assert f"{tmp / 'invalid.yaml'}:6: rules[0].protocol: " in r.stderr, r.stderr
    assert len(lines) == len(set(lines)), "each field error once"
    r = fail(agent, "validate", str(tmp / "invalid.yaml"))
    assert r.returncode == 2 and f"{tmp / 'invalid.yaml'}:6: rules[0].protocol: " in r.stderr
    r = fail(agent, "apply", str(tmp / "missing.yaml"), "--reason", "x")
    assert r.returncode == 2 and r.stderr == f"tidegate: {tmp / 'missing.yaml'}: no such file\n"
    r = fail(agent, "promote", "--reason", "x")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "no shadow" in r.stderr
    r = fail(agent, "shadow", "report")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
    r = fail(agent, "set-limit", "nosuchrule", "--pps", "5", "--reason", "x")
    assert r.returncode == 1 and "nosuchrule" in r.stderr
    assert agent.cli("versions", json_out=True) == versions0, "refused changes made no version"


def test_without_a_token(env):
    agent, _ = env
    no_file = {"TIDEGATE_TOKEN_FILE": "/nonexistent/tokens"}
    r = agent.cli("status", check=False, env=no_file)
    assert r.returncode == 1 and r.stderr.startswith("tidegate: UNAUTHENTICATED: ")
    assert "/nonexistent/tokens" in r.stderr and r.stderr.count("\n") == 1
    read_token = agent.agent.token("read")
    r = agent.cli("rollback", "--reason", "x", check=False, env={**no_file, "TIDEGATE_TOKEN": read_token})
    assert r.returncode == 1 and r.stderr.startswith("tidegate: PERMISSION_DENIED: ")
    assert agent.cli("versions", "--token", read_token, check=False, env=no_file).returncode == 0


# -------------------------------------------------- mTLS, certs and detach
def test_certs_mtls_roles_and_detach(env, start_agent, tmp_path):
    agent, tmp = env
    pki = tmp_path / "pki"
    r = subprocess.run([str(BIN), "certs", "--out", str(pki), "--server-name", "localhost", "--client", "alice",
                        "--role", "admin"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(BIN), "-o", "json", "certs", "--out", str(pki), "--client", "grafana", "--role", "read"],
                       capture_output=True, text=True)  # fmt: skip
    assert json.loads(r.stdout)["roles"] == {"alice": "admin", "grafana": "read"}

    probe = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "alice.key").read_bytes(),
                                         (pki / "alice.pem").read_bytes())  # fmt: skip
    tls = start_agent("ctls", BASE, extra=[
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.pem"), "--role-map", str(pki / "roles.json")], credentials=probe)  # fmt: skip
    plain = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}

    def cli(*argv, who="alice"):
        creds = ["--ca", str(pki / "ca.pem"), "--cert", str(pki / f"{who}.pem"), "--key", str(pki / f"{who}.key")]
        return subprocess.run([str(BIN), "--server", tls.server, *(creds if who else []), *argv], capture_output=True,
                              text=True, env={**plain, "TIDEGATE_AUTHOR": "tls-test"}, timeout=60)  # fmt: skip

    r = cli("-o", "json", "status")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["interface"] == tls.lab.host_if and st["attached"] is True
    r = cli("apply", str(tmp / "looser.yaml"), "--reason", "over mTLS")
    assert r.returncode == 0, r.stderr
    versions = json.loads(cli("-o", "json", "versions").stdout)
    assert versions[0]["reason"] == "over mTLS" and versions[0]["author"] == "cert:alice (as tls-test)"
    # the read role reads and may not change anything
    assert cli("versions", who="grafana").returncode == 0
    r = cli("rollback", "--reason", "x", who="grafana")
    assert r.returncode == 1 and r.stderr.startswith("tidegate: PERMISSION_DENIED: "), r.stderr
    # no client certificate: the TLS handshake fails, one line, exit 3
    r = cli("status", who=None)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([str(BIN), "--server", tls.server, "--ca", str(pki / "ca.pem"), "status"],
                       capture_output=True, text=True, env=plain)  # fmt: skip
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "Handshake" not in r.stderr, r.stderr

    # detach: the agent stopped, its program stays attached; detach removes program and pins
    tls.stop()
    assert Path(tls.pin_dir).exists() and xdp_prog_id(tls.lab.host_if) is not None
    r = subprocess.run([str(BIN), "detach", "--interface", tls.lab.host_if, "--pin-name", tls.pin_name],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"detached tidegate from {tls.lab.host_if}" in r.stdout
    assert not Path(tls.pin_dir).exists() and xdp_prog_id(tls.lab.host_if) is None
