"""Property-based bad input: more than 10,000 malformed or hostile rule sets.

Every one must either parse into a valid RuleSet or be rejected with a
RuleSetError that names a field (or the document) and says why; nothing
else may escape (no TypeError, RecursionError, ...)."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.ruleset import RuleSet, RuleSetError, parse_rule_set, rule_set_from_dict

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
                     "\u202e", "a" * 300, "-1", "1e9", "0x10", "NaN", "[]", "{}"]),
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


def check(result_or_exc):
    if isinstance(result_or_exc, RuleSet):
        return
    assert isinstance(result_or_exc, RuleSetError), type(result_or_exc)
    assert result_or_exc.errors and str(result_or_exc).strip()
    for e in result_or_exc.errors:
        assert e.message.strip()


def run(fn, *args):
    try:
        return fn(*args)
    except RuleSetError as e:
        return e


SETTINGS = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@SETTINGS
@given(st.sampled_from(ALL_PATHS), HOSTILE, st.sampled_from(["replace", "delete", "rename", "wrap"]))
def test_mutated_documents_as_data(path, value, mode):
    doc = mutate(VALID, path, value, mode)
    check(run(rule_set_from_dict, doc))


@SETTINGS
@given(st.sampled_from(ALL_PATHS), HOSTILE, st.sampled_from(["replace", "delete", "rename", "wrap"]))
def test_mutated_documents_as_yaml(path, value, mode):
    doc = mutate(VALID, path, value, mode)
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except Exception:
        return
    res = run(parse_rule_set, text, "h.yaml")
    check(res)
    if isinstance(res, RuleSetError):
        # YAML errors carry lines
        assert any(e.line for e in res.errors) or all(not e.path for e in res.errors)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.text(max_size=400))
def test_random_text(text):
    check(run(parse_rule_set, text, "r.yaml"))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=300))
def test_random_bytes(data):
    check(run(parse_rule_set, data, "b.yaml"))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.integers(min_value=1, max_value=2000), st.sampled_from(["[", "{", "- "]))
def test_deep_nesting(depth, opener):
    text = "rules: " + opener * depth
    check(run(parse_rule_set, text, "deep.yaml"))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
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
