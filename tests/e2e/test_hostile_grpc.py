"""Hostile gRPC messages against a live agent: each gets a clear error
status, and afterwards the kernel maps (read through bpftool) and the store
are byte-identical."""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.labnet import VethLab
from tidegate.ruleset import RuleSetError, parse_rule_set

from .harness import AgentProc, pinned_dump

pytestmark = pytest.mark.e2e

RULES = """
defaults:
  limit: {pps: 1000, burst: 2000}
rules:
  - name: dns
    protocol: udp
    dst_ports: [53]
    limit: {pps: 100, burst: 100}
"""

OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF and network namespaces")
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "r.yaml").write_text(RULES)
    lab = VethLab(f"h{os.getpid() % 100000}", subnet="10.207.5").create()
    a = AgentProc(lab, tmp / "state")
    try:
        a.start(rules=str(tmp / "r.yaml"))
        yield a
    finally:
        a.stop()
        a.cleanup_kernel()
        lab.remove()


def _stub(agent):
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    token = [ln.split()[1] for ln in (agent.state_dir / "tokens").read_text().splitlines()
             if ln.startswith("admin ")][0]  # fmt: skip
    return pb, pbg.FilterStub(grpc.insecure_channel(agent.server)), [("authorization", f"Bearer {token}")]


def invalid(text: str) -> bool:
    try:
        parse_rule_set(text)
    except RuleSetError:
        return True
    return False


YAMLISH = st.one_of(
    st.text(max_size=300),
    st.builds(lambda n, v: RULES.replace("pps: 100", f"pps: {v}").replace("name: dns", f"name: {n}"),
              st.text(max_size=40), st.sampled_from(["-1", "0", ".nan", "1e99", "'x'", "[]", "true"])),
    st.builds(lambda depth: "rules: " + "[" * depth, st.integers(1, 5000)),
    st.builds(lambda k: RULES + f"{k}: 1\n", st.text(min_size=1, max_size=20)),
)  # fmt: skip


def test_hostile_messages_change_nothing(agent):
    pb, stub, md = _stub(agent)
    pin_dir = f"/sys/fs/bpf/tidegate/{agent.pin_name}"
    maps0 = pinned_dump(pin_dir)
    versions0 = stub.ListVersions(pb.ListVersionsRequest(limit=1000), metadata=md)
    codes = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(YAMLISH, st.text(max_size=2000), st.booleans(), st.booleans(),
           st.integers(0, 2**32 - 1), st.integers(0, 2**63), st.text(max_size=64))  # fmt: skip
    def one(text, reason, shadow, force, guard_s, version, rule):
        if not invalid(text):
            text = text + "\nrules: {"
        calls = [
            lambda: stub.ApplyRuleSet(pb.ApplyRequest(yaml=text, reason=reason, shadow=shadow, force=force,
                                                      guard_seconds=guard_s), metadata=md, timeout=10),
            lambda: stub.WhatIf(pb.RuleSetText(yaml=text), metadata=md, timeout=10),
            lambda: stub.Rollback(pb.RollbackRequest(to_version=version + 10**6, reason=reason), metadata=md,
                                  timeout=10),
            lambda: stub.GetVersion(pb.GetVersionRequest(number=version + 10**6), metadata=md, timeout=10),
            lambda: stub.UpdateThresholds(pb.UpdateThresholdsRequest(rule=rule + "\x00zz", pps=version % 7,
                                                                     reason=reason), metadata=md, timeout=10),
        ]  # fmt: skip
        for call in calls:
            try:
                call()
                raise AssertionError("a hostile message was accepted")
            except grpc.RpcError as e:
                assert e.code() in OK_CODES, (e.code(), e.details())
                assert e.details()
                codes.append(e.code())

    one()
    assert len(codes) >= 1500
    assert pinned_dump(pin_dir) == maps0
    assert stub.ListVersions(pb.ListVersionsRequest(limit=1000), metadata=md) == versions0
