"""The YAML layer of rule sets (ruleset_yaml): nesting is refused at the
depth limit however deep the text goes, values are bounded, and the
composed nodes say what PyYAML's own composer would (lines, duplicate keys,
keys that are not names, aliases, documents). Parser-level; the same
classes go through the real agent in tests/e2e/test_hostile_api.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.ruleset.model import MAX_ERRORS, Capacity, RuleSetError
from tidegate.ruleset.parse import parse_rule_set
from tidegate.ruleset.yaml_events import MAX_DEPTH

STYLES = {
    "flow-seq": lambda d: "rules: " + "[" * d + "]" * d,
    "flow-map": lambda d: "rules: " + "{a: " * d + "1" + "}" * d,
    "block-seq": lambda d: "rules:\n  " + "- " * d + "x",
    "mixed": lambda d: "rules: " + "[{a: " * (d // 2) + "1" + "}]" * (d // 2),
}


def error(text: str, **kw) -> str:
    with pytest.raises(RuleSetError) as e:
        parse_rule_set(text, "t.yaml", **kw)
    return str(e.value)


def test_the_text_that_crashed_the_agent_is_refused_in_a_child_process():
    """50,000 '[' made libyaml's recursive composer overflow the C stack
    (SIGSEGV). Run in a child so a regression fails this test instead of
    killing pytest."""
    code = ("from tidegate.ruleset.model import RuleSetError; from tidegate.ruleset.parse import parse_rule_set\n"
            "try:\n    parse_rule_set('rules: ' + '[' * 50000 + ']' * 50000)\n"
            "except RuleSetError as e:\n    print(e)\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert f"the depth limit of a rule set is {MAX_DEPTH}" in r.stdout


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.sampled_from(sorted(STYLES)), st.integers(0, 17), st.integers(0, 1000))
def test_any_depth_in_any_style(style, exp, extra):
    depth = min(100_000, 2**exp + extra)
    text = STYLES[style](depth)
    levels = (2 * (depth // 2) if style == "mixed" else depth) + 1  # the document's mapping is a level
    if levels > MAX_DEPTH:
        msg = error(text)
        assert f"nested more than {MAX_DEPTH} levels deep" in msg and msg.count("\n") == 0
    else:  # a rule set or not, but not a depth error
        try:
            parse_rule_set(text)
        except RuleSetError as e:
            assert "nested" not in str(e)


def test_block_mappings_and_the_limit_exactly():
    ok = "rules: []\ndefaults:\n" + "".join(" " * i + "  a:\n" for i in range(MAX_DEPTH - 2)) + " " * 40 + "b: 1\n"
    assert "nested" not in error(ok)  # MAX_DEPTH levels: other errors, not depth
    deep = "rules: []\ndefaults:\n" + "".join(" " * i + "  a:\n" for i in range(MAX_DEPTH - 1)) + " " * 40 + "b: 1\n"
    assert f"t.yaml:{MAX_DEPTH + 2}: (document): nested more than {MAX_DEPTH}" in error(deep)  # at `b: 1`


def test_values_are_bounded_by_capacity():
    cap = Capacity(max_rules=4, max_cidrs=100, max_port_entries=10)
    n = cap.max_values - 3  # the document's mapping, the key `rules`, the list
    assert "more than" not in error("rules: [" + "1," * (n - 1) + "1]", capacity=cap)
    msg = error("rules: [" + "1," * n + "1]", capacity=cap)
    assert f"more than {cap.max_values:,} values" in msg and msg.count("\n") == 0
    # the default capacity leaves room for the largest rule set it holds
    c = Capacity()
    assert c.max_values > c.max_cidrs + c.max_port_entries + 64 * c.max_rules


def test_composition_matches_pyyaml():
    text = "defaults:\n  limit: {pps: 5}\nrules:\n  - name: a\n    action: drop\n  - name: b\n    action: pass\n"
    rs = parse_rule_set(text)
    assert [r.name for r in rs.rules] == ["a", "b"] and rs.defaults.limit.pps == 5
    assert yaml.safe_load(text)["rules"][1]["name"] == "b"
    # duplicate keys (the second one's line), collection keys, anchors yes, aliases no, one document
    assert "t.yaml:3: rules: duplicate key (first on line 1)" in error("rules: []\ndefaults: {}\nrules: []\n")
    assert "mapping keys must be plain names" in error("? [a]\n: 1\nrules: []\n")
    assert parse_rule_set("defaults: &d {limit: {pps: 1}}\nrules: []\n").defaults.limit.pps == 1
    assert "t.yaml:2: (document): YAML anchors and aliases are not allowed" in error("a: &x 1\nrules: *x\n")
    assert "more than one YAML document" in error("rules: []\n---\nrules: []\n")
    assert "empty document" in error("")
    assert "empty document" in error("# only a comment\n")
    # scalars keep YAML 1.1's types, but a value that does not convert stays text
    assert "must be a whole number, not a boolean (true)" in error("defaults:\n  limit: {pps: yes}\nrules: []\n")
    assert "must be a whole number, not a number (1.5)" in error("defaults:\n  limit: {pps: 1.5}\nrules: []\n")
    assert "must be a whole number, not empty" in error("defaults:\n  limit: {pps: ~}\nrules: []\n")


def test_no_suggestions_are_worked_out_past_the_error_cap(monkeypatch):
    import difflib

    calls = []
    real = difflib.get_close_matches
    monkeypatch.setattr(difflib, "get_close_matches", lambda *a, **k: calls.append(1) or real(*a, **k))
    text = "".join(f"key{i}: 1\n" for i in range(20_000)) + "rules: []\n"
    with pytest.raises(RuleSetError) as e:
        parse_rule_set(text)
    assert len(e.value.errors) == MAX_ERRORS and len(calls) == MAX_ERRORS


def test_echoed_values_are_cut():
    big = "x" * 100_000
    for text in (f"rules:\n  - name: a\n    protocol: '{big}'\n", f"rules:\n  - name: a\n    action: '{big}'\n",
                 f"allow: ['{big}']\nrules: []\n", f"allow: ['10.0.0.1/8{big}']\nrules: []\n",
                 f"{big}: 1\nrules: []\n", f"defaults:\n  limit: {{pps: {'9' * 4000}}}\nrules: []\n",
                 f"rules:\n  - name: a\n    {big}: 1\n    action: drop\n"):  # fmt: skip
        with pytest.raises(RuleSetError) as e:
            parse_rule_set(text, "s" * 10_000)
        assert all(len(x.message) < 300 and len(x.path) < 120 for x in e.value.errors), e.value.errors
        assert len(str(e.value)) < 1000


# ------------------------------------------------------- CIDR fast path
def _forms(draw_int, v6: bool, plen: int, style: int) -> str:
    import ipaddress

    net = (ipaddress.IPv6Network if v6 else ipaddress.IPv4Network)((draw_int, plen), strict=False)
    a = net.network_address if style % 3 else ipaddress.ip_address(draw_int if not v6 else draw_int)
    text = [str(a), a.exploded, str(a).upper(), str(a).replace(".", ".0", 1)][style % 4]
    return text + ("" if style % 5 == 0 else f"/{plen}" if style % 7 else f"/0{plen}")


@settings(max_examples=3000, deadline=None, database=None)
@given(st.one_of(
    st.builds(lambda i, p, s: _forms(i, False, p, s), st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 99)),
    st.builds(lambda i, p, s: _forms(i, True, p, s), st.integers(0, 2**128 - 1), st.integers(0, 128),
              st.integers(0, 99)),
    st.text(alphabet="0123456789abcdefABCDEF:./", max_size=50),
))  # fmt: skip
def test_the_cidr_fast_path_makes_what_ipaddress_makes(text):
    """Whatever cidrs.parse takes, ipaddress takes too, as the same network;
    what it leaves (None) ipaddress judges on its own."""
    import ipaddress

    from tidegate.ruleset import cidrs

    net = cidrs.parse(text)
    if net is None:
        return
    ref = ipaddress.ip_network(text, strict=True)
    assert (type(net), net, str(net), hash(net)) == (type(ref), ref, str(ref), hash(ref))


@settings(max_examples=1000, deadline=None, database=None)
@given(st.one_of(
    st.builds(lambda i, p, s: _forms(i, False, p, s), st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 99)),
    st.builds(lambda i, p, s: _forms(i, True, p, s), st.integers(0, 2**128 - 1), st.integers(0, 128),
              st.integers(0, 99)),
))  # fmt: skip
def test_the_cidr_fast_path_gives_the_key_and_text_an_apply_uses(text):
    """parse_entry's key and text are the network's unified key and str(),
    parse_entries gives the same per text, and a parsed list carries them
    for every network, in order, whichever path parsed it (the fast one, or
    ipaddress for the rest)."""
    import ipaddress

    from tidegate.kernel.layout import network_key
    from tidegate.ruleset import cidrs
    from tidegate.ruleset.parse import parse_rule_set

    entry = cidrs.parse_entry(text)
    assert cidrs.parse_entries([text, None]) == [entry, None]  # the list's loop gives what one parse gives
    if entry is not None:
        net, key, shown = entry
        assert vars(net).keys() == vars(ipaddress.ip_network(text)).keys()
        assert (key, shown) == (network_key(net), str(net))
    try:
        ref = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return
    others = [o for o in ("192.0.2.0/24", "2001:DB8::/32") if ipaddress.ip_network(o) != ref]  # no duplicate
    rs = parse_rule_set(f"allow: {[text, *others]}\nrules: []\n")
    assert rs.allow.unified_keys == [network_key(n) for n in rs.allow] and rs.allow[0] == ref
    assert rs.allow.texts == [str(n) for n in rs.allow] == rs.canonical["allow"]


def test_the_cidr_fast_path_takes_the_usual_shapes():
    from tidegate.ruleset import cidrs

    for text in ("10.0.0.0/8", "192.0.2.7", "0.0.0.0/0", "2001:db8::/32", "::/0", "::1",
                 "ffff:0000:0001:ffff:ffff:ffff:ffff:ffff/128", "fe80::/10"):  # fmt: skip
        assert cidrs.parse(text) is not None, text
    for text in ("10.0.0.1/8", "010.0.0.0/8", "256.0.0.0/8", "10.0.0.0/33", "2001:DB8::/32", "::1/129",
                 "1:2:3:4:5:6:7::", "::ffff:1.2.3.4/128", "10.0.0.0/255.0.0.0"):  # fmt: skip
        assert cidrs.parse(text) is None, text  # ipaddress decides (and words any error)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.one_of(st.integers(1, 65535), st.builds(lambda a, b: f"{min(a, b)}-{max(a, b)}",
                                                               st.integers(1, 65535), st.integers(1, 65535))),
                max_size=50))  # fmt: skip
def test_port_lists_print_as_the_emitter_prints_them(ports):
    from tidegate.ruleset.dump import _inline, _inline_ports

    assert _inline_ports(ports) == _inline(ports)


def test_validation_stops_at_the_error_cap():
    """Past MAX_ERRORS nothing more is worked out: a text of 150,000 bad
    CIDRs answers with the first 100, the same as when every one was checked."""
    text = "rules: 5\ndeny: [" + ", ".join(f"'{i}zz'" for i in range(150_000)) + "]\n"
    with pytest.raises(RuleSetError) as e:
        parse_rule_set(text)
    assert [x.path for x in e.value.errors] == [f"deny[{i}]" for i in range(MAX_ERRORS)]
