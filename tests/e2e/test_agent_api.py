"""The agent and its gRPC API, end to end: a real agent subprocess, a real
gRPC channel on loopback and real XDP on a veth pair whose peer sends
crafted frames from a namespace.

One agent serves the whole module. It starts without a rule set (so the
first test sees it unattached), the `base` fixture applies BASE once, and
every later test leaves BASE active again. Traffic is bounded and far from
the limits it is meant to pass (20 packets at 200 pps against 500 pps with a
burst of 500), so each count is exact.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import grpc
import pytest

from tidegate.ruleset.parse import parse_rule_set

from .conftest import BASE_RULES
from .conftest import AUTHOR, BIN, PIN_ROOT, Api, bpftool_dump, finish, free_port, send, xdp_prog_id

# the audit's author: the authenticated principal, with the name the client claims beside it
RECORDED = f"token:admin (as {AUTHOR})"

pytestmark = pytest.mark.e2e

BASE = BASE_RULES

DROP_APP = BASE.replace("    limit: {pps: 500, burst: 500}", "    action: drop")

INVALID = """\
rules:
  - name: app
    limit: {pps: -1}
"""

OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION = (
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)  # fmt: skip


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("api")


@pytest.fixture
def base(agent):
    """BASE is the active rule set (applied once, restored after each test)."""
    api = agent.api
    versions = api.ListVersions(limit=1000).versions
    base_v = next((v.number for v in versions if v.reason == "base for the API tests"), None)
    if base_v is None:
        base_v = api.ApplyRuleSet(yaml=BASE, source="base.yaml", reason="base for the API tests").version
    elif api.GetStatus().active_version != base_v:
        api.Rollback(to_version=base_v, reason="back to base")
    yield base_v
    api = agent.api  # a new channel when the test restarted the agent
    if api.GetStatus().active_version != base_v:
        api.Rollback(to_version=base_v, reason="back to base after the test")


def app_counts(api) -> tuple[int, int]:
    for r in api.GetCounters().rules:
        if r.rule == "app":
            return r.pass_packets, r.drop_packets
    return 0, 0


def legit(agent, n: int = 20) -> None:
    res = send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=n, pps=200)
    assert res["sent"] == n


def app_delta(agent, n: int = 20) -> tuple[int, int]:
    """Send n app packets; return how many the filter passed and dropped."""
    p0, d0 = app_counts(agent.api)
    legit(agent, n)
    p1, d1 = app_counts(agent.api)
    return p1 - p0, d1 - d0


def test_starts_unattached_without_a_rule_set_and_attaches_on_first_apply(start_agent):
    agent = start_agent("una")  # its own agent: the module's shared one may have a rule set already
    api = agent.api
    st = api.GetStatus()
    assert (st.attached, st.active_version, st.shadow_version, st.xdp_mode) == (False, 0, 0, "")
    assert st.interface == agent.lab.host_if and st.agent_version and st.uptime_seconds > 0
    assert xdp_prog_id(agent.lab.host_if) is None, "never attached with no rule set loaded"
    assert "not attached until the first apply" in agent.log()

    for method, fields in (("GetCounters", {}), ("TopSources", {"n": 5}), ("WhatIf", {"yaml": BASE}),
                           ("UpdateThresholds", {"rule": "app", "pps": 5, "reason": "r"}),
                           ("Rollback", {"reason": "r"}), ("ShadowReport", {})):  # fmt: skip
        err = api.error(method, **fields)
        assert err.code() == FAILED_PRECONDITION, (method, err)
    with pytest.raises(grpc.RpcError) as e:
        list(api.WatchCounters(interval_ms=100, max_updates=1))
    assert e.value.code() == FAILED_PRECONDITION
    m = agent.scrape()
    assert (m[("tidegate_attached", ())], m[("tidegate_agent_up", ())], m[("tidegate_active_version", ())]) == (0, 1, 0)

    r = api.ApplyRuleSet(yaml=BASE, source="base.yaml", reason="base for the API tests")
    assert r.version == 1 and not r.shadow
    st = api.GetStatus()
    assert st.attached and st.active_version == 1 and st.xdp_mode in ("native", "generic")
    assert xdp_prog_id(agent.lab.host_if) == st.prog_id
    assert app_delta(agent) == (20, 0)


def test_health_and_reflection(agent, base):
    """SERVING with a rule set attached (test_agent_start.py: NOT_SERVING while detached)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(agent.api.channel)
    for service in ("tidegate.v1.Filter", ""):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(agent.api.channel)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="tidegate.v1.Filter")]  # fmt: skip
    list_resp, file_resp = list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in list_resp.list_services_response.service}
    assert {"tidegate.v1.Filter", "grpc.health.v1.Health"} <= names
    assert file_resp.file_descriptor_response.file_descriptor_proto, "the .proto is served for grpcurl"


