"""Validation errors name the field and the file line, one case per kind of
mistake an operator makes (the hostile-input tests cover volume; these pin
down the message an operator reads)."""

from __future__ import annotations

import pytest

from fixtures import rule_set
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import parse_rule_set

BASE = rule_set("errors-base")

# (what to replace in BASE, with what, expected path, expected line, words in the message)
CASES = [
    ("name: web", "name: dns", "rules[1].name", 9, "duplicate rule name 'dns'"),
    ('allow: ["10.1.0.0/16"]', 'allow: ["10.1.0.1/16"]', "allow[0]", 3, "host bits set"),
    ('allow: ["10.1.0.0/16"]', 'allow: ["10.1.0.0/33"]', "allow[0]", 3, "not a valid address"),
    ("limit: {pps: 10, burst: 10}\n  - name: web", "limit: {pps: 0, burst: 10}\n  - name: web",
     "rules[0].limit.pps", 8, "between 1 and"),
    ("protocol: udp", "protocol: sctp", "rules[0].protocol", 6, "tcp"),
    ("dst_ports: [53]", "dst_ports: [70000]", "rules[0].dst_ports[0]", 7, "65535"),
    ("dst_ports: [53]", 'dst_ports: "53"', "rules[0].dst_ports", 7, "list"),
    ("    protocol: tcp", "    protocl: tcp", "rules[1].protocl", 10, "protocol"),
    ("limit: {pps: 100, burst: 100}", "limit: {pps: true, burst: 100}", "defaults.limit.pps", 2, "number"),
    ("limit: {pps: 100, burst: 100}", "limit: {pps: 100, burst: 100}\n  ipv6_unparsed_extensions: allow",
     "defaults.ipv6_unparsed_extensions", 3, "must be one of drop, pass, default, got 'allow'"),
    ("limit: {pps: 100, burst: 100}", "limit: {pps: 100, burst: 100}\n  ipv6_unparsed_extensions: 1",
     "defaults.ipv6_unparsed_extensions", 3, "must be text"),
    ("name: web", "name: ipv6-ext", "rules[1].name", 9, "'ipv6-ext' is reserved"),
]


@pytest.mark.parametrize("old,new,path,line,words", CASES, ids=[c[2] for c in CASES])
def test_error_names_field_and_line(old, new, path, line, words):
    text = BASE.replace(old, new, 1)
    assert text != BASE
    with pytest.raises(RuleSetError) as ei:
        parse_rule_set(text, source="edge.yaml")
    errs = [e for e in ei.value.errors if e.path == path]
    assert errs, f"no error for {path}: {ei.value}"
    assert errs[0].line == line, str(ei.value)
    assert words in errs[0].message, errs[0].message
    assert f"edge.yaml:{line}: {path}: " in str(ei.value)


def test_too_many_cidrs_is_refused_before_the_kernel():
    allow = ", ".join(f'"10.{i // 256}.{i % 256}.0/24"' for i in range(65536))
    deny = ", ".join(f'"11.{i // 256}.{i % 256}.0/24"' for i in range(65535)) + ', "12.0.0.0/24", "12.0.1.0/24"'
    with pytest.raises(RuleSetError, match="CIDR entries .* the kernel holds at most 131072"):
        parse_rule_set(f"allow: [{allow}]\ndeny: [{deny}]\n", source="big.yaml")


def test_too_many_rules_names_the_limit_and_line():
    rules = "".join(f"  - {{name: r{i}, limit: {{pps: 1, burst: 1}}}}\n" for i in range(65))
    with pytest.raises(RuleSetError) as ei:
        parse_rule_set("rules:\n" + rules, source="many.yaml")
    e = ei.value.errors[0]
    assert e.path == "rules" and e.line == 2 and "at most 64" in e.message, str(ei.value)


def test_canonical_cidr_lists_print_exactly_as_pyyaml_does():
    """dump_yaml prints CIDR lists without PyYAML's emitter; the text must
    not change (stored versions and `tidegate diff` compare it)."""
    import ipaddress
    import random

    from tidegate.ruleset.dump import _inline, _inline_cidrs

    rnd = random.Random(5)
    nets = ["0.0.0.0/0", "::/0", "255.255.255.255/32", "::ffff:10.0.0.0/104", "2001:db8::/32", "fe80::/10"]
    for _ in range(2000):
        if rnd.random() < 0.5:
            nets.append(str(ipaddress.ip_network((rnd.getrandbits(32), 32), strict=False).supernet(rnd.randrange(33))))
        else:
            nets.append(str(ipaddress.ip_network((rnd.getrandbits(128), 128)).supernet(rnd.randrange(129))))
    for i in range(0, len(nets), 37):
        chunk = nets[i:i + 37]
        assert _inline_cidrs(chunk) == _inline(chunk)
    assert _inline_cidrs(nets) == _inline(nets)


