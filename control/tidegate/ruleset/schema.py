"""A JSON Schema (draft 2020-12) for rule-set files, for editors (YAML
language servers read it through a `# yaml-language-server: $schema=...`
line or their settings).

It is built from the validator's own model in ruleset.py: the key lists
(TOP_KEYS, DEFAULT_KEYS, RULE_KEYS, LIMIT_KEYS, PREFIX_KEYS), the ranges
(MAX_PPS, ...), PROTOCOLS, ACTIONS, IPV6_EXT_POLICIES and NAME_RE, so a key
or a bound added there appears here. The schema is the editor's view: what
needs the whole file (duplicate names, an entry on both lists, the kernel's
capacity, host bits in a CIDR) is left to `tidegate validate`.
`tidegate schema` prints it; deploy/tidegate-rules.schema.json is its
output, checked by tests/unit/test_schema.py.
"""

from __future__ import annotations

import json

from tidegate.ruleset import model as m

SCHEMA_ID = "https://tidegate.dev/schema/rules.schema.json"

_CIDR = {"type": "string", "description": "an IPv4 or IPv6 address or CIDR (no host bits), quoted",
         "pattern": r"^\s*[0-9A-Fa-f:.]+(/[0-9]{1,3})?\s*$"}  # fmt: skip
_CIDRS = {"type": ["array", "null"], "items": _CIDR}


def _int(lo: int, hi: int, description: str) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi, "description": description}


_LIMIT_PROPS = {
    "pps": _int(1, m.MAX_PPS, "packets per second per source"),
    "burst": _int(1, m.MAX_BURST, "bucket size in packets (default: pps)"),
    "bps": _int(8, m.MAX_BPS, "bits per second per source (optional)"),
    "burst_bytes": _int(64, m.MAX_BURST_BYTES, "byte bucket size (needs bps; default bps/8)"),
}


def _object(keys: tuple[str, ...], props: dict, required=(), description: str = "", null: bool = False) -> dict:
    missing = set(keys) - set(props)
    assert not missing, f"schema lacks {missing}"  # the model grew a key: describe it here
    out = {"type": ["object", "null"] if null else "object", "additionalProperties": False,
           "properties": {k: props[k] for k in keys}}  # fmt: skip
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def rule_set_schema() -> dict:
    limit = _object(m.LIMIT_KEYS, _LIMIT_PROPS, ("pps",), "a token bucket: rate and burst")
    prefix = _object(m.PREFIX_KEYS, {
        "ipv4_prefix": _int(0, 32, "IPv4 prefix the limit applies to (0: one bucket for all, default 24)"),
        "ipv6_prefix": _int(0, 128, "IPv6 prefix the limit applies to (0: one bucket for all, default 48)"),
        **_LIMIT_PROPS}, ("pps",), "a limit on the sum of a prefix's sources", null=True)  # fmt: skip
    block = _int(0, m.MAX_BLOCK_SECONDS, "seconds a source over its limit stays dropped")
    port = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                      {"type": "string", "pattern": r"^\s*\d{1,5}\s*-\s*\d{1,5}\s*$"}]}  # fmt: skip
    defaults = _object(m.DEFAULT_KEYS, {
        "limit": limit,
        "ipv4_prefix": _int(1, 32, "per-source key: IPv4 source masked to this prefix (default 32)"),
        "ipv6_prefix": _int(1, 128, "per-source key: IPv6 source masked to this prefix (default 64)"),
        "prefix_limit": prefix,
        "block_seconds": block,
        "ipv6_unparsed_extensions": {"enum": list(m.IPV6_EXT_POLICIES)},
    }, description="what rules inherit, and the limit for traffic no rule matches", null=True)  # fmt: skip
    rule = _object(m.RULE_KEYS, {
        "name": {"type": "string", "pattern": "^" + m.NAME_RE.pattern + "$",
                 "not": {"enum": sorted(m.RESERVED_NAMES)}},
        "protocol": {"enum": list(m.PROTOCOLS)},
        "dst_ports": {"type": ["array", "null"], "items": port},
        "sources": _CIDRS,
        "action": {"enum": list(m.ACTIONS)},
        "limit": limit,
        "prefix_limit": prefix,
        "block_seconds": block,
    }, ("name",), "the first rule matching protocol, destination port and source applies")  # fmt: skip
    top = _object(m.TOP_KEYS, {
        "defaults": defaults,
        "allow": {**_CIDRS, "description": "always passed (wins over everything)"},
        "deny": {**_CIDRS, "description": "always dropped"},
        "rules": {"type": ["array", "null"], "items": rule},
        "canaries": {**_CIDRS, "description": "known-good clients: a change that would drop one is refused"},
        "description": {"type": ["string", "null"], "maxLength": m.MAX_DESCRIPTION},
    })  # fmt: skip
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "tidegate rule set", **top}  # fmt: skip


def schema_text() -> str:
    return json.dumps(rule_set_schema(), indent=2, sort_keys=True) + "\n"