def test_apply_and_rollback_change_what_traffic_gets(agent, base):
    api = agent.api
    assert app_delta(agent) == (20, 0)
    n_versions = len(api.ListVersions(limit=1000).versions)

    v_drop = api.ApplyRuleSet(yaml=DROP_APP, source="drop-app.yaml", reason="block app", force=True).version
    assert v_drop > base and api.GetStatus().active_version == v_drop
    assert app_delta(agent) == (0, 20), "the new set drops app traffic"

    r = api.Rollback(reason="too tight")
    assert r.version == base, "rollback re-activates the previous version under its own number"
    assert api.GetStatus().active_version == base
    assert app_delta(agent) == (20, 0), "the old set is back"

    r = api.Rollback(to_version=v_drop, reason="block it again")
    assert r.version == v_drop and app_delta(agent) == (0, 20)
    api.Rollback(to_version=base, reason="restore")
    assert app_delta(agent) == (20, 0)

    versions = {v.number: v for v in api.ListVersions(limit=1000).versions}
    assert len(versions) == n_versions + 1, "rollbacks create no versions"
    assert (versions[v_drop].author, versions[v_drop].reason, versions[v_drop].source) == (RECORDED, "block app",
                                                                                             "apply")  # fmt: skip
    assert versions[v_drop].activations == 2 and not versions[v_drop].active
    assert versions[base].active and versions[base].state == "applied"
    stored = api.GetVersion(number=v_drop)
    assert stored.info.number == v_drop and stored.info.created
    assert parse_rule_set(stored.yaml).digest() == api.ValidateRuleSet(yaml=DROP_APP).digest == stored.info.digest
    audit = api.ListAudit(limit=20, action="rollback").entries
    assert [a.version for a in audit[:3]] == [base, v_drop, base]
    assert {a.author for a in audit[:3]} == {RECORDED} and all(a.peer.startswith("ipv4:127.0.0.1") for a in audit[:3])


def test_update_thresholds_creates_a_version(agent, base):
    api = agent.api
    r = api.UpdateThresholds(rule="app", pps=20, burst=20, reason="tighten app", force=True)
    assert r.version > base and api.GetStatus().active_version == r.version
    rs = parse_rule_set(api.GetVersion(number=r.version).yaml)
    assert (rs.rule("app").limit.pps, rs.rule("app").limit.burst) == (20, 20)
    assert rs.rule("sink").limit.pps == 1000, "other rules keep their limits"
    info = {v.number: v for v in api.ListVersions(limit=1000).versions}[r.version]
    assert (info.author, info.reason, info.source) == (RECORDED, "tighten app", "set-limit")
    # 200 packets at (asked for) 400 pps from one source against 20 pps with a burst of 20: the burst and
    # 20 pps for as long as the sender took pass (one more for the 4 ms clock)
    p0, d0 = app_counts(api)
    res = send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=200, pps=400)
    p1, d1 = app_counts(api)
    assert p1 - p0 + d1 - d0 == 200
    assert 20 <= p1 - p0 <= 20 + 20 * (res["seconds"] + 0.004) + 1, (p1 - p0, d1 - d0, res)

    r2 = api.UpdateThresholds(rule="default", pps=300, reason="default limit", force=True)
    rs2 = parse_rule_set(api.GetVersion(number=r2.version).yaml)
    assert (rs2.defaults.limit.pps, rs2.defaults.limit.burst) == (300, 300)
    assert rs2.rule("app").limit.pps == 20 and rs2.rule("sink").limit.pps == 1000

    assert api.error("UpdateThresholds", rule="nosuch", pps=5, reason="x").code() == NOT_FOUND
    assert api.error("UpdateThresholds", rule="app", pps=0, reason="x").code() == INVALID_ARGUMENT
    assert api.error("UpdateThresholds", rule="", pps=5, reason="x").code() == INVALID_ARGUMENT
    assert api.error("UpdateThresholds", rule="app", pps=5, reason="").code() == INVALID_ARGUMENT


def test_top_sources_and_watch(agent, base):
    api = agent.api
    # 100 pps for 3 s from the peer; the agent samples every second
    fresh = "198.51.100.78"  # a source of its own: its entry (and first-seen time) is this flow's
    bg = send(agent.lab, src=fresh, dport=5555, count=300, pps=100, wait=False)
    deadline = time.monotonic() + 20
    while True:  # until the last sample interval lies wholly inside the peer's traffic, and the window is wider
        top = api.TopSources(n=5, by="packets")
        wide = api.TopSources(n=5, by="packets", window_seconds=60)
        mine = [s for s in top.sources if s.address == fresh]
        if (mine and mine[0].first_seen_seconds_ago >= 2 * top.interval_seconds + 0.3
                and wide.interval_seconds > top.interval_seconds):
            break
        assert time.monotonic() < deadline, (top, wide)
        time.sleep(0.2)
    res = finish(bg)
    rate = res["sent"] / res["seconds"]  # what the sender reached, not what it was asked for
    assert mine[0].rule == "app" and 0.5 * rate <= mine[0].pps <= 1.5 * rate and mine[0].drops == 0, (mine, res)
    assert 0.5 <= top.interval_seconds <= 2.5 and top.tracked_sources >= 1
    wmine = [s for s in wide.sources if s.address == fresh][0]
    assert wide.interval_seconds > top.interval_seconds and wmine.packets >= mine[0].packets
    assert all(s.drops > 0 for s in api.TopSources(n=5, by="drops").sources)
    st = api.GetStatus()
    assert st.tracked_sources >= 1 and 0 <= st.sample_age_seconds < 3

    updates = list(api.WatchCounters(interval_ms=200, max_updates=3))
    assert len(updates) == 3
    assert updates[0].time < updates[1].time < updates[2].time
    assert updates[0].packets <= updates[1].packets <= updates[2].packets
    assert {u.active_version for u in updates} == {base}
    assert {r.rule for r in updates[-1].rules} >= {"app", "sink"}


