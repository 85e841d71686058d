"""Validation errors name the field and the file line, one case per kind of
mistake an operator makes (the hostile-input tests cover volume; these pin
down the message an operator reads)."""

from __future__ import annotations

import pytest

from tidegate.ruleset import RuleSetError, parse_rule_set

BASE = """\
defaults:
  limit: {pps: 100, burst: 100}
allow: ["10.1.0.0/16"]
rules:
  - name: dns
    protocol: udp
    dst_ports: [53]
    limit: {pps: 10, burst: 10}
  - name: web
    protocol: tcp
    dst_ports: [443]
    limit: {pps: 10, burst: 10}
"""

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

    from tidegate.ruleset import _inline, _inline_cidrs

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
    from tidegate.ruleset import dump_yaml

    plain = parse_rule_set(BASE)
    rs = parse_rule_set(BASE.replace("  limit: {pps: 100, burst: 100}\n",
                                     f"  limit: {{pps: 100, burst: 100}}\n  ipv6_unparsed_extensions: {policy}\n"))
    assert rs.defaults.ipv6_unparsed_extensions == policy and plain.defaults.ipv6_unparsed_extensions == "drop"
    text = dump_yaml(rs)
    assert parse_rule_set(text) == rs
    assert ("ipv6_unparsed_extensions" in text) == (policy != "drop")
    assert (rs.digest() == plain.digest()) == (policy == "drop"), "an explicit default is the same rule set"
