"""SIGKILL the agent at random points of apply and rollback, 100 times.

After each restart: the kernel's active rule set and the store's active
version are the same one, no version is lost or half-written, and the XDP
program was never detached (same program id on the interface at every
check, no packet ever saw an empty configuration, and traffic sent while
no agent ran was filtered by the last rule set)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest

from tidegate.labnet import VethLab
from tidegate.ruleset import parse_rule_set

from .harness import AgentProc, send

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KILLS = int(os.environ.get("TIDEGATE_CRASH_KILLS", "100"))

SET_A = """
defaults:
  limit: {pps: 1000, burst: 1000}
deny: ["192.0.2.0/24"]
rules:
  - name: app
    protocol: udp
    dst_ports: [5555]
    limit: {pps: 500, burst: 500}
"""
SET_B = SET_A.replace("pps: 500, burst: 500", "pps: 400, burst: 400")


def attached_prog_id(ifname: str) -> int | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    return xdp.get_attr("IFLA_XDP_PROG_ID") if xdp else None


def rpc(agent: AgentProc):
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    token = [ln.split()[1] for ln in (agent.state_dir / "tokens").read_text().splitlines()
             if ln.startswith("admin ")][0]  # fmt: skip
    md = [("authorization", f"Bearer {token}"), ("tidegate-author", "crash-test")]
    return pb, pbg.FilterStub(grpc.insecure_channel(agent.server)), md


def churn(agent: AgentProc, stop: threading.Event, done: list) -> None:
    """Apply and roll back as fast as the agent answers until killed."""
    pb, stub, md = rpc(agent)
    i = 0
    while not stop.is_set():
        try:
            if i % 3 == 2:
                stub.Rollback(pb.RollbackRequest(reason="churn"), metadata=md, timeout=5)
            else:
                stub.ApplyRuleSet(pb.ApplyRequest(yaml=SET_B if i % 2 else SET_A, reason="churn", force=True,
                                                  no_guard=True), metadata=md, timeout=5)  # fmt: skip
            done.append(i)
        except grpc.RpcError:
            if stop.is_set():
                return
            time.sleep(0.01)
        i += 1


def test_sigkill_during_apply_and_rollback(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF and network namespaces")
    (tmp_path / "a.yaml").write_text(SET_A)
    lab = VethLab(f"c{os.getpid() % 100000}", subnet="10.206.4").create()
    agent = AgentProc(lab, tmp_path / "state", extra=["--sample-interval", "30"])
    rnd = random.Random(11)
    calls = 0
    try:
        agent.start(rules=str(tmp_path / "a.yaml"))
        prog = agent.cli("status", json_out=True)["prog_id"]
        assert attached_prog_id(lab.host_if) == prog
        deny0 = None
        for n in range(KILLS):
            stop, done = threading.Event(), []
            t = threading.Thread(target=churn, args=(agent, stop, done))
            t.start()
            time.sleep(rnd.uniform(0.05, 0.8))
            agent.stop(signal.SIGKILL)
            stop.set()
            t.join()
            calls += len(done)
            # no agent: still attached, the same program
            assert attached_prog_id(lab.host_if) == prog, f"kill {n}: program changed or detached"
            probe = n % 10 == 0
            if probe:
                send(lab, "--src", "192.0.2.7", "--dport", "5555", "--count", "10", "--pps", "500")
            agent.start()
            pb, stub, md = rpc(agent)
            st = stub.GetStatus(pb.GetStatusRequest(), metadata=md)
            assert st.prog_id == prog and st.attached, f"kill {n}: {st}"
            versions = stub.ListVersions(pb.ListVersionsRequest(limit=100000), metadata=md).versions
            active = [v.number for v in versions if v.active]
            assert active == [st.active_version], f"kill {n}: store {active} vs kernel {st.active_version}"
            numbers = sorted(v.number for v in versions)
            assert numbers == list(range(1, len(numbers) + 1)), f"kill {n}: a version number is missing"
            assert all(v.state in ("applied", "aborted") for v in versions), f"kill {n}: pending left over"
            c = stub.GetCounters(pb.GetCountersRequest(), metadata=md)
            reasons = {r.reason: r.packets for r in c.reasons}
            assert reasons["noconfig"] == 0, "a packet saw no rule set"
            if probe:
                if deny0 is not None:
                    assert reasons["deny"] - deny0 >= 10, "traffic while no agent ran was not filtered"
                deny0 = reasons["deny"]
        # every applied version's content is whole: it parses and matches its digest
        pb, stub, md = rpc(agent)
        for v in stub.ListVersions(pb.ListVersionsRequest(limit=100000), metadata=md).versions:
            if v.state == "applied":
                body = stub.GetVersion(pb.GetVersionRequest(number=v.number), metadata=md)
                assert parse_rule_set(body.yaml).digest() == body.info.digest
        assert calls > KILLS, f"only {calls} apply/rollback calls completed around {KILLS} kills"
    finally:
        agent.stop()
        agent.cleanup_kernel()
        lab.remove()