def test_error_paths(agent, base):
    api = agent.api
    # INVALID_ARGUMENT, each field error in the trailer and in the message
    err = api.error("ApplyRuleSet", yaml=INVALID, source="bad.yaml", reason="r")
    assert err.code() == INVALID_ARGUMENT
    v = api.violations(err)
    assert [(x.path, x.line) for x in v] == [("rules[0].limit.pps", 3)] and v[0].message
    assert "bad.yaml:3: rules[0].limit.pps" in err.details()
    err = api.error("ApplyRuleSet", yaml="rules: [\n", source="broken.yaml", reason="r")
    assert err.code() == INVALID_ARGUMENT and api.violations(err)[0].line >= 1
    for method, fields, path in (("ApplyRuleSet", {"yaml": BASE, "reason": "  "}, "reason"),
                                 ("Rollback", {"to_version": base, "reason": ""}, "reason")):  # fmt: skip
        err = api.error(method, **fields)
        assert err.code() == INVALID_ARGUMENT and [x.path for x in api.violations(err)] == [path], method
    assert api.error("WhatIf", yaml=INVALID).code() == INVALID_ARGUMENT
    assert api.error("TopSources", by="bytes").code() == INVALID_ARGUMENT
    assert api.error("TopSources", window_seconds=-1).code() == INVALID_ARGUMENT
    # validation is a query: an invalid set is an answer, not an error
    bad = api.ValidateRuleSet(yaml=INVALID, source="bad.yaml")
    assert not bad.valid and [(x.path, x.line) for x in bad.violations] == [("rules[0].limit.pps", 3)]
    good = api.ValidateRuleSet(yaml=BASE)
    assert good.valid and good.rules == 2 and len(good.digest) >= 16
    # NOT_FOUND
    for method, fields in (("GetVersion", {"number": 999}), ("Rollback", {"to_version": 999, "reason": "x"}),
                           ("GetReview", {"version": 999}),
                           ("UpdateThresholds", {"rule": "nosuch", "pps": 5, "reason": "x"})):  # fmt: skip
        assert api.error(method, **fields).code() == NOT_FOUND, method
    # FAILED_PRECONDITION: no shadow loaded, already active
    for method, fields in (("PromoteShadow", {"reason": "x"}), ("ClearShadow", {"reason": "x"}),
                           ("ShadowReport", {}), ("TopSources", {"shadow": True}),
                           ("Rollback", {"to_version": base, "reason": "x"})):  # fmt: skip
        assert api.error(method, **fields).code() == FAILED_PRECONDITION, method


def _store_rows(agent) -> list:
    db = sqlite3.connect(f"file:{agent.state_dir / 'tidegate.db'}?mode=ro", uri=True, timeout=10)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        rows = [(t, db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()) for t in tables
                if t not in ("audit", "reviews")]  # fmt: skip
        # the audit log grows by design (rejections are written to it) and the active version's
        # review is rewritten once a minute on its own schedule; everything else must not change
        return [(t, [r for r in rs if not (t == "sqlite_sequence" and r[0] == "audit")]) for t, rs in rows]
    finally:
        db.close()


