"""Property-based bad input: more than 10,000 malformed or hostile rule sets.

Every one must either parse into a valid RuleSet or be rejected with a
RuleSetError that names a field (or the document) and says why; nothing
else may escape (no TypeError, RecursionError, ...). Which of the two is
not the parser's call: the mutated documents are judged by `expected`, the
README's rule-set schema written out independently of tidegate.ruleset.model,
and the parser must agree with it on every one (a validator that accepted
everything, or one missing a range check, would not)."""

from __future__ import annotations

import copy
import gc
import ipaddress
import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.ruleset.model import RuleSet, RuleSetError
from tidegate.ruleset.parse import parse_rule_set, rule_set_from_dict

VALID = {
    "defaults": {"limit": {"pps": 1000, "burst": 2000}, "ipv4_prefix": 32, "ipv6_prefix": 64},
    "allow": ["10.1.0.0/16", "2001:db8:1::/48"],
    "deny": ["192.0.2.0/24"],
    "rules": [
        {"name": "dns", "protocol": "udp", "dst_ports": [53], "sources": ["0.0.0.0/0", "::/0"],
         "limit": {"pps": 100, "burst": 100}, "block_seconds": 10},
        {"name": "web", "protocol": "tcp", "dst_ports": [80, "8000-8100"],
         "prefix_limit": {"ipv4_prefix": 24, "pps": 10, "burst": 10}},
    ],
}  # fmt: skip

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["0.0.0.0/33", "10.0.0.1/8", "::/129", "1.2.3", "fe80::1%eth0", "тест", "dns\x00", "8000-70000",
                     "\u202e", "a" * 300, "-1", "1e9", "0x10", "NaN", "[]", "{}", "web\n", " 10.9.0.0/16 ", "UDP",
                     "icmp", "dns", "192.0.2.0/24", "10.1.0.0/16", "1-65535", "80-80", "0", "a" * 32, "a" * 33]),
    st.lists(st.integers(), max_size=3),
    st.just(list(range(70000))),
    st.just(["10.0.0.0/8"] * 3),
    st.recursive(st.integers(), lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                 max_leaves=30),
)  # fmt: skip


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(VALID) if p]


def mutate(doc, path, value, mode):
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if mode == "replace":
        parent[last] = value
    elif mode == "delete":
        del parent[last]
    elif mode == "rename" and isinstance(parent, dict):
        parent[f"{last}_x"] = parent.pop(last)
    elif mode == "wrap":
        parent[last] = [parent[last]] * 2
    return doc


def check(result_or_exc, doc=None):
    if isinstance(result_or_exc, RuleSet):
        assert doc is None or expected(doc) is True, f"accepted an invalid rule set: {doc!r}"
        return
    assert isinstance(result_or_exc, RuleSetError), type(result_or_exc)
    assert doc is None or expected(doc) is False, f"rejected a valid rule set: {doc!r}\n{result_or_exc}"
    assert result_or_exc.errors and str(result_or_exc).strip()
    for e in result_or_exc.errors:
        assert e.message.strip()


# ------------------------------------------------------------ the schema
# The README's rule-set format, as plain predicates over the loaded data.
class Invalid(Exception):
    pass


def _need(ok: bool) -> None:
    if not ok:
        raise Invalid


def _whole(v, lo: int, hi: int) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)
    return v


def _keys(d, allowed: set) -> dict:
    _need(isinstance(d, dict) and set(d) <= allowed)
    return d


def _cidrs(v) -> list:
    if v is None:
        return []
    _need(isinstance(v, list))
    out = []
    for item in v:
        _need(isinstance(item, str))
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError:
            raise Invalid from None
        _need(net not in out)  # listed twice
        out.append(net)
    return out


def _limit(d, allowed=frozenset({"pps", "burst", "bps", "burst_bytes"})) -> dict:
    _keys(d, set(allowed))
    _need("pps" in d)
    _whole(d["pps"], 1, 10**9)
    if "burst" in d:
        _whole(d["burst"], 1, 10**9)
    if "bps" in d:
        _whole(d["bps"], 8, 10**12)
    if "burst_bytes" in d:
        _whole(d["burst_bytes"], 64, 10**10)
        _need("bps" in d)
    return d