@pytest.mark.parametrize("policy", ["drop", "pass", "default"])
def test_the_ipv6_extension_policy_round_trips_and_the_default_stays_out_of_the_text(policy):
    from tidegate.ruleset.dump import dump_yaml

    plain = parse_rule_set(BASE)
    rs = parse_rule_set(BASE.replace("  limit: {pps: 100, burst: 100}\n",
                                     f"  limit: {{pps: 100, burst: 100}}\n  ipv6_unparsed_extensions: {policy}\n"))
    assert rs.defaults.ipv6_unparsed_extensions == policy and plain.defaults.ipv6_unparsed_extensions == "drop"
    text = dump_yaml(rs)
    assert parse_rule_set(text) == rs
    assert ("ipv6_unparsed_extensions" in text) == (policy != "drop")
    assert (rs.digest() == plain.digest()) == (policy == "drop"), "an explicit default is the same rule set"


# Every message of the field validators, exactly: (document, [(path, line, message), ...]).
R = "\nrules: []\n"
MESSAGES = {
    "NaN": ("defaults: {limit: {pps: .nan}}" + R, [("defaults.limit.pps", 1, "must be a whole number, not NaN or infinity")]),
    "infinity": ("defaults: {limit: {pps: -.inf}}" + R,
                 [("defaults.limit.pps", 1, "must be a whole number, not NaN or infinity")]),
    "fraction": ("defaults: {limit: {pps: 1.5}}" + R, [("defaults.limit.pps", 1, "must be a whole number, not a number (1.5)")]),
    "boolean": ("defaults: {limit: {pps: true}}" + R,
                [("defaults.limit.pps", 1, "must be a whole number, not a boolean (true)")]),
    "text": ("defaults: {limit: {pps: fast}}" + R, [("defaults.limit.pps", 1, "must be a whole number, not text ('fast')")]),
    "list": ("defaults: {limit: {pps: [1]}}" + R, [("defaults.limit.pps", 1, "must be a whole number, not a list")]),
    "mapping": ("defaults: {limit: {pps: {a: 1}}}" + R, [("defaults.limit.pps", 1, "must be a whole number, not a mapping")]),
    "null": ("defaults: {limit: {pps: null}}" + R, [("defaults.limit.pps", 1, "must be a whole number, not empty")]),
    "under": ("defaults: {limit: {pps: 0, burst: 1000000001, bps: 7, burst_bytes: 63}}" + R, [
        ("defaults.limit.pps", 1, "must be between 1 and 1000000000, got 0"),
        ("defaults.limit.burst", 1, "must be between 1 and 1000000000, got 1000000001"),
        ("defaults.limit.bps", 1, "must be between 8 and 1000000000000, got 7"),
        ("defaults.limit.burst_bytes", 1, "must be between 64 and 10000000000, got 63")]),
    "over": ("defaults: {limit: {pps: 1000000001, burst: 0, bps: 1000000000001, burst_bytes: 10000000001}}" + R, [
        ("defaults.limit.pps", 1, "must be between 1 and 1000000000, got 1000000001"),
        ("defaults.limit.burst", 1, "must be between 1 and 1000000000, got 0"),
        ("defaults.limit.bps", 1, "must be between 8 and 1000000000000, got 1000000000001"),
        ("defaults.limit.burst_bytes", 1, "must be between 64 and 10000000000, got 10000000001")]),
    "no pps": ("defaults: {limit: {burst: 5}}" + R, [("defaults.limit.pps", 1, "is required")]),
    "burst_bytes alone": ("defaults: {limit: {pps: 5, burst_bytes: 100}}" + R,
                          [("defaults.limit.burst_bytes", 1, "needs `bps` next to it")]),
    "limit not a mapping": ("defaults: {limit: 5}" + R, [("defaults.limit", 1, "must be a mapping, not a number (5)")]),
    "misspelt key": ("defaults: {limit: {pps: 5, brust: 4}}" + R,
                     [("defaults.limit.brust", 1, "unknown key (did you mean `burst`?)")]),
    "unknown key": ("defaults: {limit: {pps: 5, zzz: 4}}" + R,
                    [("defaults.limit.zzz", 1, "unknown key (known: pps, burst, bps, burst_bytes)")]),
    "prefix lengths": ("defaults: {prefix_limit: {ipv4_prefix: 33, ipv6_prefix: 129, pps: 5}}" + R, [
        ("defaults.prefix_limit.ipv4_prefix", 1, "must be between 0 and 32, got 33"),
        ("defaults.prefix_limit.ipv6_prefix", 1, "must be between 0 and 128, got 129")]),
    "negative prefix lengths": ("defaults: {prefix_limit: {ipv4_prefix: -1, ipv6_prefix: -1, pps: 5, bps: 4}}" + R, [
        ("defaults.prefix_limit.ipv4_prefix", 1, "must be between 0 and 32, got -1"),
        ("defaults.prefix_limit.ipv6_prefix", 1, "must be between 0 and 128, got -1"),
        ("defaults.prefix_limit.bps", 1, "must be between 8 and 1000000000000, got 4")]),
    "prefix limit keys": ("defaults: {prefix_limit: {pps: 5, ipv4: 3}}" + R, [
        ("defaults.prefix_limit.ipv4", 1, "unknown key (known: ipv4_prefix, ipv6_prefix, pps, burst, bps, burst_bytes)")]),
    "prefix limit not a mapping": ("defaults: {prefix_limit: [1]}" + R,
                                   [("defaults.prefix_limit", 1, "must be a mapping, not a list")]),
    "address not text": ("allow: [5]" + R, [("allow[0]", 1, "must be an address or CIDR in quotes, not a number (5)")]),
    "host bits": ("allow: ['10.0.0.1/8']" + R, [("allow[0]", 1, "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?")]),
    "not an address": ("allow: ['10.0.0.0/33', 'x']" + R, [
        ("allow[0]", 1, "'10.0.0.0/33' is not a valid address or CIDR ('10.0.0.0/33' does not appear to be an IPv4 or "
                        "IPv6 network)"),
        ("allow[1]", 1, "'x' is not a valid address or CIDR ('x' does not appear to be an IPv4 or IPv6 network)")]),
    "a long value is not repeated": ("allow: ['" + "x" * 40 + "', '" + "y" * 41 + "']" + R, [
        ("allow[0]", 1, f"'{'x' * 40}' is not a valid address or CIDR ('{'x' * 40}' does not appear to be an IPv4 "
                        "or IPv6 network)"),
        ("allow[1]", 1, f"'{'y' * 40}'... is not a valid address or CIDR (see the value)")]),
    "not a list of CIDRs": ("deny: '10.0.0.0/8'" + R, [("deny", 1, "must be a list of CIDRs, not text ('10.0.0.0/8')")]),
    "listed twice": ("deny: ['10.0.0.0/8', ' 10.0.0.0/8', '10.0.0.0/8']" + R, [
        ("deny[1]", 1, "10.0.0.0/8 is listed twice (also item 0)"),
        ("deny[2]", 1, "10.0.0.0/8 is listed twice (also item 0)")]),
    "ports": ("defaults: {limit: {pps: 5}}\nrules: [{name: a, protocol: tcp, dst_ports: [0, 65536, '9-1', '0-5', true, "
              "1.5, 'a-b', '1-65536']}]\n", [
        ("rules[0].dst_ports[0]", 2, "port must be between 1 and 65535, got 0"),
        ("rules[0].dst_ports[1]", 2, "port must be between 1 and 65535, got 65536"),
        ("rules[0].dst_ports[2]", 2, "range '9-1' must satisfy 1 <= low <= high <= 65535"),
        ("rules[0].dst_ports[3]", 2, "range '0-5' must satisfy 1 <= low <= high <= 65535"),
        ("rules[0].dst_ports[4]", 2, 'must be a port number or a range like "8000-8100", not a boolean (true)'),
        ("rules[0].dst_ports[5]", 2, 'must be a port number or a range like "8000-8100", not a number (1.5)'),
        ("rules[0].dst_ports[6]", 2, "must be a port number or a range like \"8000-8100\", not text ('a-b')"),
        ("rules[0].dst_ports[7]", 2, "range '1-65536' must satisfy 1 <= low <= high <= 65535")]),
    "ports not a list": ("defaults: {limit: {pps: 5}}\nrules: [{name: a, protocol: tcp, dst_ports: 80}]\n", [
        ("rules[0].dst_ports", 2, 'must be a list of ports or ranges like "8000-8100", not a number (80)')]),
    "not text": ("defaults: {limit: {pps: 5}}\nrules: [{name: 5, protocol: [tcp]}]\n", [
        ("rules[0].name", 2, "must be text, not a number (5)"), ("rules[0].protocol", 2, "must be text, not a list")]),
    "defaults not a mapping": ("defaults: 5" + R, [("defaults", 1, "must be a mapping, not a number (5)")]),
    "unknown top-level key": ("zzz: 1" + R, [("zzz", 1, "unknown key (known: defaults, allow, deny, rules, canaries, "
                                                      "description)")]),
    "prefix limit without pps": ("defaults:\n  prefix_limit: {ipv4_prefix: 24}" + R,
                                 [("defaults.prefix_limit.pps", 2, "is required")]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MESSAGES))