def test_rejected_inputs_leave_kernel_and_store_unchanged(agent, base):
    api = agent.api
    maps0 = bpftool_dump(agent.pin_dir)
    rows0 = _store_rows(agent)
    versions0 = api.ListVersions(limit=1000)
    status0 = api.GetStatus()
    rejected0 = len(api.ListAudit(limit=1000, action="rejected-apply").entries)
    dup_keys = BASE.replace("    limit: {pps: 500, burst: 500}", "    limit: {pps: 500, burst: 500}\n    limit: {pps: 1}")
    too_many = "rules:\n" + "".join(f"  - name: r{i}\n    protocol: udp\n    dst_ports: [{1000 + i}]\n"
                                    for i in range(70))  # fmt: skip
    bad_applies = [
        "rules: [\n", INVALID, "rules:\n  - name: x\n    dst_ports: [70000]\n", "deny: ['10.0.0.0/33']\n",
        "defaults:\n  limit: {pps: .nan}\n", "rules:\n  - name: 'bad name!'\n", dup_keys, too_many, "- 1\n- 2\n",
        "\x00\x01binary", "defaults:\n  limit: {pps: 1e30}\n",
    ]  # fmt: skip
    for text in bad_applies:
        err = api.error("ApplyRuleSet", yaml=text, reason="hostile")
        assert err.code() == INVALID_ARGUMENT and api.violations(err), (text[:40], err.details())
    assert api.error("ApplyRuleSet", yaml=BASE.replace("1000, burst: 1000", "2000, burst: 2000"),
                     reason="").code() == INVALID_ARGUMENT  # fmt: skip
    assert api.error("ApplyRuleSet", yaml=INVALID, reason="x", shadow=True).code() == INVALID_ARGUMENT
    assert api.error("Rollback", to_version=10**6, reason="x").code() == NOT_FOUND
    assert api.error("UpdateThresholds", rule="nosuch", pps=1, reason="x").code() == NOT_FOUND
    assert api.error("PromoteShadow", reason="x").code() == FAILED_PRECONDITION

    assert bpftool_dump(agent.pin_dir) == maps0, "the pinned rule-set maps are byte-identical"
    assert _store_rows(agent) == rows0, "the store's versions and activations are unchanged"
    assert api.ListVersions(limit=1000) == versions0
    st = api.GetStatus()
    assert (st.active_version, st.shadow_version, st.prog_id) == (status0.active_version, status0.shadow_version,
                                                                  status0.prog_id)  # fmt: skip
    rejected = api.ListAudit(limit=1000, action="rejected-apply").entries
    assert len(rejected) == rejected0 + len(bad_applies) + 2, "every rejected apply is audited"
    assert rejected[0].author == RECORDED and rejected[0].result == "rejected"
    assert app_delta(agent) == (20, 0)


# The roles, written out here rather than read from the agent: a method the
# agent counted as a read method by mistake must fail this test.
ADMIN_CALLS = {  # each call would succeed, and change something, with the admin role
    "ApplyRuleSet": {"yaml": BASE.replace("pps: 500, burst: 500", "pps: 600, burst: 600"), "reason": "r"},
    "Rollback": {"reason": "r"},
    "UpdateThresholds": {"rule": "app", "pps": 600, "reason": "r"},
    "PromoteShadow": {"reason": "r"},
    "ClearShadow": {"reason": "r"},
}
READ_CALLS = {
    "GetStatus": {}, "ValidateRuleSet": {"yaml": BASE}, "ListVersions": {"limit": 5}, "GetVersion": {"number": 1},
    "GetCounters": {}, "TopSources": {"n": 5}, "ShadowReport": {}, "WhatIf": {"yaml": BASE}, "GetReview": {"version": 1},
    "ListAudit": {"limit": 5}, "Insight": {},
}  # fmt: skip


# and the Blocklist service's
DENY_ADMIN_CALLS = {"DenyAdd": {"cidr": "203.0.113.0/24", "reason": "r"}, "DenyRemove": {"cidr": "192.0.2.0/24",
                                                                                        "reason": "r"}}  # fmt: skip
DENY_READ_CALLS = {"DenyList": {}}


def refused(agent) -> dict:
    return {dict(k[1])["reason"]: v for k, v in agent.scrape().items() if k[0] == "tidegate_api_refused_total"}


def test_every_admin_method_needs_the_admin_role_and_every_method_credentials(agent, base):
    from tidegate.v1 import blocklist_pb2 as bpb
    from tidegate.v1 import blocklist_pb2_grpc as bpbg
    from tidegate.v1 import tidegate_pb2 as pb

    api = agent.api
    methods = set(pb.DESCRIPTOR.services_by_name["Filter"].methods_by_name)
    assert methods == set(ADMIN_CALLS) | set(READ_CALLS) | {"WatchCounters"}, "every method has a role here"
    deny_methods = set(bpb.DESCRIPTOR.services_by_name["Blocklist"].methods_by_name)
    assert deny_methods == set(DENY_ADMIN_CALLS) | set(DENY_READ_CALLS)
    shadow_v = api.ApplyRuleSet(yaml=BASE.replace("pps: 500, burst: 500", "pps: 5, burst: 5"), reason="a shadow",
                                shadow=True).version  # fmt: skip
    try:
        reader = Api(agent, role="read")
        nobody = Api(agent, role="none")  # no such role in the token file: no authorization header
        forged = Api(agent, role="none")
        admin_token = agent.token("admin")  # forged: the admin token with its last character changed
        forged.md.append(("authorization", "Bearer " + admin_token[:-1] + ("y" if admin_token.endswith("x") else "x")))

        def deny_call(client, method, fields):
            stub = bpbg.BlocklistStub(client.channel)
            req = getattr(bpb, f"{method}Request")(**fields)
            return getattr(stub, method)(req, metadata=client.md, timeout=60)

        def deny_error(client, method, fields) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as e:
                deny_call(client, method, fields)
            return e.value

        maps0, rows0 = bpftool_dump(agent.pin_dir), _store_rows(agent)
        refused0 = refused(agent)
        for method, fields in ADMIN_CALLS.items():
            err = reader.error(method, **fields)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.code(), err.details())
            assert f"{method} needs the admin role; token:read has read" in err.details()
        for method, fields in DENY_ADMIN_CALLS.items():
            err = deny_error(reader, method, fields)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.code(), err.details())
        for method, fields in READ_CALLS.items():
            getattr(reader, method)(**fields)  # the read role reads
        deny_call(reader, "DenyList", {})
        assert len(list(reader.WatchCounters(interval_ms=100, max_updates=1))) == 1
        for client in (nobody, forged):
            for method, fields in {**ADMIN_CALLS, **READ_CALLS}.items():
                assert client.error(method, **fields).code() == grpc.StatusCode.UNAUTHENTICATED, method
            for method, fields in {**DENY_ADMIN_CALLS, **DENY_READ_CALLS}.items():
                assert deny_error(client, method, fields).code() == grpc.StatusCode.UNAUTHENTICATED, method
            with pytest.raises(grpc.RpcError) as e:
                list(client.WatchCounters(interval_ms=100, max_updates=1))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert bpftool_dump(agent.pin_dir) == maps0 and _store_rows(agent) == rows0, "refused calls changed nothing"
        st = api.GetStatus()
        assert (st.active_version, st.shadow_version) == (base, shadow_v)
        r = refused(agent)
        admin_n = len(ADMIN_CALLS) + len(DENY_ADMIN_CALLS)
        every_n = admin_n + len(READ_CALLS) + len(DENY_READ_CALLS) + 1
        assert r.get("permission-denied", 0) - refused0.get("permission-denied", 0) == admin_n
        assert r.get("unauthenticated", 0) - refused0.get("unauthenticated", 0) == 2 * every_n
        for c in (reader, nobody, forged):
            c.close()
    finally:
        api.ClearShadow(reason="done")


