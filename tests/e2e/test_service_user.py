"""The agent as an unprivileged service user with exactly the capabilities of
the shipped unit (tidegate.daemon.privileges.AGENT_NEEDS), started through setpriv:
it loads, attaches and drops a flood; a restart adopts the running program;
one capability fewer is a clear start-up error that attaches nothing."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from fixtures import rule_set
from tidegate.daemon.privileges import AGENT_NEEDS, CAPABILITIES

from .conftest import Agent, new_lab, send, xdp_prog_id

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

USER = "nobody"
RULES = rule_set("sink-20pps")


def setpriv_caps(names) -> str:
    return ",".join(["-all"] + ["+" + n.removeprefix("CAP_").lower() for n in names])


class ServiceAgent(Agent):
    """The e2e Agent, run as USER with `caps` as its inheritable, ambient and
    bounding sets (nothing it could gain later)."""

    caps: tuple[str, ...] = AGENT_NEEDS

    def argv(self) -> list[str]:
        c = setpriv_caps(self.caps)
        return ["setpriv", "--reuid", USER, "--regid", str(pwd.getpwnam(USER).pw_gid), "--clear-groups",
                "--inh-caps", c, "--ambient-caps", c, "--bounding-set", c, *super().argv()]  # fmt: skip


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.fixture
def service_agent():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("needs root and setpriv (util-linux): run make test as root")
    # not under pytest's tmp dir: that is root's alone (0700), and the service user needs a way in
    tmp_path = Path(tempfile.mkdtemp(prefix="tidegate-svc-"))
    tmp_path.chmod(0o755)
    lab = new_lab("svc")
    pw = pwd.getpwnam(USER)
    (tmp_path / "state").mkdir(mode=0o700)
    os.chown(tmp_path / "state", pw.pw_uid, pw.pw_gid)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    rules.chmod(0o644)
    agent = ServiceAgent(lab, tmp_path, rules=str(rules))
    # what the unit's ExecStartPre does: the interface's pin directory belongs to the service user
    os.makedirs(agent.pin_dir, mode=0o700, exist_ok=True)
    os.chown(agent.pin_dir, pw.pw_uid, pw.pw_gid)
    yield agent
    agent.stop()
    try:
        agent.cleanup_kernel()
    finally:
        lab.remove()
        shutil.rmtree(tmp_path)


def test_agent_filters_traffic_as_a_service_user_with_the_unit_capabilities(service_agent):
    agent = service_agent.start()
    st = proc_status(agent.proc.pid)
    assert st["Uid"].split()[:2] == [str(pwd.getpwnam(USER).pw_uid)] * 2
    want = sum(1 << CAPABILITIES[n] for n in AGENT_NEEDS)
    assert int(st["CapEff"], 16) == want and int(st["CapBnd"], 16) == want
    prog = xdp_prog_id(agent.lab.host_if)
    assert prog is not None

    res = send(agent.lab, src=agent.lab.peer_ip, dport=9, count=300, pps=1000)
    sink = {r.rule: r for r in agent.api.GetCounters().rules}["sink"]
    assert res["sent"] == 300
    assert sink.drop_packets >= 200 and sink.pass_packets >= 20, sink

    # a restart adopts the pinned program and maps (opened by id: CAP_SYS_ADMIN) and keeps the same program
    assert agent.stop() == 0
    agent.start()
    assert xdp_prog_id(agent.lab.host_if) == prog
    assert "adopted=True" in agent.log()
    assert agent.api.GetStatus().active_version == 1

    # after `tidegate detach`: the program kept in the state dir is loaded with the unit's capabilities
    # (BPF_MAP_CREATE, BPF_PROG_LOAD, pins in the service user's pin dir), not compiled
    assert agent.stop() == 0
    agent.cleanup_kernel()
    pw = pwd.getpwnam(USER)
    os.makedirs(agent.pin_dir, mode=0o700)  # what the unit's ExecStartPre does
    os.chown(agent.pin_dir, pw.pw_uid, pw.pw_gid)
    offset = len(agent.log())
    agent.start()
    log = agent.log()[offset:]
    assert 'msg="program loaded from the cache: not compiling"' in log and "compiling the program" not in log, log
    assert xdp_prog_id(agent.lab.host_if) is not None and agent.api.GetStatus().active_version == 1
    before = {r.rule: r for r in agent.api.GetCounters().rules}["sink"].drop_packets
    send(agent.lab, src=agent.lab.peer_ip, dport=9, count=300, pps=1000)
    assert {r.rule: r for r in agent.api.GetCounters().rules}["sink"].drop_packets - before >= 200


@pytest.mark.parametrize("without", ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"])
def test_one_capability_fewer_is_a_clear_start_error(service_agent, without):
    service_agent.caps = tuple(c for c in AGENT_NEEDS if c != without)
    with pytest.raises(RuntimeError, match=f"without {without}: it needs CAP_BPF"):
        service_agent.start()
    assert service_agent.proc.returncode == 2
    assert xdp_prog_id(service_agent.lab.host_if) is None
    assert not os.listdir(service_agent.pin_dir), "nothing pinned"

