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
# B differs from A where a crafted probe can tell: 198.51.100.1 passes on
# B's allow list (reason allow) and on A's default (reason pass)
SET_B = SET_A.replace("pps: 500, burst: 500", "pps: 400, burst: 400").replace(
    'deny: ["192.0.2.0/24"]', 'deny: ["192.0.2.0/24"]\nallow: ["198.51.100.0/24"]')
B_PROBE = "198.51.100.1"


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


def kernel_runs_set_b(stub, pb, md, prog_id: int) -> bool:
    """Which rule set the attached program enforces, asked of the program
    itself: one crafted packet through BPF_PROG_TEST_RUN, and the reason
    counter it moved."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from tidegate import bpfsys

    def allowed() -> int:
        c = stub.GetCounters(pb.GetCountersRequest(), metadata=md)
        return {r.reason: r.packets for r in c.reasons}["allow"]

    frame = bytes(Ether() / IP(src=B_PROBE, dst="10.0.0.1") / UDP(sport=1, dport=7777) / b"probe")
    fd = bpfsys.prog_fd_by_id(prog_id)
    try:
        before = allowed()
        bpfsys.test_run(fd, frame, 1)
        return allowed() - before == 1
    finally:
        os.close(fd)


def churn(agent: AgentProc, stop: threading.Event, done: list, acked: list) -> None:
    """Apply and roll back as fast as the agent answers until killed."""
    pb, stub, md = rpc(agent)
    i = 0
    while not stop.is_set():
        try:
            if i % 3 == 2:
                stub.Rollback(pb.RollbackRequest(reason="churn"), metadata=md, timeout=5)
            else:
                r = stub.ApplyRuleSet(pb.ApplyRequest(yaml=SET_B if i % 2 else SET_A, reason="churn", force=True,
                                                      no_guard=True), metadata=md, timeout=5)  # fmt: skip
                acked.append(r.version)
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
        acked: list[int] = []
        for n in range(KILLS):
            stop, done = threading.Event(), []
            t = threading.Thread(target=churn, args=(agent, stop, done, acked))
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
            state = {v.number: v.state for v in versions}
            lost = [a for a in acked if state.get(a) != "applied"]
            assert not lost, f"kill {n}: acknowledged applies {lost} are not kept as applied"
            # the kernel enforces the content of the version the store calls active
            body = stub.GetVersion(pb.GetVersionRequest(number=st.active_version), metadata=md).yaml
            store_b = "198.51.100.0/24" in body
            assert kernel_runs_set_b(stub, pb, md, prog) == store_b, (
                f"kill {n}: kernel and store disagree on the content of version {st.active_version}")
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
        assert len(acked) > KILLS / 2
    finally:
        agent.stop()
        agent.cleanup_kernel()
        lab.remove()