def test_a_blast_radius_refusal_changes_nothing(agent, base):
    """Refused for the traffic it would drop: FAILED_PRECONDITION with the
    estimate, the kernel maps and the store's versions as they were, and
    the refusal audited."""
    from tidegate.v1 import tidegate_pb2 as pb

    api = agent.api
    drop_app = BASE.replace("    limit: {pps: 500, burst: 500}", "    action: drop")
    # the sampler must have seen app traffic (it samples every second here)
    deadline = time.monotonic() + 20
    while api.WhatIf(yaml=drop_app).sources_newly_dropped < 1:
        assert time.monotonic() < deadline, "the agent never saw the app traffic"
        legit(agent, 40)
    maps0, rows0 = bpftool_dump(agent.pin_dir), _store_rows(agent)
    versions0 = api.ListVersions(limit=1000)
    rejected0 = len(api.ListAudit(limit=1000, action="rejected-apply").entries)
    err = api.error("ApplyRuleSet", yaml=drop_app, reason="drop app, unforced")
    assert err.code() == FAILED_PRECONDITION and "refused by the blast-radius check" in err.details()
    est = pb.Estimate.FromString(dict(err.trailing_metadata())["tidegate-estimate-bin"])
    assert not est.within_budget and est.sources_newly_dropped >= 1 and est.rules[0].rule == "app"
    assert bpftool_dump(agent.pin_dir) == maps0, "the kernel maps are as they were"
    assert _store_rows(agent) == rows0 and api.ListVersions(limit=1000) == versions0, "no version was recorded"
    assert api.GetStatus().active_version == base
    rejected = api.ListAudit(limit=1000, action="rejected-apply").entries
    assert len(rejected) == rejected0 + 1 and "blast-radius" in rejected[0].detail
    assert app_delta(agent) == (20, 0)


def test_a_failed_start_after_adopting_leaves_the_filter_attached(agent, base, tmp_path):
    """A start that adopted the running program and then failed (here: it
    cannot serve, the role map is missing) must not detach what it adopted:
    the filter keeps running the last rule set while no agent runs."""
    from tidegate.access.certs import make_lab_pki

    prog = xdp_prog_id(agent.lab.host_if)
    assert prog == agent.api.GetStatus().prog_id
    # the kernel's per-reason counters (per-rule ones of retired slots live in the agent that harvested them)
    pass0 = dict((r.reason, r.packets) for r in agent.api.GetCounters().reasons)["pass"]
    pki = tmp_path / "pki"
    make_lab_pki(pki, "localhost", ["alice"])
    agent.stop()
    try:
        r = _agent_cmd(*agent.argv()[2:], "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                       "--tls-client-ca", str(pki / "ca.pem"), "--role-map", str(tmp_path / "missing-roles.json"))  # fmt: skip
        assert r.returncode != 0 and "missing-roles.json" in r.stderr, r.stderr
        assert "adopted=True" in r.stderr, "this start adopted the attached program before it failed"
        assert xdp_prog_id(agent.lab.host_if) == prog, "the adopted program is still attached"
        assert os.path.exists(f"{agent.pin_dir}/tg_ctl"), "and its maps are still pinned"
        legit(agent, 20)  # no agent runs: the program filters (and counts) with the last rule set
    finally:
        agent.start()
    st = agent.api.GetStatus()
    assert (st.prog_id, st.active_version, st.attached) == (prog, base, True)
    passed = dict((r.reason, r.packets) for r in agent.api.GetCounters().reasons)["pass"] - pass0
    assert passed >= 20, "the app packets sent meanwhile went through the filter"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_adopts_the_attached_program(agent, base, sig):
    api = agent.api
    v_drop = api.ApplyRuleSet(yaml=DROP_APP, source="drop-app.yaml", reason=f"before {sig.name}", force=True).version
    prog = xdp_prog_id(agent.lab.host_if)
    assert prog == api.GetStatus().prog_id
    deny0 = dict((r.reason, r.packets) for r in api.GetCounters().reasons)["deny"]

    agent.stop(sig)
    # no agent: the program keeps filtering with the last rule set
    assert xdp_prog_id(agent.lab.host_if) == prog
    legit(agent, 20)
    agent.start()

    st = agent.api.GetStatus()
    assert (st.active_version, st.prog_id, st.attached) == (v_drop, prog, True), "adopted, never re-attached"
    assert xdp_prog_id(agent.lab.host_if) == prog
    deny1 = dict((r.reason, r.packets) for r in agent.api.GetCounters().reasons)["deny"]
    assert deny1 - deny0 == 20, "packets sent while no agent ran were dropped by the last rule set"
    assert agent.api.ListVersions(limit=1).versions[0].number == v_drop
    assert app_delta(agent) == (0, 20)
    last_start = agent.log().rsplit('msg="program ready"', 1)[1]
    assert "adopted=True" in last_start.splitlines()[0]


def _agent_cmd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), "agent", *args], capture_output=True, text=True, timeout=timeout)


