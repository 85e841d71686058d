"""Starting and restarting a real agent: what it reads, what it refuses,
what it creates and what it reports while the filter is (not) attached.

- the --rules seed file is read only when it is used (store and kernel
  empty): a missing or broken one never stops a restart on a good store;
- a restart with the same program attached and pinned does not compile, nor does
  a start with nothing pinned once a compile is kept in the state dir;
- the state dir's files (store, -wal, -shm, .bak, tokens) are private;
- a role map naming an unknown role stops the start with one clear line;
- gRPC health is NOT_SERVING while the filter is not attached.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import grpc
import pytest

from .conftest import BASE_RULES, BIN, PIN_ROOT, free_port, xdp_prog_id

pytestmark = pytest.mark.e2e

DROP_APP = BASE_RULES.replace("    limit: {pps: 500, burst: 500}", "    action: drop")


def _status(agent) -> tuple:
    st = agent.api.GetStatus()
    return st.attached, st.active_version


# ------------------------------------------------------------- seed file
def test_a_missing_or_broken_seed_file_does_not_stop_a_restart(start_agent):
    agent = start_agent("seed", BASE_RULES)
    seed = agent.rules
    v2 = agent.api.ApplyRuleSet(yaml=DROP_APP, reason="the operator's change", force=True).version
    assert _status(agent) == (True, v2)
    prog = xdp_prog_id(agent.lab.host_if)

    for damage in ("broken", "missing"):
        agent.stop()
        if damage == "broken":
            with open(seed, "w") as f:
                f.write("rules: [\n  - {name: app\n")  # a YAML syntax error
        else:
            os.unlink(seed)
        offset = len(agent.log())
        agent.start()
        assert _status(agent) == (True, v2), f"{damage} seed: the store's active version runs"
        assert xdp_prog_id(agent.lab.host_if) == prog, "the attached program was adopted"
        log = agent.log()[offset:]
        assert "--rules not applied" in log and "level=warning" in log
        assert "Traceback" not in log
        # the same program attached and pinned: adopted without a compile child
        assert 'msg="program found pinned: not compiling"' in log and "compiled=False" in log
        assert 'msg="compiling the program in a child process"' not in log

    # the kernel empty (detached and unpinned), the store good, the seed still missing: the store wins
    agent.stop()
    agent.cleanup_kernel()
    assert xdp_prog_id(agent.lab.host_if) is None
    offset = len(agent.log())
    agent.start()
    assert _status(agent) == (True, v2), "restored from the store, not from the seed"
    assert len(agent.api.ListVersions(limit=100).versions) == 2
    log = agent.log()[offset:]
    assert 'msg="restored"' in log
    # nothing pinned, but the first start's compile is kept in the state dir: loaded from there, not compiled
    assert 'msg="program loaded from the cache: not compiling"' in log and 'program="loaded the cached' in log
    assert "loaded_ahead=True" in log, "loaded in a thread beside the agent's imports"
    assert 'msg="compiling the program in a child process"' not in log
    assert os.listdir(agent.state_dir / "program-cache"), "the compile was kept in <state-dir>/program-cache"

    # a seed that would be used (a new store, an empty kernel) is still checked: one clear line
    agent.stop()
    agent.cleanup_kernel()
    argv = agent.argv()
    argv[argv.index("--state-dir") + 1] = str(agent.workdir / "new-state")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("ts=")]
    assert r.returncode != 0 and errors == [f"tidegate agent: --rules {seed}: (document): no such file"], r.stderr
    assert xdp_prog_id(agent.lab.host_if) is None and not os.path.exists(agent.pin_dir)


# -------------------------------------------------------- state-dir modes
def test_the_state_dir_files_are_private(start_agent):
    old = os.umask(0o022)  # what a shell or systemd (without UMask=) gives the agent
    try:
        agent = start_agent("umask", BASE_RULES)
        agent.api.ApplyRuleSet(yaml=DROP_APP, reason="write through the WAL", force=True)
        first = _modes(agent.state_dir)
        agent.stop()
        # an older store: the next start backs it up before the schema migration
        db = sqlite3.connect(agent.state_dir / "tidegate.db")
        db.execute("PRAGMA user_version = 0")
        db.close()
        agent.start()
        agent.api.ApplyRuleSet(yaml=BASE_RULES, reason="again", force=True)
    finally:
        os.umask(old)
    again = _modes(agent.state_dir)
    assert {"tidegate.db", "tidegate.db-wal", "tidegate.db-shm", "tokens"} <= first.keys(), first
    assert {"tidegate.db", "tidegate.db-wal", "tidegate.db-shm", "tidegate.db.bak", "tokens"} <= again.keys(), again
    for when, modes in (("first start", first), ("after a migration", again)):
        assert all(int(m, 8) & 0o077 == 0 for m in modes.values()), f"{when}: readable by others: {modes}"
    assert os.stat(agent.state_dir).st_mode & 0o077 == 0


def _modes(d) -> dict[str, str]:
    return {p.name: f"{os.stat(p).st_mode & 0o777:04o}" for p in d.iterdir()}


# ------------------------------------------------------------- role map
def _agent_until_serving_or_exit(argv: list[str], timeout: float = 90) -> tuple[int | None, str]:
    """Run an agent; return (exit code, stderr), or (None, stderr) if it came up (it is then stopped)."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for line in p.stderr:
            lines.append(line)
            if 'msg="serving"' in line or time.monotonic() > deadline:
                p.terminate()
                p.wait(timeout=30)
                return None, "".join(lines)
        return p.wait(timeout=30), "".join(lines)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("roles, words", [
    ({"alice": "admin", "grafana": "raed"}, "unknown role 'raed' for 'grafana' (a role is read or admin)"),
    (["alice"], 'must be a JSON object of certificate name: role, e.g. {"alice": "admin"}'),
], ids=["typo", "list"])  # fmt: skip
def test_a_role_map_with_an_unknown_role_stops_the_start(make_lab, tmp_path, roles, words):
    from tidegate.access.certs import make_lab_pki

    lab = make_lab("rmap")
    pki = tmp_path / "pki"
    make_lab_pki(pki, "localhost", ["alice"])
    role_map = tmp_path / "roles.json"
    role_map.write_text(json.dumps(roles))
    (tmp_path / "rules.yaml").write_text(BASE_RULES)
    pin = f"e2e-{lab.tag}"
    argv = [str(BIN), "agent", "--interface", lab.host_if, "--pin-name", pin, "--metrics-listen", "off",
            "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
            "--rules", str(tmp_path / "rules.yaml"), "--tls-cert", str(pki / "server.pem"),
            "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
            "--role-map", str(role_map)]  # fmt: skip
    code, stderr = _agent_until_serving_or_exit(argv)
    assert code not in (None, 0), f"the agent started with role map {roles}:\n{stderr}"
    errors = [ln for ln in stderr.splitlines() if not ln.startswith("ts=")]
    assert errors == [f"tidegate agent: --role-map {role_map}: {words}"], stderr
    assert xdp_prog_id(lab.host_if) is None and not os.path.exists(f"{PIN_ROOT}/{pin}"), "nothing left behind"


