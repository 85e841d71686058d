"""Hostile gRPC messages against a live agent: each gets a clear error
status, and afterwards the kernel maps (read through bpftool) and the store
are byte-identical.

What is hostile is decided here, by construction, never by asking
tidegate's parser (the agent's own judge): every document is a valid rule
set with exactly one defect put in at a known field, or text that cannot be
YAML. The agent must refuse each one, and name that field."""

from __future__ import annotations

import copy
import ipaddress
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import rule_set

from .harness import pinned_dump

pytestmark = pytest.mark.e2e

RULES = rule_set("dns")

OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("hgr", RULES)


def _stub(agent):
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    token = [ln.split()[1] for ln in (agent.state_dir / "tokens").read_text().splitlines()
             if ln.startswith("admin ")][0]  # fmt: skip
    return pb, pbg.FilterStub(grpc.insecure_channel(agent.server)), [("authorization", f"Bearer {token}")]


# The schema's key names (so generated garbage gets past the YAML layer)
SCHEMA_KEYS = ["defaults", "limit", "pps", "burst", "bps", "burst_bytes", "allow", "deny", "rules", "name",
               "protocol", "dst_ports", "sources", "prefix_limit", "ipv4_prefix", "ipv6_prefix", "block_seconds",
               "action", "canaries", "description"]  # fmt: skip

