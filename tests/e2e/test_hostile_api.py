"""Hostile callers against a real agent over a real gRPC channel: nothing a
caller sends crashes or stalls the agent, and nothing it sends changes the
kernel's rule-set maps, the active version or the store.

One agent serves the module, started with BASE_RULES; every test leaves it
as it found it.
"""

from __future__ import annotations

import grpc
import pytest

from tidegate.ruleset_yaml import MAX_DEPTH

from .conftest import BASE_RULES, Api, bpftool_dump, xdp_prog_id

pytestmark = pytest.mark.e2e

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
DEPTH_WORDS = f"depth limit of a rule set is {MAX_DEPTH}"


# the bulk tests send hundreds of expensive calls as a read caller: the limits have their own test
UNLIMITED = ["--read-call-rate", "100000", "--read-call-burst", "100000"]


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("hapi", BASE_RULES, UNLIMITED)


@pytest.fixture(scope="module")
def reader(agent):
    api = Api(agent, role="read")
    yield api
    api.close()


class Unchanged:
    """What a refused call must leave as it was: the process, the attached
    program, the active version, the pinned rule-set maps, the versions."""

    def __init__(self, agent):
        self.agent = agent
        self.prog = xdp_prog_id(agent.lab.host_if)
        self.maps = bpftool_dump(agent.pin_dir)
        self.status = agent.api.GetStatus()
        self.versions = agent.api.ListVersions(limit=1000)
        assert self.prog and self.status.attached and self.status.active_version

    def check(self) -> None:
        a = self.agent
        assert a.proc.poll() is None, f"the agent died ({a.proc.returncode}):\n{a.log()[-3000:]}"
        st = a.api.GetStatus()
        assert st.attached and st.active_version == self.status.active_version
        assert st.shadow_version == self.status.shadow_version
        assert xdp_prog_id(a.lab.host_if) == self.prog
        assert bpftool_dump(a.pin_dir) == self.maps
        assert a.api.ListVersions(limit=1000) == self.versions


def nested(style: str, depth: int) -> str:
    """A rule-set text nested `depth` levels below `rules:`."""
    if style == "flow-seq":
        return "rules: " + "[" * depth + "]" * depth + "\n"
    if style == "flow-map":
        return "rules: " + "{a: " * depth + "1" + "}" * depth + "\n"
    if style == "block-seq":  # compact block sequences: "- - - x"
        return "rules:\n  " + "- " * depth + "x\n"
    if style == "block-map":  # one more space a level: the text grows with depth squared
        return "rules:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(depth)) + " " * (depth + 1) + "b: 1\n"
    raise ValueError(style)


STYLES = ("flow-seq", "flow-map", "block-seq", "block-map")
DEPTHS = (10, 100, 1_000, 10_000, 100_000)


def _depth_cases():
    for style in STYLES:
        for depth in DEPTHS:
            if style == "block-map" and depth > 2_000:  # 2,000 levels are 2 MB of indentation already
                continue
            yield style, depth


def test_deep_nesting_is_refused_with_the_depth_limit_and_changes_nothing(agent, reader):
    """The 100 KB text that used to kill the agent with SIGSEGV (libyaml's
    composer recursing 50,000 levels), and its relatives in every style,
    through the three calls that parse rule sets, from a read caller and an
    admin."""
    before = Unchanged(agent)
    cases = 0
    for style, depth in _depth_cases():
        text = nested(style, depth)
        v = reader.ValidateRuleSet(yaml=text, source="deep.yaml")
        assert not v.valid and len(v.violations) == 1, (style, depth, v)
        assert DEPTH_WORDS in v.violations[0].message and v.violations[0].line >= 1, (style, depth, v)
        e = reader.error("WhatIf", yaml=text, source="deep.yaml")
        assert e.code() == INVALID_ARGUMENT and DEPTH_WORDS in e.details(), (style, depth, e.details())
        assert DEPTH_WORDS in reader.violations(e)[0].message
        e = agent.api.error("ApplyRuleSet", yaml=text, source="deep.yaml", reason="deep", force=True)
        assert e.code() == INVALID_ARGUMENT and DEPTH_WORDS in e.details(), (style, depth, e.details())
        cases += 1
    assert cases == 18
    # the exact text from the report, one more time, then everything is checked
    v = reader.ValidateRuleSet(yaml="rules: " + "[" * 50_000 + "]" * 50_000)
    assert not v.valid and DEPTH_WORDS in v.violations[0].message
    before.check()


def test_legitimate_depth_still_validates(reader):
    """The limit is not in the way: a rule set as deep as rule sets get."""
    v = reader.ValidateRuleSet(yaml=BASE_RULES.replace("limit: {pps: 500, burst: 500}",
                                                       "limit: {pps: 500, burst: 500}\n    sources: ['0.0.0.0/0']"))
    assert v.valid, v