def _prefix_limit(d) -> dict:
    _keys(d, {"ipv4_prefix", "ipv6_prefix", "pps", "burst", "bps", "burst_bytes"})
    if "ipv4_prefix" in d:
        _whole(d["ipv4_prefix"], 0, 32)
    if "ipv6_prefix" in d:
        _whole(d["ipv6_prefix"], 0, 128)
    return _limit(d, allowed=frozenset(d))


def _ports(v) -> list[tuple[int, int]]:
    if v is None:
        return []
    _need(isinstance(v, list))
    out = []
    for p in v:
        if isinstance(p, int) and not isinstance(p, bool):
            out.append((_whole(p, 1, 65535),) * 2)
            continue
        _need(isinstance(p, str))
        m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", p)
        _need(m is not None)
        lo, hi = int(m.group(1)), int(m.group(2))
        _need(1 <= lo <= hi <= 65535)
        out.append((lo, hi))
    return out


def _valid(doc) -> None:
    _keys(doc, {"defaults", "allow", "deny", "rules", "canaries", "description"})
    default_limit = None
    d = doc.get("defaults")
    if d is not None:
        _keys(d, {"limit", "ipv4_prefix", "ipv6_prefix", "prefix_limit", "block_seconds", "ipv6_unparsed_extensions"})
        if "limit" in d:
            default_limit = _limit(d["limit"])
        if "ipv4_prefix" in d:
            _whole(d["ipv4_prefix"], 1, 32)
        if "ipv6_prefix" in d:
            _whole(d["ipv6_prefix"], 1, 128)
        if "prefix_limit" in d:
            _prefix_limit(d["prefix_limit"])
        if "block_seconds" in d:
            _whole(d["block_seconds"], 0, 86400)
        if "ipv6_unparsed_extensions" in d:
            _need(d["ipv6_unparsed_extensions"] in ("drop", "pass", "default"))
    allow, deny, canaries = _cidrs(doc.get("allow")), _cidrs(doc.get("deny")), _cidrs(doc.get("canaries"))
    _need(not set(allow) & set(deny))
    if doc.get("description") is not None:
        _need(isinstance(doc["description"], str) and len(doc["description"]) <= 1024)
    rules = doc.get("rules")
    rules = [] if rules is None else rules
    _need(isinstance(rules, list) and len(rules) <= 64)
    names, cidrs, port_entries = set(), len(allow) + len(deny) + len(canaries), set()
    for r in rules:
        _keys(r, {"name", "protocol", "dst_ports", "sources", "action", "limit", "prefix_limit", "block_seconds"})
        name = r.get("name")
        _need(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", name) is not None)
        _need(name not in ("default", "deny-list", "allow-list", "ipv6-ext") and name not in names)
        names.add(name)
        protocol = r.get("protocol", "any")
        _need(isinstance(protocol, str) and protocol.lower() in ("tcp", "udp", "icmp", "icmpv6", "any"))
        ports = _ports(r.get("dst_ports"))
        _need(not (ports and protocol.lower() in ("icmp", "icmpv6")))
        cidrs += len(_cidrs(r.get("sources")))
        action = r.get("action", "limit")
        _need(action in ("limit", "pass", "drop"))
        if "limit" in r:
            _need(action == "limit")
            _limit(r["limit"])
        else:
            _need(action != "limit" or default_limit is not None)
        if r.get("prefix_limit") is not None:
            _need(action == "limit")
            _prefix_limit(r["prefix_limit"])
        if "block_seconds" in r:
            _whole(r["block_seconds"], 0, 86400)
        for proto in {"tcp": (6,), "udp": (17,), "any": (6, 17)}.get(protocol.lower(), ()):
            for lo, hi in ports:
                port_entries.update((proto, p) for p in range(lo, min(hi, lo + 8192) + 1))
    _need(cidrs <= 131072 and len(port_entries) <= 8192)


def expected(doc) -> bool:
    """Is this document a valid rule set, by the schema above?"""
    try:
        _valid(doc)
    except Invalid:
        return False
    return True


def test_the_schema_judges_the_known_cases():
    assert expected(VALID) is True
    bad = [("defaults", "limit", "pps", 0), ("rules", 0, "limit", "burst", 1.0), ("allow", 0, "10.1.0.1/16"),
           ("deny", 0, "10.1.0.0/16"), ("rules", 1, "name", "dns"), ("rules", 0, "protocol", "icmp"),
           ("rules", 1, "dst_ports", 1, "8100-8000"), ("rules", 0, "name", "dns\n"), ("defaults", "ipv4_prefix", 0),
           ("rules", 1, "prefix_limit", "ipv4_prefix", 33), ("rules", 0, "block_seconds", True)]  # fmt: skip
    for *path, value in bad:
        assert expected(mutate(VALID, tuple(path), value, "replace")) is False, path
    assert expected(mutate(VALID, ("rules", 1, "prefix_limit"), None, "replace")) is True
    assert expected(mutate(VALID, ("defaults", "limit"), None, "delete")) is False  # web inherits it


def run(fn, *args):
    try:
        return fn(*args)
    except RuleSetError as e:
        return e


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """The objects earlier tests left alive are moved out of the cyclic collector's sight while these
    tests make and drop thousands of large documents (a 70,000-item list among them): inside the full
    suite the collector walked that heap again and again, and these tests took minutes more than alone."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


# TIDEGATE_HYPOTHESIS_SCALE scales every example count (mutmut runs these tests once per mutant)
SCALE = float(os.environ.get("TIDEGATE_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> int:
    return max(20, int(n * SCALE))


SETTINGS = settings(max_examples=examples(3000), deadline=None, suppress_health_check=list(HealthCheck), database=None)


@SETTINGS
@given(st.sampled_from(ALL_PATHS), HOSTILE, st.sampled_from(["replace", "delete", "rename", "wrap"]))
def test_mutated_documents_as_data(path, value, mode):
    doc = mutate(VALID, path, value, mode)
    check(run(rule_set_from_dict, doc), doc)


@SETTINGS
@given(st.sampled_from(ALL_PATHS), HOSTILE, st.sampled_from(["replace", "delete", "rename", "wrap"]))
def test_mutated_documents_as_yaml(path, value, mode):
    doc = mutate(VALID, path, value, mode)
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except Exception:
        return
    res = run(parse_rule_set, text, "h.yaml")
    if isinstance(res, RuleSet) != expected(doc):
        doc = yaml.safe_load(text)  # judge exactly what the parser read (parsing every text costs a minute)
    check(res, doc)
    if isinstance(res, RuleSetError):
        # YAML errors carry lines
        assert any(e.line for e in res.errors) or all(not e.path for e in res.errors)


@settings(max_examples=examples(2500), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.text(max_size=400))
def test_random_text(text):
    check(run(parse_rule_set, text, "r.yaml"))


@settings(max_examples=examples(1500), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=300))
def test_random_bytes(data):
    check(run(parse_rule_set, data, "b.yaml"))


@settings(max_examples=examples(500), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.integers(min_value=1, max_value=2000), st.sampled_from(["[", "{", "- "]))
def test_deep_nesting(depth, opener):
    text = "rules: " + opener * depth
    check(run(parse_rule_set, text, "deep.yaml"))


@settings(max_examples=examples(500), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.sampled_from(["pps", "burst", "block_seconds", "ipv4_prefix"]),
       st.sampled_from(["1.0", ".nan", "-.inf", "1e400", "true", "0x1F", "99999999999999999999999", "-0", "1_000"]))  # fmt: skip
def test_numbers_that_are_not_whole_numbers(field, literal):
    text = f"""
defaults:
  limit: {{pps: 10, burst: 10}}
rules:
  - name: x
    limit: {{pps: 10, burst: 10}}
    block_seconds: 0
""".replace(f"{field}: 10", f"{field}: {literal}", 1).replace(f"{field}: 0", f"{field}: {literal}", 1)
    res = run(parse_rule_set, text, "n.yaml")
    check(res)


def test_duplicate_keys_and_aliases_rejected_with_lines():
    res = run(parse_rule_set, "rules: []\nrules: []\n", "d.yaml")
    assert isinstance(res, RuleSetError) and res.errors[0].line == 2
    res = run(parse_rule_set, "defaults: &d {block_seconds: 1}\nrules: *d\n", "a.yaml")
    assert isinstance(res, RuleSetError) and "alias" in str(res)