# an unclosed flow mapping at the end: no YAML parser accepts what comes before it
NEVER_YAML = "\nrules: {"
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
YAMLISH = st.one_of(
    st.builds(lambda t: t + NEVER_YAML, st.text(max_size=300)),
    st.builds(lambda n, v: RULES.replace("pps: 100", f"pps: {v}").replace("name: dns", f"name: {n}"),
              NAMES, st.sampled_from(["-1", "0", ".nan", "1e99", "'x'", "[]", "true", "1.0", "1000000001"])),
    st.builds(lambda depth: "rules: " + "[" * depth, st.integers(1, 5000)),  # never closed
    st.builds(lambda k: RULES + f"{k}: 1\n", NAMES.filter(lambda k: k not in SCHEMA_KEYS)),  # unknown key
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


# A valid rule set (as data), and where each kind of defect goes into it.
VALID = {
    "defaults": {"limit": {"pps": 1000, "burst": 2000}, "ipv4_prefix": 32, "ipv6_prefix": 64},
    "allow": ["10.1.0.0/16", "2001:db8:1::/48"],
    "deny": ["192.0.2.0/24"],
    "rules": [
        {"name": "dns", "protocol": "udp", "dst_ports": [53], "sources": ["198.51.100.0/24", "::/0"],
         "limit": {"pps": 100, "burst": 100}, "block_seconds": 10},
        {"name": "web", "protocol": "tcp", "dst_ports": [80, "8000-8100"],
         "prefix_limit": {"ipv4_prefix": 24, "pps": 10, "burst": 10}},
    ],
}  # fmt: skip
# whole numbers and their ranges (README: rule sets)
NUMBERS = {
    ("defaults", "limit", "pps"): (1, 10**9), ("defaults", "limit", "burst"): (1, 10**9),
    ("defaults", "ipv4_prefix"): (1, 32), ("defaults", "ipv6_prefix"): (1, 128),
    ("rules", 0, "limit", "pps"): (1, 10**9), ("rules", 0, "limit", "burst"): (1, 10**9),
    ("rules", 0, "block_seconds"): (0, 86400), ("rules", 1, "prefix_limit", "ipv4_prefix"): (0, 32),
    ("rules", 1, "prefix_limit", "pps"): (1, 10**9),
}  # fmt: skip
CIDR_ITEMS = [("allow", 0), ("allow", 1), ("deny", 0), ("rules", 0, "sources", 0), ("rules", 0, "sources", 1)]
PORT_ITEMS = [("rules", 0, "dst_ports", 0), ("rules", 1, "dst_ports", 0), ("rules", 1, "dst_ports", 1)]
MAPPINGS = [(), ("defaults",), ("defaults", "limit"), ("rules", 0), ("rules", 0, "limit"), ("rules", 1),
            ("rules", 1, "prefix_limit")]  # fmt: skip
KEYS_AT = {(): {"defaults", "allow", "deny", "rules", "canaries", "description"},
           ("defaults",): {"limit", "ipv4_prefix", "ipv6_prefix", "prefix_limit", "block_seconds",
                           "ipv6_unparsed_extensions"},
           ("defaults", "limit"): {"pps", "burst", "bps", "burst_bytes"},
           ("rules", 0): {"name", "protocol", "dst_ports", "sources", "action", "limit", "prefix_limit",
                          "block_seconds"},
           ("rules", 0, "limit"): {"pps", "burst", "bps", "burst_bytes"}}  # fmt: skip
KEYS_AT[("rules", 1)] = KEYS_AT[("rules", 0)]
KEYS_AT[("rules", 1, "prefix_limit")] = KEYS_AT[("defaults", "limit")] | {"ipv4_prefix", "ipv6_prefix"}
NOT_A_NUMBER = st.one_of(st.booleans(), st.floats(), st.text(max_size=10), st.none(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.sampled_from(SCHEMA_KEYS), st.integers(), max_size=2))  # fmt: skip


def _field(path: tuple) -> str:
    """A path as the agent names fields: rules[0].limit.pps."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _bad_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        return True
    return False


@st.composite
def hostile_documents(draw) -> tuple[dict, str]:
    """(a valid rule set with exactly one defect, the field the defect is in)."""
    doc = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["number", "cidr", "port", "unknown key", "not a mapping", "name", "protocol",
                                 "duplicate", "too many rules", "burst_bytes alone", "icmp ports"]))  # fmt: skip

    def put(path, value):
        node = doc
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    if kind == "number":
        path = draw(st.sampled_from(sorted(NUMBERS, key=str)))
        lo, hi = NUMBERS[path]
        # the values just outside the range every time, so a bound off by one is always tried
        value = draw(st.one_of(st.sampled_from([lo - 1, hi + 1]), st.integers(max_value=lo - 1),
                               st.integers(min_value=hi + 1), NOT_A_NUMBER))
        put(path, value)
    elif kind == "cidr":
        path = draw(st.sampled_from(CIDR_ITEMS))
        put(path, draw(st.one_of(
            st.sampled_from(["10.0.0.1/8", "0.0.0.0/33", "::/129", "1.2.3", "2001:db8::1/32", "10.0.0.0/8/8", ""]),
            st.text(max_size=20).filter(_bad_cidr), st.integers(), st.none(), st.booleans())))  # fmt: skip
    elif kind == "port":
        path = draw(st.sampled_from(PORT_ITEMS))
        put(path, draw(st.one_of(st.integers(max_value=0), st.integers(min_value=65536), st.sampled_from(
            ["8100-8000", "0-10", "1-65536", "a-b", "80,81", ""]), st.booleans(), st.floats(), st.none())))
    elif kind == "unknown key":
        at = draw(st.sampled_from(sorted(KEYS_AT, key=str)))
        key = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in KEYS_AT[at]))
        node = doc
        for p in at:
            node = node[p]
        node[key] = draw(st.integers(0, 100))
        path = (*at, key)
    elif kind == "not a mapping":
        path = draw(st.sampled_from(MAPPINGS))
        value = draw(st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=2)))
        if not path:
            return value, ""
        put(path, value)
    elif kind == "name":
        path = ("rules", draw(st.integers(0, 1)), "name")
        put(path, draw(st.one_of(
            st.sampled_from(["", "default", "deny-list", "allow-list", "-x", "a b", "a" * 33, "web\n", "é"]),
            st.integers(), st.none())))  # fmt: skip
    elif kind == "protocol":
        path = ("rules", draw(st.integers(0, 1)), "protocol")
        put(path, draw(st.one_of(st.text(max_size=8).filter(
            lambda t: t.lower() not in ("tcp", "udp", "icmp", "icmpv6", "any")), st.integers(), st.none())))
    elif kind == "duplicate":
        which = draw(st.sampled_from(["name", "allow", "deny-allow", "source"]))
        if which == "name":
            doc["rules"][1]["name"], path = "dns", ("rules", 1, "name")
        elif which == "allow":
            doc["allow"][1], path = "10.1.0.0/16", ("allow", 1)
        elif which == "deny-allow":
            doc["deny"][0], path = "10.1.0.0/16", ("deny", 0)
        else:
            doc["rules"][0]["sources"][1], path = "198.51.100.0/24", ("rules", 0, "sources", 1)
    elif kind == "too many rules":
        n = draw(st.integers(65, 80))
        doc["rules"] = [{"name": f"r{i}", "protocol": "udp", "dst_ports": [1000 + i]} for i in range(n)]
        path = ("rules",)
    elif kind == "burst_bytes alone":
        doc["rules"][0]["limit"]["burst_bytes"], path = 1000, ("rules", 0, "limit", "burst_bytes")
    else:
        doc["rules"][0]["protocol"], path = draw(st.sampled_from(["icmp", "icmpv6"])), ("rules", 0, "dst_ports")
    return doc, _field(path)


EXAMPLES = int(os.environ.get("TIDEGATE_HOSTILE_EXAMPLES", "10000"))


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
    kinds: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile_documents())
    def one(case):
        doc, field = case
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except Exception:
            return  # surrogates and the like: not a document
        try:
            stub.ApplyRuleSet(pb.ApplyRequest(yaml=text, reason="hostile"), metadata=md, timeout=10)
            raise AssertionError(f"a hostile rule set was accepted (defect at {field or 'the document'}):\n{text}")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details(), text)
            assert e.details()
            raw = dict(e.trailing_metadata() or ()).get("tidegate-errors-bin")
            paths = [v.path for v in pb.ValidationErrors.FromString(raw).violations] if raw else []
            assert any(p == field or p.startswith(field + ".") or p.startswith(field + "[") for p in paths), (
                f"the error does not name {field or 'the document'}: {paths}\n{text}")
        sent.append(1)
        top = field.split(".")[0].split("[")[0] or "(document)"
        kinds[top] = kinds.get(top, 0) + 1

    one()
    assert len(sent) >= EXAMPLES * 0.95, f"only {len(sent)} of {EXAMPLES} documents could be sent"
    assert {"defaults", "allow", "deny", "rules"} <= set(kinds), kinds
    assert pinned_dump(pin_dir) == maps0, "a rejected rule set changed a kernel map"
    rows = _store_rows(agent.state_dir)
    assert rows.pop("_audit_count") - rows0.pop("_audit_count") == len(sent), "every rejection is audited"
    assert rows == rows0, "a rejected rule set changed the store"


@pytest.mark.parametrize("bad, path, said", [
    ("10.9.1.1/24", "allow[1500]", "'10.9.1.1/24' has host bits set; did you mean 10.9.1.0/24?"),
    ("10.9.0.0/24", "allow[1500]", "10.9.0.0/24 is listed twice (also item 0)"),
    ("10.9.1.0/33", "allow[1500]", "'10.9.1.0/33' is not a valid address or CIDR"),
    ("010.9.1.0/24", "allow[1500]", "'010.9.1.0/24' is not a valid address or CIDR"),
])  # fmt: skip
def test_a_bad_item_in_a_large_list_is_named_and_changes_nothing(agent, bad, path, said):
    """A 2,000-CIDR one-line list (read by the array path) with one bad item:
    the real server refuses it naming that item, as the per-item reading
    words it, and the maps are byte-identical; a CIDR on both lists is named
    on the deny list."""
    pb, stub, md = _stub(agent)
    pin_dir = f"/sys/fs/bpf/tidegate/{agent.pin_name}"
    allow = [f"10.{9 + i // 256}.{i % 256}.0/24" for i in range(2000)]
    maps0 = pinned_dump(pin_dir)
    for text, where, what in ((f"allow: {allow[:1500] + [bad] + allow[1501:]}\n" + RULES, path, said),
                              (f"allow: {allow}\ndeny: ['10.12.7.0/24']\n" + RULES, "deny[0]",
                               "10.12.7.0/24 is also on the allow list")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            stub.ApplyRuleSet(pb.ApplyRequest(yaml=text, reason="bad item", no_guard=True), metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        raw = dict(e.value.trailing_metadata())["tidegate-errors-bin"]
        v = pb.ValidationErrors.FromString(raw).violations
        assert [x.path for x in v] == [where] and what in v[0].message, (where, [(x.path, x.message) for x in v])
        assert pinned_dump(pin_dir) == maps0
