"""Hostile callers against a real agent over a real gRPC channel: nothing a
caller sends crashes or stalls the agent, and nothing it sends changes the
kernel's rule-set maps, the active version or the store.

One agent serves the module, started with BASE_RULES; every test leaves it
as it found it.
"""

from __future__ import annotations

import grpc
import pytest

from tidegate.ruleset.yaml_events import MAX_DEPTH

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
    from tidegate.api.admission import MAX_MESSAGE_BYTES
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
    from tidegate.api.admission import MAX_MESSAGE_BYTES
    from tidegate.ruleset.model import MAX_FILE_BYTES, Capacity

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
    from tidegate.ruleset.model import Capacity

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


# --------------------------------------------------------- error answers
def _small_answer(v) -> None:
    """An invalid rule set's answer: at most MAX_ERRORS, each cut; far under any client's receive limit."""
    from tidegate.ruleset.model import MAX_ERRORS

    assert not v.valid and 1 <= len(v.violations) <= MAX_ERRORS
    assert v.ByteSize() < 64 << 10, v.ByteSize()
    assert all(len(x.message) <= 300 and len(x.path) <= 200 for x in v.violations)


def _small_error(e: grpc.RpcError) -> None:
    assert e.code() == INVALID_ARGUMENT, (e.code(), e.details()[:300])
    assert len(e.details()) <= 1600
    trailer = dict(e.trailing_metadata() or ()).get("tidegate-errors-bin", b"")
    assert 0 < len(trailer) <= 2500


ECHOES = {  # a huge value where errors echo values, names or keys
    "protocol": lambda n: f"rules:\n  - name: a\n    protocol: '{'p' * n}'\n    action: drop\n",
    "action": lambda n: f"rules:\n  - name: a\n    action: '{'d' * n}'\n",
    "cidr": lambda n: f"allow: ['10.0.0.0/8{'0' * n}']\nrules: []\n",
    "key": lambda n: f"rules:\n  - name: a\n    {'k' * n}: 1\n    action: drop\n",
    "top key": lambda n: f"{'t' * n}: 1\nrules: []\n",
    "number": lambda n: f"defaults:\n  limit: {{pps: {'9' * min(n, 4000)}}}\nrules: []\n",
    "many bad CIDRs": lambda n: "deny: [" + ", ".join(f"'{i}{'z' * 60}'" for i in range(min(n, 100_000))) + "]\n",
    "many unknown keys": lambda n: "".join(f"key{i}: 1\n" for i in range(min(n, 100_000))) + "rules: []\n",
}


def test_error_answers_stay_small_whatever_the_text(agent, reader):
    """Values echoed in errors are cut, at most 100 errors are worked out
    (no suggestions past them), and the answer stays far under the client's
    receive limit however big the text and its values."""
    before = Unchanged(agent)
    for name, make in ECHOES.items():
        text = make(7_000_000 if "many" not in name else 100_000)
        v = reader.ValidateRuleSet(yaml=text, source="s" * 100_000)
        _small_answer(v)
        _small_error(reader.error("WhatIf", yaml=text, source="s" * 100_000))
        _small_error(agent.api.error("ApplyRuleSet", yaml=text, source="s" * 100_000, reason="echo"))
    before.check()


def test_list_answers_fit_a_default_client_whatever_the_limit_asked(agent, reader):
    """A read caller asking for every audit row and every version gets the
    newest that fit under gRPC's default 4 MiB receive limit (the channel
    here keeps that default), never an answer the client must refuse."""
    from tidegate.api.service import MAX_LIST_BYTES

    before = Unchanged(agent)
    long = "rules:\n" + "".join(f"  - name: r{i}\n    bad{'x' * 30}: 1\n" for i in range(60))
    for i in range(1200):  # ~4,000-character audit details: ~5 MB of rows
        agent.api.error("ApplyRuleSet", yaml=long, reason=f"noise {i}")
    audit = reader.ListAudit(limit=2**32 - 1)
    assert 3 << 20 < audit.ByteSize() <= MAX_LIST_BYTES, audit.ByteSize()
    assert 500 < len(audit.entries) < 1200 and audit.entries[0].detail.count("rules[") > 10
    versions = reader.ListVersions(limit=2**32 - 1)
    assert [v.number for v in versions.versions] == sorted((v.number for v in versions.versions), reverse=True)
    before.check()


