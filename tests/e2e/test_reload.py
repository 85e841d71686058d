"""SIGHUP (what `systemctl reload` sends): the agent re-reads its --rules
file and applies it through the normal safe path. A changed file becomes a
new version by agent:reload; a file that does not parse, or one the
blast-radius check refuses on the traffic seen, changes nothing (store and
pinned maps) and is logged and audited."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from .conftest import BASE_RULES, bpftool_dump, send

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]


@pytest.fixture(scope="module")
def agent(start_agent):
    a = start_agent("rld", BASE_RULES, extra=["--log-format", "json"])
    a.rules = Path(a.rules)
    return a


def events(agent) -> list[dict]:
    return [json.loads(ln) for ln in agent.log().splitlines() if ln.startswith("{")]


def hup_and_wait(agent, msgs=("reloaded", "reload refused: nothing changed", "reload: unchanged")) -> dict:
    before = len(events(agent))
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [e for e in events(agent)[before:] if e["msg"] in msgs]
        if new:
            return new[0]
        time.sleep(0.1)
    raise AssertionError(f"no reload outcome logged:\n{agent.log()[-3000:]}")


def status(agent) -> dict:
    return agent.cli("status", json_out=True)


def audit(agent) -> list[dict]:
    return agent.cli("audit", json_out=True)


def test_reload_applies_a_changed_file_as_a_new_version(agent):
    v0 = status(agent)["active_version"]
    ev = hup_and_wait(agent)
    assert ev["msg"] == "reload: unchanged" and status(agent)["active_version"] == v0, "same file: no new version"

    agent.rules.write_text(BASE_RULES.replace("limit: {pps: 1000, burst: 1000}", "limit: {pps: 700, burst: 700}"))
    ev = hup_and_wait(agent)
    assert ev["msg"] == "reloaded" and ev["level"] == "info", ev
    st = status(agent)
    assert st["active_version"] == ev["version"] == v0 + 1
    shown = agent.cli("show", str(ev["version"])).stdout
    assert "pps: 700" in shown
    versions = agent.cli("versions", json_out=True)
    newest = next(v for v in versions if v["number"] == ev["version"])
    assert newest["author"] == "agent:reload" and str(agent.rules) in newest["reason"]


def test_reload_refuses_a_broken_file_and_changes_nothing(agent):
    v0 = status(agent)["active_version"]
    maps0 = bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}")
    agent.rules.write_text(BASE_RULES.replace("pps: 1000, burst: 1000", "pps: 0, burst: 1000"))
    ev = hup_and_wait(agent)
    assert ev["msg"] == "reload refused: nothing changed" and ev["level"] == "error"
    assert "must be between 1" in ev["error"]
    assert status(agent)["active_version"] == v0
    assert bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}") == maps0
    last = audit(agent)[0]
    assert (last["action"], last["result"], last["author"]) == ("rejected-reload", "rejected", "agent:reload")


def test_reload_refuses_a_too_tight_file_on_live_traffic(agent):
    # the legitimate client sends 50 pps to the app port; the sampler learns it
    p = send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=600, pps=50, wait=False)
    try:
        time.sleep(6)
        v0 = status(agent)["active_version"]
        maps0 = bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}")
        agent.rules.write_text(BASE_RULES.replace("limit: {pps: 500, burst: 500}", "limit: {pps: 2, burst: 2}"))
        ev = hup_and_wait(agent)
    finally:
        p.kill()
        p.wait()
    assert ev["msg"] == "reload refused: nothing changed", ev
    assert "refused by the blast-radius check" in ev["error"]
    assert status(agent)["active_version"] == v0
    assert bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}") == maps0
    last = audit(agent)[0]
    assert (last["action"], last["author"]) == ("rejected-reload", "agent:reload")
    assert "blast-radius" in last["detail"]
    assert agent.proc.poll() is None, "the agent keeps running"