def test_bad_starts_leave_nothing_behind(agent, base, make_lab, tmp_path):
    from tidegate.access.certs import make_lab_pki

    lab = make_lab("bad")
    pin = f"e2e-{lab.tag}"
    common = ["--pin-name", pin, "--metrics-listen", "off"]
    (tmp_path / "rules.yaml").write_text(BASE)
    (tmp_path / "invalid.yaml").write_text(INVALID)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tidegate.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    (tmp_path / "fake.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    pki = tmp_path / "pki"
    make_lab_pki(pki, "localhost", ["alice"])
    state = str(tmp_path / "state")
    free = f"127.0.0.1:{free_port()}"
    cases = [
        (["--interface", "nosuchif0", "--listen", free, "--state-dir", state], "does not exist"),
        (["--interface", lab.host_if, "--listen", agent.server, "--state-dir", state], "is not available"),
        (["--interface", lab.host_if, "--listen", free, "--metrics-listen", f"127.0.0.1:{agent.metrics_port}",
          "--state-dir", state], "metrics address"),
        (["--interface", lab.host_if, "--listen", f"{lab.host_ip}:50999", "--state-dir", state], "without TLS"),
        (["--interface", lab.host_if, "--listen", "0.0.0.0:50999", "--state-dir", state], "without TLS"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", state, "--tls-cert", "x.pem"], "together"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", state, "--tls-cert", "/nonexistent.pem",
          "--tls-key", "/nonexistent.key", "--tls-client-ca", "/nonexistent.ca"], "cannot read --tls-key"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", str(tmp_path / "a-file")], "state dir"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", str(tmp_path / "corrupt")], "is damaged"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", state, "--rules",
          str(tmp_path / "invalid.yaml")], "invalid.yaml:3: rules[0].limit.pps"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", state, "--rules",
          str(tmp_path / "missing.yaml")], "missing.yaml"),
        # --insecure gets past the TLS rule (and says so loudly); the interface check then stops it
        (["--interface", "nosuchif0", "--listen", "0.0.0.0:50999", "--insecure", "--state-dir", state],
         "does not exist"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", state, "--tls-cert", str(tmp_path / "fake.pem"),
          "--tls-key", str(tmp_path / "fake.pem"), "--tls-client-ca", str(tmp_path / "fake.pem")], "not a usable"),
        (["--interface", lab.host_if, "--listen", free, "--state-dir", state, "--tls-cert", str(pki / "server.pem"),
          "--tls-key", str(pki / "alice.key"), "--tls-client-ca", str(pki / "ca.pem")], "matching key"),
        # compiles, writes the rule set, attaches, then cannot serve (the role map is missing): all undone
        (["--interface", lab.host_if, "--listen", free, "--state-dir", str(tmp_path / "tls-state"), "--rules",
          str(tmp_path / "rules.yaml"), "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
          "--tls-client-ca", str(pki / "ca.pem"), "--role-map", str(tmp_path / "missing-roles.json")],
         "missing-roles.json"),
    ]  # fmt: skip
    for argv, text in cases:
        r = _agent_cmd(*common, *argv)  # a case's own --metrics-listen wins
        assert r.returncode != 0 and text in r.stderr, (argv, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("ts=")]  # not the log lines
        assert len(errors) == 1 and errors[0].startswith("tidegate agent: "), r.stderr
        assert xdp_prog_id(lab.host_if) is None, (argv, "left a program attached")
        assert not os.path.exists(f"{PIN_ROOT}/{pin}"), (argv, "left pinned maps")
        if "--role-map" in argv:
            assert 'msg="attached"' in r.stderr, "this start got as far as attaching before it failed"
    assert "INSECURE" in _agent_cmd("--interface", "nosuchif0", "--listen", "0.0.0.0:50999", "--insecure",
                                    "--state-dir", state, *common).stderr  # fmt: skip
    # the running agent was never disturbed
    st = agent.api.GetStatus()
    assert st.attached and st.prog_id == xdp_prog_id(agent.lab.host_if)