# ------------------------------------------------- property-based classes
def _hostile_texts():
    from hypothesis import strategies as st

    from tidegate.ruleset.model import MAX_FILE_BYTES, Capacity

    max_values = Capacity().max_values
    depth = st.tuples(st.just("depth"), st.sampled_from(STYLES[:3]),
                      st.builds(lambda e, j: min(100_000, 2**e + j), st.integers(0, 17), st.integers(0, 7)))
    size = st.tuples(st.just("size"), st.just(""), st.integers(-64, 64).map(lambda d: MAX_FILE_BYTES + d))
    values = st.tuples(st.just("values"), st.just(""), st.integers(-3, 3).map(lambda d: max_values + d))
    echo = st.tuples(st.just("echo"), st.sampled_from(sorted(ECHOES)),
                     st.builds(lambda e, j: min(7_000_000, 2**e + j), st.integers(0, 23), st.integers(0, 9)))
    return st.one_of(depth, size, values, echo)


def _text(kind: str, style: str, n: int) -> str:
    if kind == "depth":
        return nested(style, n)
    if kind == "size":  # a valid rule set padded to exactly n bytes with a comment
        return BASE_RULES + "#" + "x" * (n - len(BASE_RULES) - 2) + "\n"
    if kind == "values":  # the document's mapping, `rules` and the list are values too
        return "rules: [" + "1," * (n - 4) + "1]\n"
    return ECHOES[style](n)


def test_generated_depth_size_value_and_echo_classes_through_the_server(agent, reader):
    """Hypothesis picks the class and its size around each limit (depth 1 to
    100,000 in three styles, text length within 64 bytes of the size limit,
    value counts within 3 of the value limit, echoed values of 1 byte to
    7 MB); each text goes to ValidateRuleSet as a read caller, and to WhatIf
    and ApplyRuleSet when invalid. The answer is exact at the limits and
    always small, and nothing changes."""
    from hypothesis import HealthCheck, given, settings

    from tidegate.ruleset.model import MAX_FILE_BYTES, Capacity

    before = Unchanged(agent)
    seen: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_hostile_texts())
    def one(case):
        kind, style, n = case
        seen[kind] = seen.get(kind, 0) + 1
        text = _text(kind, style, n)
        v = reader.ValidateRuleSet(yaml=text, source="gen.yaml")
        msgs = " | ".join(x.message for x in v.violations)
        if kind == "depth":
            assert (DEPTH_WORDS in msgs) == (n + 1 > MAX_DEPTH), (style, n, msgs)
        elif kind == "size":
            assert len(text.encode()) == n
            assert v.valid == (n <= MAX_FILE_BYTES), (n, msgs)
            assert v.valid or f"larger than {MAX_FILE_BYTES:,} bytes" in msgs
        elif kind == "values":
            assert (f"more than {Capacity().max_values:,} values" in msgs) == (n > Capacity().max_values), (n, msgs)
        if v.valid:
            return
        _small_answer(v)
        _small_error(reader.error("WhatIf", yaml=text, source="gen.yaml"))
        _small_error(agent.api.error("ApplyRuleSet", yaml=text, source="gen.yaml", reason="generated"))

    one()
    assert set(seen) == {"depth", "size", "values", "echo"}, seen
    before.check()


# ------------------------------------------------------------ concurrency
GUARDED = BASE_RULES.replace("rules:\n", "canaries: ['{canary}']\nrules:\n", 1)
TIGHT = GUARDED.replace("    limit: {pps: 500, burst: 500}", "    action: drop")  # drops the canary's app traffic