def test_every_field_message(case):
    text, want = MESSAGES[case]
    with pytest.raises(RuleSetError) as ei:
        parse_rule_set(text, source="m.yaml")
    assert [(e.path, e.line, e.message) for e in ei.value.errors] == want


def test_what_the_field_validators_fill_in():
    from tidegate.ruleset.model import Limit, PortRange, PrefixLimit
    from tidegate.ruleset.parse import rule_set_from_dict

    d = rule_set_from_dict({"defaults": {"prefix_limit": {"pps": 5}, "limit": {"pps": 5, "bps": 800}}, "rules": None})
    assert d.defaults.prefix_limit == PrefixLimit(24, 48, Limit(5, 5)), "a prefix limit's prefixes default to /24, /48"
    assert d.defaults.limit == Limit(5, 5, 800, 100), "burst defaults to pps, burst_bytes to a second of bps"
    d = rule_set_from_dict({"defaults": {"prefix_limit": {"ipv4_prefix": 0, "ipv6_prefix": 0, "pps": 5}}})
    assert d.defaults.prefix_limit == PrefixLimit(0, 0, Limit(5, 5)), "/0: one aggregate bucket per family"
    d = rule_set_from_dict({"defaults": {"prefix_limit": {"ipv4_prefix": 32, "ipv6_prefix": 128, "pps": 5}}})
    assert (d.defaults.prefix_limit.ipv4_prefix, d.defaults.prefix_limit.ipv6_prefix) == (32, 128)
    d = rule_set_from_dict({"defaults": {"limit": {"pps": 5, "bps": 804}}})
    assert d.defaults.limit.burst_bytes == 100 and isinstance(d.defaults.limit.burst_bytes, int), "whole bytes"
    d = rule_set_from_dict({"defaults": {"limit": {"pps": 5, "burst": 7, "bps": 800, "burst_bytes": 300}}})
    assert d.defaults.limit == Limit(5, 7, 800, 300)
    d = rule_set_from_dict({"defaults": {"limit": {"pps": 5}}, "rules": [
        {"name": "a", "protocol": "TCP", "dst_ports": [1, 65535, " 10 - 20 ", "30-30", "1-2", "65000-65535"]}]})  # fmt: skip
    assert d.rules[0].protocol == "tcp"
    assert d.rules[0].dst_ports == (PortRange(1, 1), PortRange(65535, 65535), PortRange(10, 20), PortRange(30, 30),
                                    PortRange(1, 2), PortRange(65000, 65535))  # fmt: skip
    d = rule_set_from_dict({"allow": [" 10.0.0.0/8 ", "2001:db8::/32"], "deny": None, "rules": []})
    assert [str(n) for n in d.allow] == ["10.0.0.0/8", "2001:db8::/32"] and d.deny == ()


def test_rule_fields_print_exactly_as_pyyaml_does():
    """dump_yaml writes numbers, names and limits without the emitter; a
    word YAML reads as another type (yes, null, 1e3...) still goes through it."""
    from tidegate.ruleset.dump import _emit, _inline

    words = ["r0", "udp", "tcp", "any", "limit", "drop", "pass", "web-1", "a_b", "yes", "no", "on", "off", "true",
             "false", "null", "Yes", "NULL", "y", "n", "nan", "inf", "1e3", "0x10", "1:20", "-", "a:b", "a b", "", "é",
             "x" * 300, "default", "description with: colon", "#hash", "r-"]  # fmt: skip
    values = words + [0, 1, -5, 65535, 10**12, True, False, None, 1.5,
                      {"pps": 100, "burst": 200}, {"pps": 1, "burst": 1, "bps": 8000000, "burst_bytes": 1500}, {},
                      {"ipv4_prefix": 24, "ipv6_prefix": 48, "pps": 10, "burst": 20}, {"yes": 1}, {"pps": True},
                      {"pps": None}, {"a b": 1}]  # fmt: skip
    for v in values:
        assert _inline(v) == _emit(v), repr(v)
