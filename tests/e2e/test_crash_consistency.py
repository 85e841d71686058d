"""SIGKILL the agent at random points of apply and rollback, 100 times.

After each restart: the kernel's active rule set and the store's active
version are the same one, no version is lost or half-written, and the XDP
program was never detached (same program id on the interface at every
check, no packet ever saw an empty configuration). The program is probed
all along: while the agent runs and changes rule sets, packets from a
network both sets deny are pushed through it and every one must be denied;
while no agent runs, probes that the two sets treat differently (each
denies a network the other passes) must be filtered by the very set the
restarted agent then reports, i.e. the last one. The test counts the kills
that landed in the middle of a change (a version recorded but not yet
active at the kill) and requires some, so it proves what it claims."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import grpc
import pytest

from tidegate.ruleset.parse import parse_rule_set

from .harness import Agent, send

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KILLS = int(os.environ.get("TIDEGATE_CRASH_KILLS", "100"))

BOTH_DENY = "198.18.99.0/24"  # the probe while the agent runs: denied by A and by B
SET_A = f"""
defaults:
  limit: {{pps: 1000, burst: 1000}}
deny: ["192.0.2.0/24", "{BOTH_DENY}"]
rules:
  - name: app
    protocol: udp
    dst_ports: [5555]
    limit: {{pps: 500, burst: 500}}
"""
# B denies 203.0.113.0/24 where A denies 192.0.2.0/24 (each passes the
# other's on app); 198.51.100.1 passes on B's allow list (reason allow) and
# on A's default (reason pass)
SET_B = f"""
defaults:
  limit: {{pps: 1000, burst: 1000}}
deny: ["203.0.113.0/24", "{BOTH_DENY}"]
allow: ["198.51.100.0/24"]
rules:
  - name: app
    protocol: udp
    dst_ports: [5555]
    limit: {{pps: 400, burst: 400}}
"""
B_PROBE = "198.51.100.1"


def frame(src: str, dport: int = 5555) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether() / IP(src=src, dst="10.0.0.1") / UDP(sport=1, dport=dport) / b"probe")


def attached_prog_id(ifname: str) -> int | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    return xdp.get_attr("IFLA_XDP_PROG_ID") if xdp else None


def rpc(agent: Agent):
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
    from tidegate.kernel import bpfsys

    def allowed() -> int:
        c = stub.GetCounters(pb.GetCountersRequest(), metadata=md)
        return {r.reason: r.packets for r in c.reasons}["allow"]

    fd = bpfsys.prog_fd_by_id(prog_id)
    try:
        before = allowed()
        bpfsys.test_run(fd, frame(B_PROBE, 7777), 1)
        return allowed() - before == 1
    finally:
        os.close(fd)


def churn(agent: Agent, stop: threading.Event, done: list, acked: list) -> None:
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


def probe_while_running(prog_id: int, stop: threading.Event, runs: list) -> None:
    """Push packets from the network both sets deny through the attached
    program (BPF_PROG_TEST_RUN) until stopped; runs records how many."""
    from tidegate.kernel import bpfsys

    fd = bpfsys.prog_fd_by_id(prog_id)
    try:
        probe = frame("198.18.99.7")
        while not stop.is_set():
            bpfsys.test_run(fd, probe, 20)
            runs.append(20)
            time.sleep(0.02)
    finally:
        os.close(fd)


RECONCILED = re.compile(r'msg="store reconciled" .*action="?([\w-]+)"? aborted="?\[([^\]]*)\]')


def test_sigkill_during_apply_and_rollback(tmp_path, make_lab):
    from tidegate.kernel import bpfsys

    (tmp_path / "a.yaml").write_text(SET_A)
    lab = make_lab("c")
    agent = Agent(lab, tmp_path, rules=str(tmp_path / "a.yaml"), extra=["--sample-interval", "30"])
    rnd = random.Random(11)
    calls = 0
    mid_change = {"recorded, not swapped": 0, "swapped, not committed": 0}
    try:
        agent.start()
        prog = agent.cli("status", json_out=True)["prog_id"]
        assert attached_prog_id(lab.host_if) == prog
        pb, stub, md = rpc(agent)
        prev = {r.reason: r.packets for r in stub.GetCounters(pb.GetCountersRequest(), metadata=md).reasons}
        acked: list[int] = []
        fd = bpfsys.prog_fd_by_id(prog)
        for n in range(KILLS):
            stop, done, runs = threading.Event(), [], []
            threads = [threading.Thread(target=churn, args=(agent, stop, done, acked)),
                       threading.Thread(target=probe_while_running, args=(prog, stop, runs))]  # fmt: skip
            for t in threads:
                t.start()
            time.sleep(rnd.uniform(0.05, 0.8))
            agent.stop(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join()
            calls += len(done)
            # no agent: still attached, the same program
            assert attached_prog_id(lab.host_if) == prog, f"kill {n}: program changed or detached"
            # probes the two sets tell apart: A denies the first, B the two others
            bpfsys.test_run(fd, frame("192.0.2.7"), 1)
            bpfsys.test_run(fd, frame("203.0.113.7"), 2)
            real = n % 10 == 0
            if real:  # and real traffic, now and then: A denies it, B passes it
                send(lab, "--src", "192.0.2.7", "--dport", "5555", "--count", "10", "--pps", "500")
            offset = len(agent.log())
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
            runs_b = kernel_runs_set_b(stub, pb, md, prog)
            assert runs_b == store_b, f"kill {n}: kernel and store disagree on the content of version {st.active_version}"
            c = stub.GetCounters(pb.GetCountersRequest(), metadata=md)
            reasons = {r.reason: r.packets for r in c.reasons}
            assert reasons["noconfig"] == 0, "a packet saw no rule set"
            # every probe while the agent ran was denied; the ones while it was away by the last set
            away = 2 if runs_b else 1 + (10 if real else 0)
            assert reasons["deny"] - prev["deny"] == sum(runs) + away, (
                f"kill {n}: {reasons['deny'] - prev['deny']} denied, {sum(runs)} probes while running + {away} "
                f"while away under set {'B' if runs_b else 'A'}")
            prev = reasons
            m = RECONCILED.search(agent.log()[offset:])
            if m and m.group(2).strip():
                mid_change["recorded, not swapped"] += 1
            elif m and m.group(1) == "followed-kernel":
                mid_change["swapped, not committed"] += 1
        os.close(fd)
        # every applied version's content is whole: it parses and matches its digest
        pb, stub, md = rpc(agent)
        for v in stub.ListVersions(pb.ListVersionsRequest(limit=100000), metadata=md).versions:
            if v.state == "applied":
                body = stub.GetVersion(pb.GetVersionRequest(number=v.number), metadata=md)
                assert parse_rule_set(body.yaml).digest() == body.info.digest
        assert calls > KILLS, f"only {calls} apply/rollback calls completed around {KILLS} kills"
        assert len(acked) > KILLS / 2
        print(f"kills in the middle of a change: {mid_change} of {KILLS}")
        assert sum(mid_change.values()) >= max(1, KILLS // 10), mid_change
    finally:
        agent.stop()
        agent.cleanup_kernel()