# ----------------------------------------------------------------- sizes
def _raw(agent, method: str, token: str | None = None, max_bytes: int = 64 << 20):
    """A unary call of `method` sending raw bytes (the client's own limits out of the way)."""
    ch = grpc.insecure_channel(agent.server, options=[("grpc.max_send_message_length", max_bytes),
                                                      ("grpc.max_receive_message_length", max_bytes)])  # fmt: skip
    call = ch.unary_unary(f"/tidegate.v1.Filter/{method}", request_serializer=None, response_deserializer=None)
    md = [("authorization", f"Bearer {token}")] if token else []
    return ch, lambda body: call(body, metadata=md, timeout=60)


def _code(fn, body) -> grpc.StatusCode:
    try:
        fn(body)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_refused_callers_bodies_are_never_read(agent):
    """Authentication, and the role admin methods need, are checked before
    the body is received: a body over the receive limit, or one that is not
    even protobuf, is answered UNAUTHENTICATED / PERMISSION_DENIED, not with
    the errors reading it would give (RESOURCE_EXHAUSTED, INTERNAL)."""
    from tidegate.admission import MAX_MESSAGE_BYTES
    from tidegate.v1 import tidegate_pb2 as pb

    before = Unchanged(agent)
    oversized = pb.ApplyRequest(yaml="#" * (MAX_MESSAGE_BYTES + 1), reason="big").SerializeToString()
    junk = b"\xff\xfe not protobuf" * 1000
    read, admin = agent.token("read"), agent.token("admin")
    for method in ("ValidateRuleSet", "WhatIf", "ApplyRuleSet", "GetStatus"):
        ch, call = _raw(agent, method)
        assert _code(call, oversized) == grpc.StatusCode.UNAUTHENTICATED, method
        assert _code(call, junk) == grpc.StatusCode.UNAUTHENTICATED, method
        ch.close()
    ch, call = _raw(agent, "ApplyRuleSet", read)
    assert _code(call, oversized) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(call, junk) == grpc.StatusCode.PERMISSION_DENIED
    ch.close()
    # the same bodies from a caller who may send them: now they are read, and refused for what they are
    ch, call = _raw(agent, "ApplyRuleSet", admin)
    assert _code(call, oversized) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(call, junk) == grpc.StatusCode.INTERNAL  # grpc: the request could not be deserialized
    ch.close()
    # a server-streaming method too
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    with grpc.insecure_channel(agent.server) as ch:
        stream = pbg.FilterStub(ch).WatchCounters(pb.WatchRequest(max_updates=1), timeout=20)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    before.check()


def test_size_limits_are_clear_and_agree(agent, reader):
    """The rule-set size limit is the parser's and, with room for the other
    fields, the server's receive limit: a text just over it is refused by the
    parser with its limit named; a message over the receive limit by gRPC.
    The largest legitimate rule set validates and its canonical text comes
    back within the CLI client's receive limit."""
    from tidegate import client
    from tidegate.admission import MAX_MESSAGE_BYTES
    from tidegate.ruleset import MAX_FILE_BYTES, Capacity

    assert client.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES < 16 << 20
    before = Unchanged(agent)
    over = "#" * (MAX_FILE_BYTES + 1)
    v = reader.ValidateRuleSet(yaml=over)
    assert not v.valid and f"larger than {MAX_FILE_BYTES:,} bytes" in v.violations[0].message
    e = reader.error("WhatIf", yaml=over)
    assert e.code() == INVALID_ARGUMENT and f"{MAX_FILE_BYTES:,}" in e.details()
    e = agent.api.error("ApplyRuleSet", yaml="#" * MAX_MESSAGE_BYTES, reason="too big")
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.details()
    # more values than the largest rule set needs
    cap = Capacity()
    many = "rules: [" + "1," * cap.max_values + "1]\n"
    v = reader.ValidateRuleSet(yaml=many)
    assert not v.valid and f"more than {cap.max_values:,} values" in v.violations[0].message
    # the largest legitimate rule set: 131,072 full-length IPv6 CIDRs one a line, 64 rules
    text = largest_rule_set()
    assert len(text) <= MAX_FILE_BYTES
    cl = client.Client(agent.server, token=agent.token("read"), timeout=120)
    try:
        v = cl.call("ValidateRuleSet", cl.pb.RuleSetText(yaml=text, source="largest.yaml"))
    finally:
        cl.close()
    assert v.valid and v.rules == cap.max_rules, v.violations
    assert v.canonical_yaml.count("'ffff:") == cap.max_cidrs
    before.check()


def largest_rule_set() -> str:
    from tidegate.ruleset import Capacity

    cap = Capacity()
    per_rule = cap.max_cidrs // cap.max_rules
    lines = ["defaults:", "  limit: {pps: 1000, burst: 2000}", "rules:"]
    n = 0
    for r in range(cap.max_rules):
        lines += [f"  - name: rule-{r:02d}", "    protocol: udp", f"    dst_ports: [{1000 + r}]",
                  "    limit: {pps: 100, burst: 200}", "    sources:"]  # fmt: skip
        for _ in range(per_rule):
            lines.append(f"      - 'ffff:{n >> 16:04x}:{n & 0xFFFF:04x}:ffff:ffff:ffff:ffff:ffff/128'")
            n += 1
    return "\n".join(lines) + "\n"