def test_admin_apply_and_guard_rollback_while_sixteen_hostile_calls_run(start_agent, tmp_path):
    """16 callers send hostile calls back to back (unauthenticated 8 MiB
    bodies, a read caller's 100,000-deep nesting and largest legitimate rule
    sets, a read caller's 8 MiB applies) with the agent's default limits.
    Meanwhile an admin's `apply --guard` completes and keeps its version,
    and a forced `apply --guard` that drops the canary's traffic is rolled
    back by the guard within its window (exit 4: the guard acted, not the
    window running out). Every hostile call gets a clear status."""
    import os
    import subprocess
    import threading

    from tidegate.ruleset.model import MAX_FILE_BYTES
    from tidegate.v1 import tidegate_pb2 as pb
    from tidegate.v1 import tidegate_pb2_grpc as pbg

    from .conftest import BIN, finish, send

    agent = start_agent("hcon", BASE_RULES, ["--guard-seconds", "20"])
    lab = agent.lab
    good = GUARDED.replace("{canary}", lab.peer_ip)
    (tmp_path / "good.yaml").write_text(good.replace("pps: 1000, burst: 1000", "pps: 900, burst: 1000"))
    (tmp_path / "tight.yaml").write_text(TIGHT.replace("{canary}", lab.peer_ip))
    base_v = agent.api.ApplyRuleSet(yaml=good, reason="canary", force=True).version
    canary = send(lab, src=lab.peer_ip, dport=5555, count=40 * 55, pps=40, wait=False)

    read_md = [("authorization", f"Bearer {agent.token('read')}")]
    big = "#" * (MAX_FILE_BYTES - 10)
    largest = largest_rule_set()
    kinds = {
        "unauthenticated 8 MiB": lambda s: s.ValidateRuleSet(pb.RuleSetText(yaml=big), timeout=60),
        "read: 100,000 deep": lambda s: s.WhatIf(pb.RuleSetText(yaml=nested("flow-seq", 100_000)), metadata=read_md,
                                                 timeout=60),
        "read: largest rule set": lambda s: s.ValidateRuleSet(pb.RuleSetText(yaml=largest), metadata=read_md,
                                                              timeout=60),
        "read: 8 MiB apply": lambda s: s.ApplyRuleSet(pb.ApplyRequest(yaml=big, reason="x"), metadata=read_md,
                                                      timeout=60),
    }  # fmt: skip
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
    stop = threading.Event()
    calls: dict[str, int] = dict.fromkeys(kinds, 0)
    bad: list = []
    lock = threading.Lock()

    def hostile(kind: str) -> None:
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.use_local_subchannel_pool", 1)]  # a connection of its own: 16 callers, not 16 streams of one
        with grpc.insecure_channel(agent.server, options=opts) as ch:
            stub = pbg.FilterStub(ch)
            while not stop.is_set():
                try:
                    kinds[kind](stub)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as e:
                    code, details = e.code(), e.details()
                with lock:
                    calls[kind] += 1
                    if code not in allowed:
                        bad.append((kind, code, details))

    threads = [threading.Thread(target=hostile, args=(k,), daemon=True) for k in kinds for _ in range(4)]
    env = {**os.environ, "TIDEGATE_SERVER": agent.server, "TIDEGATE_TOKEN_FILE": str(agent.state_dir / "tokens"),
           "TIDEGATE_AUTHOR": "e2e-concurrency"}  # fmt: skip

    def cli(*args):
        return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env, timeout=120)

    for t in threads:
        t.start()
    try:
        while min(calls.values()) == 0:  # every kind under way
            stop.wait(0.2)
        before = dict(calls)
        r = cli("apply", str(tmp_path / "good.yaml"), "--guard", "--guard-seconds", "4", "--reason", "under load")
        assert r.returncode == 0 and "guard: kept" in r.stdout, r.stdout + r.stderr
        kept_v = agent.api.GetStatus().active_version
        assert kept_v > base_v
        r = cli("apply", str(tmp_path / "tight.yaml"), "--force", "--guard", "--guard-seconds", "20",
                "--reason", "drops the canary, under load")  # fmt: skip
        # the only traffic is the canary's: the drop share or the canary, whichever the guard sees first
        assert r.returncode == 4 and f"GUARD ROLLED BACK to version {kept_v}" in r.stdout, r.stdout + r.stderr
        during = {k: calls[k] - before[k] for k in kinds}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
        canary.terminate()
        try:
            finish(canary, timeout=10)
        except Exception:
            pass
    assert not bad, bad[:10]
    assert all(n > 0 for n in during.values()), during  # the hostile load ran all along
    assert agent.proc.poll() is None
    st = agent.api.GetStatus()
    assert st.attached and st.active_version == kept_v
    rb = agent.api.ListAudit(limit=10, action="guard-rollback").entries
    assert rb and rb[0].detail.endswith(f"rolled back to {kept_v}") and rb[0].version == kept_v + 1