def test_unusable_token_file_and_auth_none_stop_the_start(agent, base, make_lab, tmp_path):
    """A token file nobody could use, or one others could read, is a start-up
    error naming the file, not an agent answering UNAUTHENTICATED; --auth none
    never reaches the network without --insecure and is always logged."""
    from tidegate.access.certs import make_lab_pki

    lab = make_lab("tok")
    pin = f"e2e-{lab.tag}"
    pki = tmp_path / "pki"
    make_lab_pki(pki, "localhost", ["alice"])
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
           "--tls-client-ca", str(pki / "ca.pem")]  # fmt: skip
    good = "admin " + "a" * 32 + "\nread " + "r" * 32 + "\n"
    moved = "move it aside (mv {0} {0}.bad) and a new one is created at the next start"
    files = {  # name: (content, mode, owner uid, what the error says)
        "garbage": (b"\xff\xfe\x00tokens", 0o600, 0, "is damaged (not text): " + moved),
        "empty": (b"", 0o600, 0, "holds no tokens: " + moved),
        "half": (b"admin\n", 0o600, 0, "damaged at line 1"),
        "group": (good.encode(), 0o640, 0, "accessible by group or others (mode 0640)"),
        "world": (good.encode(), 0o604, 0, "accessible by group or others (mode 0604)"),
        "nobody": (good.encode(), 0o600, 65534, "owned by uid 65534, not root"),
    }
    cases = []
    for name, (data, mode, uid, text) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        os.chmod(path, mode)
        os.chown(path, uid, -1)
        cases.append((["--token-file", str(path)], text.format(path)))
    cases.append(([*tls, "--auth", "none", "--listen", f"{lab.host_ip}:{free_port()}"], "refusing --auth none"))
    common = ["--interface", lab.host_if, "--pin-name", pin, "--metrics-listen", "off",
              "--state-dir", str(tmp_path / "state")]  # fmt: skip
    for argv, text in cases:
        listen = [] if "--listen" in argv else ["--listen", f"127.0.0.1:{free_port()}"]
        r = _agent_cmd(*common, *listen, *argv)
        assert r.returncode != 0 and text in r.stderr, (argv, r.returncode, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("ts=")]
        assert len(errors) == 1 and errors[0].startswith("tidegate agent: "), r.stderr
        if "--token-file" in argv:
            assert argv[1] in errors[0], "the error names the file"
        assert xdp_prog_id(lab.host_if) is None and not os.path.exists(f"{PIN_ROOT}/{pin}"), argv
    for name, (data, mode, uid, _) in files.items():
        st = os.stat(tmp_path / name)
        assert (tmp_path / name).read_bytes() == data and (st.st_mode & 0o777, st.st_uid) == (mode, uid), name
    # --auth none starts on loopback, and elsewhere with --insecure (as vagrant/ does), and always says so
    # loudly (the missing interface stops these starts)
    for listen in (["0.0.0.0:50999", "--insecure"], [f"127.0.0.1:{free_port()}"]):
        r = _agent_cmd("--interface", "nosuchif0", "--listen", *listen, "--auth", "none",
                       "--state-dir", str(tmp_path / "state"), "--metrics-listen", "off")  # fmt: skip
        assert "does not exist" in r.stderr and "INSECURE: --auth none" in r.stderr, r.stderr
    st = agent.api.GetStatus()
    assert st.attached and st.prog_id == xdp_prog_id(agent.lab.host_if), "the running agent was never disturbed"


