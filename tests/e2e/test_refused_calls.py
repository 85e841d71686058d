"""Refused calls against a real agent: read callers' expensive calls are
rate-limited per caller, every refusal is counted in
tidegate_api_refused_total{reason} (read from a real /metrics scrape), and
a flood of them leaves a bounded number of audit rows whose counts add up
to the calls refused. A version's guard events stay in its review however
many audit rows come after them."""

from __future__ import annotations

import sqlite3
import time

import grpc
import pytest

from tidegate.api.admission import MAX_PEERS_A_MINUTE, REASONS

from .conftest import BASE_RULES, Api

pytestmark = pytest.mark.e2e

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
BURST = 3


@pytest.fixture(scope="module")
def agent(start_agent):
    # a bucket that does not refill within the module: every count below is exact
    return start_agent("hrc", BASE_RULES, ["--read-call-rate", "0.001", "--read-call-burst", str(BURST)])


def refused(agent) -> dict[str, float]:
    m = agent.scrape()
    return {r: m.get(("tidegate_api_refused_total", (("reason", r),)), -1.0) for r in REASONS}


def audit_rows(agent, after_id: int = 0) -> list[tuple]:
    con = sqlite3.connect(f"file:{agent.state_dir / 'tidegate.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, action, result, author, peer, detail FROM audit WHERE id > ? ORDER BY id",
                           (after_id,)).fetchall()  # fmt: skip
    finally:
        con.close()


def test_expensive_read_calls_are_limited_per_caller_and_counted(agent):
    reader = Api(agent, role="read")
    try:
        m0 = refused(agent)
        assert all(v == 0 for v in m0.values()), m0  # exported from the start, every reason
        for _ in range(BURST):
            assert reader.WhatIf(yaml=BASE_RULES).within_budget
        e = reader.error("WhatIf", yaml=BASE_RULES)
        assert e.code() == RESOURCE_EXHAUSTED
        assert "rate limit: WhatIf is an expensive read call" in e.details() and "token:read" in e.details()
        # one bucket per caller, across the expensive methods
        assert reader.error("ValidateRuleSet", yaml=BASE_RULES).code() == RESOURCE_EXHAUSTED
        assert reader.error("TopSources", n=5, window_seconds=30).code() == RESOURCE_EXHAUSTED
        # cheap reads are not limited: the last interval's top sources, status, insight, counters
        for _ in range(20):
            reader.TopSources(n=5)
            reader.GetStatus()
            reader.Insight()
            reader.GetCounters()
        # admins are not limited
        for _ in range(2 * BURST):
            assert agent.api.WhatIf(yaml=BASE_RULES).within_budget
        m1 = refused(agent)
        assert m1 == {**m0, "rate-limited": m0["rate-limited"] + 3}, m1
    finally:
        reader.close()


def test_a_flood_of_refused_calls_is_audited_in_bounded_form(agent):
    """Thousands of refused calls of three reasons from one peer address:
    the metric counts each, the audit gets a few rows a minute (the first
    of each reason at once, then one summary row), and the rows' counts add
    up to every call refused since the agent started, once it has written
    its last summary (at stop)."""
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    m0 = refused(agent)
    t0 = time.time() - 60  # the module's earlier refusals are in the same rows
    sent = dict.fromkeys(REASONS, 0)
    codes = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
             "permission-denied": grpc.StatusCode.PERMISSION_DENIED, "rate-limited": RESOURCE_EXHAUSTED}
    with grpc.insecure_channel(agent.server) as ch:
        stub = pbg.FilterStub(ch)
        read = [("authorization", f"Bearer {agent.token('read')}")]
        calls = [("unauthenticated", lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=10), 3000),
                 ("permission-denied", lambda: stub.Rollback(pb.RollbackRequest(reason="x"), metadata=read,
                                                             timeout=10), 500),
                 ("rate-limited", lambda: stub.WhatIf(pb.RuleSetText(yaml=BASE_RULES), metadata=read, timeout=10),
                  500)]  # fmt: skip
        for reason, call, n in calls:
            for _ in range(n):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == codes[reason], (reason, e.value.details())
                sent[reason] += 1
    t1 = time.time()
    m1 = refused(agent)
    assert {r: m1[r] - m0[r] for r in REASONS} == sent
    # before the agent stops, the audit has the first refusal of each reason (written at once)
    early = [r for r in audit_rows(agent) if r[1] in ("auth-denied", "call-refused")]
    assert {r[2] for r in early} == set(codes)
    assert all(r[4].startswith("ipv4:127.0.0.1") for r in early)
    agent.stop()
    try:
        rows = [r for r in audit_rows(agent) if r[1] in ("auth-denied", "call-refused", "refused-calls")]
        minutes = int(t1 // 60) - int(t0 // 60) + 1
        # one peer address, three reasons: a first row and a summary row each a minute
        assert len(rows) <= 2 * len(codes) * minutes, rows
        assert len(rows) < sum(sent.values()) / 100
        counted = dict.fromkeys(REASONS, 0)
        for _, _, result, _, _, detail in rows:
            more = detail.split(" more refused call(s) in the minute from ")
            counted[result] += int(more[0]) if len(more) == 2 else 1
        assert counted == m1, rows
        summary = [r for r in rows if "more refused call(s)" in r[5] and r[2] == "unauthenticated"]
        assert summary and "GetStatus x" in summary[0][5] and summary[0][4] == "ipv4:127.0.0.1"
        assert len(codes) < MAX_PEERS_A_MINUTE  # no overflow row here: that case is in tests/unit
    finally:
        agent.start()


def test_guard_events_stay_in_the_review_after_a_burst_of_audit_rows(agent):
    """The review of a guarded version lists the guard's audit rows even
    when hundreds of other rows were written after them (it used to read
    only the last 200 rows)."""
    api = agent.api
    out = api.ApplyRuleSet(yaml=BASE_RULES.replace("pps: 1000, burst: 2000", "pps: 1001, burst: 2000"),
                           reason="guarded", guard=True, guard_seconds=2, wait_for_guard=True, force=True)
    assert out.guarded and out.guard_outcome == "kept", out
    guard = [{"action": g.action, "result": g.result, "detail": g.detail} for g in api.GetReview(version=out.version).guard]
    assert guard == [{"action": "guard", "result": "ok", "detail": "kept after 2s"}]
    for i in range(300):  # rejected applies: each one an audit row of its own (an admin's change)
        assert api.error("ApplyRuleSet", yaml=f"rules: [{i}]\n", reason="noise").code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(api.ListAudit(limit=1000).entries) > 300
    review = api.GetReview(version=out.version)
    assert [{"action": g.action, "result": g.result, "detail": g.detail} for g in review.guard] == guard, review.guard
    api.ApplyRuleSet(yaml=BASE_RULES, reason="back to base", force=True)
