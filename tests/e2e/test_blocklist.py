"""The quick block list through a real agent: `deny add` is a new version
that drops the CIDR's traffic in the kernel, `deny list` shows its expiry,
the agent removes it by itself when its TTL ends (a version by agent:ttl),
and a canary cannot be denied (refused, nothing changed)."""

from __future__ import annotations

import time

import pytest

from .conftest import BASE_RULES, bpftool_dump, send
from .harness import Agent, deny_drops

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

FLOOD_SRC = "198.51.100.9"


@pytest.fixture(scope="module")
def agent(tmp_path_factory, make_lab):
    tmp = tmp_path_factory.mktemp("deny")
    lab = make_lab("dny")
    (tmp / "rules.yaml").write_text(BASE_RULES + f'canaries: ["{lab.peer_ip}"]\n')
    a = Agent(lab, tmp, rules=str(tmp / "rules.yaml"))
    try:
        yield a.start()
    finally:
        a.stop()


def active(agent) -> int:
    return agent.cli("status", json_out=True)["active_version"]


def test_deny_add_drops_lists_and_expires_by_itself(agent):
    v0 = active(agent)
    r = agent.cli("deny", "add", "198.51.100.0/24", "--ttl", "4s", "--reason", "scanner, INC-1")
    assert f"version {v0 + 1}" in r.stdout and "until" in r.stdout
    listed = agent.cli("deny", "list", json_out=True)
    assert listed["active_version"] == v0 + 1
    (e,) = listed["entries"]
    assert e["cidr"] == "198.51.100.0/24" and e["quick"] and e["reason"] == "scanner, INC-1"
    assert 0 < e["expires"] - time.time() <= 4
    assert "198.51.100.0/24" in agent.cli("deny", "list").stdout

    d0 = deny_drops(agent)
    send(agent.lab, src=FLOOD_SRC, dport=5555, count=30, pps=300)
    assert deny_drops(agent) - d0 == 30, "the kernel drops the denied CIDR"

    deadline = time.monotonic() + 30
    while active(agent) == v0 + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert active(agent) == v0 + 2
    newest = next(v for v in agent.cli("versions", json_out=True) if v["number"] == v0 + 2)
    assert newest["author"] == "agent:ttl" and "198.51.100.0/24" in newest["reason"]
    assert agent.cli("deny", "list", json_out=True)["entries"] == []
    d1 = deny_drops(agent)
    send(agent.lab, src=FLOOD_SRC, dport=5555, count=30, pps=300)
    assert deny_drops(agent) == d1, "expired: no longer denied"
    actions = [a["action"] for a in agent.cli("audit", json_out=True)[:3]]
    assert "deny-expire" in actions and "deny-add" in actions


def test_a_canary_cannot_be_denied_and_nothing_changes(agent):
    v0 = active(agent)
    maps0 = bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}")
    r = agent.cli("deny", "add", f"{agent.lab.peer_ip}/32", "--ttl", "10m", "--reason", "oops", check=False)
    assert r.returncode == 1 and "canary" in r.stderr and "blast-radius" in r.stderr, r.stderr
    for args in (("deny", "add", "10.0.0.1/8", "--reason", "host bits"),
                 ("deny", "remove", "203.0.113.0/24", "--reason", "not there"),
                 ("deny", "add", "203.0.113.0/24")):  # no reason
        r = agent.cli(*args, check=False)
        assert r.returncode == 1, (args, r.stderr)
    assert agent.cli("deny", "add", "x", "--ttl", "10 minutes", "--reason", "r", check=False).returncode == 2
    assert active(agent) == v0
    assert bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}") == maps0
    assert agent.cli("audit", json_out=True)[0]["action"].startswith("rejected-deny")


def test_deny_remove_is_a_version(agent):
    v0 = active(agent)
    agent.cli("deny", "add", "203.0.113.0/24", "--reason", "no ttl")
    assert agent.cli("deny", "list", json_out=True)["entries"][0]["expires"] == 0
    r = agent.cli("deny", "remove", "203.0.113.0/24", "--reason", "done")
    assert f"version {v0 + 2}" in r.stdout and active(agent) == v0 + 2
    assert agent.cli("deny", "list", json_out=True)["entries"] == []


def test_a_cidr_inside_an_allow_entry_is_refused_and_nothing_changes(agent, tmp_path):
    allowed = tmp_path / "allowed.yaml"
    allowed.write_text(BASE_RULES + f'canaries: ["{agent.lab.peer_ip}"]\nallow: ["192.0.2.0/24", "10.0.0.0/8"]\n')
    agent.cli("apply", str(allowed), "--reason", "an allow list")
    v0 = active(agent)
    maps0 = bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}")
    r = agent.cli("deny", "add", "192.0.2.128/25", "--reason", "inside", check=False)
    assert r.returncode == 1 and "lies inside the allow entry 192.0.2.0/24" in r.stderr, r.stderr
    assert active(agent) == v0 and agent.cli("deny", "list", json_out=True)["entries"] == []
    assert bpftool_dump(f"/sys/fs/bpf/tidegate/{agent.pin_name}") == maps0
    # beside it, not inside: a new version
    assert f"version {v0 + 1}" in agent.cli("deny", "add", "192.0.3.0/24", "--reason", "beside").stdout