def test_mutual_tls_on_a_non_loopback_address(start_agent, tmp_path):
    from tidegate.access.certs import make_lab_pki

    agent = start_agent("tls", BASE, wait=False, host="lab")
    pki = tmp_path / "pki"
    make_lab_pki(pki, agent.lab.host_ip, ["alice"], role="admin")
    make_lab_pki(pki, agent.lab.host_ip, ["grafana"], role="read")
    make_lab_pki(pki, agent.lab.host_ip, ["mallory"], role="admin")  # then left out of the role map
    roles = json.loads((pki / "roles.json").read_text())
    del roles["mallory"]
    (pki / "roles.json").write_text(json.dumps(roles))
    agent.extra += ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                    "--tls-client-ca", str(pki / "ca.pem"), "--role-map", str(pki / "roles.json")]  # fmt: skip
    agent.credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "alice.key").read_bytes(),
                                                     (pki / "alice.pem").read_bytes())  # fmt: skip
    agent.start()
    assert "INSECURE" not in agent.log()
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    ca = (pki / "ca.pem").read_bytes()

    def stub(client: str | None):
        if client is None:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(pki / f"{client}.key").read_bytes(),
                                                 certificate_chain=(pki / f"{client}.pem").read_bytes())  # fmt: skip
        return pbg.FilterStub(grpc.secure_channel(agent.server, creds))

    md = [("tidegate-author", "alice@tls")]
    st = stub("alice").GetStatus(pb.GetStatusRequest(), metadata=md, timeout=20)
    assert st.attached and st.active_version == 1
    r = stub("alice").ApplyRuleSet(pb.ApplyRequest(yaml=DROP_APP, reason="over mTLS", force=True), metadata=md,
                                   timeout=30)  # fmt: skip
    assert r.version == 2
    info = stub("alice").GetVersion(pb.GetVersionRequest(number=2), metadata=md, timeout=20).info
    assert info.author == "cert:alice (as alice@tls)", "the certificate names the author; the header only adds to it"
    assert stub("grafana").GetStatus(pb.GetStatusRequest(), timeout=20).active_version == 2
    with pytest.raises(grpc.RpcError) as e:
        stub("grafana").Rollback(pb.RollbackRequest(reason="x"), timeout=20)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a valid certificate whose name the role map does not know reads, and is never admin
    assert stub("mallory").GetStatus(pb.GetStatusRequest(), timeout=20).active_version == 2
    with pytest.raises(grpc.RpcError) as e:
        stub("mallory").Rollback(pb.RollbackRequest(reason="x"), timeout=20)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "cert:mallory has read" in e.value.details()
    for s in (stub(None), pbg.FilterStub(grpc.insecure_channel(agent.server))):
        with pytest.raises(grpc.RpcError) as e:
            s.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, "no client certificate, no connection"


def test_detach_on_exit_and_restore_from_the_store(start_agent):
    agent = start_agent("doe", BASE, extra=["--detach-on-exit"])
    api = agent.api
    v2 = api.ApplyRuleSet(yaml=DROP_APP, reason="the version to restore", force=True).version
    assert xdp_prog_id(agent.lab.host_if) is not None
    assert agent.stop(signal.SIGINT) == 0
    assert xdp_prog_id(agent.lab.host_if) is None and not os.path.exists(agent.pin_dir), "removed as asked"
    # the kernel has nothing now: the agent restores the store's active version (not --rules) and attaches
    agent.start()
    st = agent.api.GetStatus()
    assert (st.attached, st.active_version) == (True, v2)
    assert len(agent.api.ListVersions(limit=100).versions) == 2, "restored under its own number"
    assert 'msg="restored" version=' + str(v2) in agent.log()
    assert "--rules not applied" in agent.log()
    assert app_delta(agent) == (0, 20)


def test_watch_streams_are_capped_and_do_not_starve_other_calls(agent, base):
    from tidegate.api.service import MAX_WATCHERS

    api = agent.api
    streams = [api.WatchCounters(interval_ms=60_000) for _ in range(MAX_WATCHERS)]
    try:
        for s in streams:
            next(s)  # each holds a worker thread now
        with pytest.raises(grpc.RpcError) as e:
            next(api.WatchCounters(interval_ms=100))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        t0 = time.monotonic()
        assert api.GetStatus().active_version == base
        assert time.monotonic() - t0 < 5, "unary calls still get a worker"
    finally:
        for s in streams:
            s.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # cancelled streams give their slots back
        try:
            assert len(list(api.WatchCounters(interval_ms=100, max_updates=1))) == 1
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.2)
    else:
        raise AssertionError("watch slots were not released")


def test_watchdog_attaches_again_after_the_program_is_removed(start_agent):
    """Never fail open: a stray `ip link set dev IF xdp off`, or the interface
    going away and coming back (driver reload, recreated veth), leaves the
    gate open only until the agent's next check; `tidegate detach` (which
    removes the pins) is respected."""
    agent = start_agent("wd", DROP_APP, extra=["--attach-check-seconds", "0.5"])
    lab = agent.lab
    first = xdp_prog_id(lab.host_if)
    assert first is not None and app_delta(agent) == (0, 20)

    def wait_attached(timeout: float = 15) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = xdp_prog_id(lab.host_if)
            if pid is not None:
                return pid
            time.sleep(0.1)
        return None

    for off in ("xdp", "xdpgeneric"):
        subprocess.run(["ip", "link", "set", "dev", lab.host_if, off, "off"], check=True)
    assert wait_attached() == first, "the same program is attached again"
    assert app_delta(agent) == (0, 20), "and filters with the active rule set"

    # the interface disappears and comes back with a new index
    lab.remove()
    time.sleep(1.5)
    assert agent.proc.poll() is None, "the agent survives its interface going away"
    lab.create()
    assert wait_attached() == first
    assert app_delta(agent) == (0, 20)

    audit = agent.api.ListAudit(limit=50, action="reattach").entries
    assert len(audit) == 2 and all(e.result == "ok" for e in audit)
    assert agent.scrape()[("tidegate_reattaches_total", ())] == 2

    # tidegate detach removes the pins: the agent does not fight it
    agent.cleanup_kernel()
    time.sleep(1.5)
    assert xdp_prog_id(lab.host_if) is None