# ----------------------------------------------------------------- health
def _health(agent, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(agent.server) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _until(what, want, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_health_is_not_serving_while_the_filter_is_detached(start_agent):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tidegate.api.readiness import CHECK_MAX_AGE

    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    agent = start_agent("hlth", extra=["--attach-check-seconds", "5"])  # no rule set: loaded, not attached
    assert _status(agent) == (False, 0)
    for service in ("", "tidegate.v1.Filter"):
        assert _health(agent, service) == NOT_SERVING, service
    channel = grpc.insecure_channel(agent.server)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    try:
        assert next(watch).status == NOT_SERVING

        agent.api.ApplyRuleSet(yaml=BASE_RULES, reason="attach")
        for service in ("", "tidegate.v1.Filter"):
            assert _health(agent, service) == SERVING, service
        assert next(watch).status == SERVING, "a watcher hears of the attach"
    finally:
        channel.close()

    # something removes the program: NOT_SERVING until the watchdog has attached it again
    for attempt in range(5):
        reattaches = len(agent.api.ListAudit(limit=100, action="reattach").entries)
        subprocess.run(["ip", "link", "set", "dev", agent.lab.host_if, "xdp", "off"], check=True)
        time.sleep(CHECK_MAX_AGE + 0.05)  # a Check answers from a status at most this old
        seen = _health(agent)
        if len(agent.api.ListAudit(limit=100, action="reattach").entries) == reattaches:
            break  # the watchdog did not run in between: `seen` was taken while detached
    else:
        pytest.fail("the watchdog reattached before every health check (5 s period)")
    assert seen == NOT_SERVING
    assert _until(lambda: _health(agent), SERVING) == SERVING, "SERVING again once the watchdog reattached"
    assert _status(agent)[0] is True and xdp_prog_id(agent.lab.host_if) is not None
    assert len(agent.api.ListAudit(limit=100, action="reattach").entries) == reattaches + 1
