"""The published JSON Schema of rule-set files: it is what `tidegate schema`
prints, every example validates against it, and it refuses what the
validator refuses field by field (unknown keys, out-of-range numbers, bad
enums, a missing name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tidegate.ruleset import model as ruleset
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import parse_rule_set
from tidegate.ruleset.schema import rule_set_schema, schema_text

jsonschema = pytest.importorskip("jsonschema", reason="Debian's python3-jsonschema (make install)")

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "tidegate-rules.schema.json"


def validator():
    return jsonschema.Draft202012Validator(rule_set_schema())


def test_the_shipped_file_is_the_generated_schema():
    assert SHIPPED.read_text() == schema_text(), "regenerate: tidegate schema > deploy/tidegate-rules.schema.json"
    jsonschema.Draft202012Validator.check_schema(json.loads(SHIPPED.read_text()))


def test_every_model_key_is_described():
    s = rule_set_schema()
    rule = s["properties"]["rules"]["items"]
    assert set(s["properties"]) == set(ruleset.TOP_KEYS)
    assert set(s["properties"]["defaults"]["properties"]) == set(ruleset.DEFAULT_KEYS)
    assert set(rule["properties"]) == set(ruleset.RULE_KEYS)
    assert set(rule["properties"]["limit"]["properties"]) == set(ruleset.LIMIT_KEYS)
    assert set(rule["properties"]["prefix_limit"]["properties"]) == set(ruleset.PREFIX_KEYS)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_against_the_schema(path):
    data = yaml.safe_load(path.read_text())
    errors = [e.message for e in validator().iter_errors(data)]
    assert errors == []
    parse_rule_set(path.read_text(), str(path))  # and the validator agrees


BASE = {"defaults": {"limit": {"pps": 10}}, "rules": [{"name": "a", "protocol": "udp", "dst_ports": [53]}]}


@pytest.mark.parametrize("change", [
    lambda d: d.update(rulez=[]),                                        # unknown top-level key
    lambda d: d["defaults"]["limit"].update(pps=0),                      # below the range
    lambda d: d["defaults"]["limit"].update(pps=ruleset.MAX_PPS + 1),    # above it
    lambda d: d["defaults"]["limit"].update(pps=True) or d["defaults"]["limit"].update(pps="10"),
    lambda d: d["rules"][0].update(protocol="sctp"),
    lambda d: d["rules"][0].update(action="reject"),
    lambda d: d["rules"][0].pop("name"),
    lambda d: d["rules"][0].update(name="default"),                      # reserved
    lambda d: d["rules"][0].update(name="has space"),
    lambda d: d["rules"][0].update(dst_ports=[70000]),
    lambda d: d["rules"][0].update(limt={"pps": 1}),                     # typo
    lambda d: d["defaults"].update(ipv6_unparsed_extensions="maybe"),
])  # fmt: skip
def test_schema_and_validator_refuse_the_same_field_errors(change):
    import copy

    d = copy.deepcopy(BASE)
    change(d)
    assert list(validator().iter_errors(d)), d
    with pytest.raises(RuleSetError):
        parse_rule_set(yaml.safe_dump(d))
    d0 = copy.deepcopy(BASE)
    assert not list(validator().iter_errors(d0))
    parse_rule_set(yaml.safe_dump(d0))
