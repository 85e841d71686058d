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


# Hostile documents built from the schema's own key names, so most of them
# get past the YAML layer and exercise the validator's every branch.
SCHEMA_KEYS = ["defaults", "limit", "pps", "burst", "bps", "burst_bytes", "allow", "deny", "rules", "name",
               "protocol", "dst_ports", "sources", "prefix_limit", "ipv4_prefix", "ipv6_prefix", "block_seconds",
               "action", "canaries", "description"]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["0.0.0.0/33", "10.0.0.1/8", "::/129", "fe80::1%eth0", "тест", "udp", "tcp", "any", "drop",
                     "8000-70000", "65536", "\u202e", "a" * 300, "53", "-1", ".nan"]),
)  # fmt: skip
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=8), c, max_size=4),
                      max_leaves=25)  # fmt: skip
DOCS = st.dictionaries(st.sampled_from(SCHEMA_KEYS), VALUES, min_size=1, max_size=5)


def _store_rows(state_dir) -> dict:
    """Every table of the store, read-only, but the audit log (rejections are
    audited by design: counted instead) and reviews (the agent refreshes the
    active version's review on its own schedule)."""
    import sqlite3

    con = sqlite3.connect(f"file:{state_dir / 'tidegate.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT IN ('audit', 'reviews') "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]  # fmt: skip
        rows = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
        rows["_audit_count"] = con.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        return rows
    finally:
        con.close()


def test_ten_thousand_hostile_rule_sets_change_nothing_and_are_audited(agent):
    import yaml

    pb, stub, md = _stub(agent)
    pin_dir = f"/sys/fs/bpf/tidegate/{agent.pin_name}"
    maps0 = pinned_dump(pin_dir)
    rows0 = _store_rows(agent.state_dir)
    sent = []

    @settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(DOCS)
    def one(doc):
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except Exception:
            text = repr(doc)
        if not invalid(text):
            return  # a valid rule set (rare) is not hostile input
        try:
            stub.ApplyRuleSet(pb.ApplyRequest(yaml=text, reason="hostile"), metadata=md, timeout=10)
            raise AssertionError(f"a hostile rule set was accepted:\n{text}")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details(), text)
            assert e.details()
        sent.append(1)

    one()
    assert len(sent) >= 9_000, f"only {len(sent)} of 10,000 generated documents were invalid"
    assert pinned_dump(pin_dir) == maps0, "a rejected rule set changed a kernel map"
    rows = _store_rows(agent.state_dir)
    assert rows.pop("_audit_count") - rows0.pop("_audit_count") == len(sent), "every rejection is audited"
    assert rows == rows0, "a rejected rule set changed the store"
