"""A rule set written back as YAML for people: canonical order, short lists inline."""

from __future__ import annotations

import re

import yaml

from tidegate.ruleset import cidrs
from tidegate.ruleset.model import RuleSet


def _inline(value) -> str:
    """A value in YAML flow style. The shapes a rule's fields mostly are
    (a number, a name, a limit's {pps: N, burst: N}) are written here: the
    emitter takes ~60 us a value, ~9 ms of a 50-rule set's canonical text.
    Anything else, and a word YAML would read as another type, is left to
    _emit (tests/unit/test_ruleset_errors.py compares the two)."""
    if type(value) is int:
        return str(value)
    if type(value) is str and _is_plain_word(value):
        return value
    if type(value) is dict and all(type(k) is str and _is_plain_word(k) and type(v) is int for k, v in value.items()):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return _emit(value)


_PLAIN_WORD = re.compile(r"[a-z][a-z0-9_-]*")
_YAML_WORDS = {"yes", "no", "true", "false", "on", "off", "null"}  # lower-case words YAML 1.1 reads as bool/null


def _is_plain_word(text: str) -> bool:
    return _PLAIN_WORD.fullmatch(text) is not None and text not in _YAML_WORDS


def _emit(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


_PLAIN_V4 = re.compile(r"[0-9.]+/[0-9]+")
# _PLAIN_V4 items joined by ", " (possessively: no state kept per item to give back, which fullmatch
# never needs here; kept, it is megabytes for 100,000 items, fresh pages in the agent)
_PLAIN_V4_LIST = re.compile(r"[0-9.]+/[0-9]+(?:, [0-9.]+/[0-9]+)*+")
_QUOTED_V6 = re.compile(r"[0-9a-f.]*:[0-9a-f:.]*/[0-9]+")


def _inline_cidrs(cidrs: list[str]) -> str:
    """_inline of a list of CIDR strings, without PyYAML's emitter per item
    (40 us each: most of a 10,000-entry apply, 3 s for 131,072 IPv6 ones).
    IPv4 CIDRs are plain scalars in a flow sequence, IPv6 ones (':' is a flow
    indicator) single-quoted; anything else is left to PyYAML, so the text is
    exactly what _inline prints (tests/unit/test_ruleset_errors.py)."""
    joined = ", ".join(cidrs)
    # IPv4 only, the common large list: one match for all of it (and no item holding the separator)
    if joined.count(", ") == len(cidrs) - 1 and _PLAIN_V4_LIST.fullmatch(joined):
        return f"[{joined}]"
    return "[" + ", ".join(c if _PLAIN_V4.fullmatch(c) else f"'{c}'" if _QUOTED_V6.fullmatch(c)
                           else _inline([c])[1:-1] for c in cidrs) + "]"  # fmt: skip


def _inline_ports(ports: list) -> str:
    """_inline of dst_ports (ints and "lo-hi" strings, both plain scalars) without the emitter per item."""
    return "[" + ", ".join(str(p) for p in ports) + "]"


def dump_yaml(rule_set: RuleSet) -> str:
    """Canonical YAML text of a rule set (round-trips through parse_rule_set):
    block style for sections and rules, flow style for values."""
    d = rule_set.canonical
    out = []
    if "description" in d:
        out.append(f"description: {_inline(d['description'])}")
    out.append("defaults:")
    out += [f"  {k}: {_inline(v)}" for k, v in d["defaults"].items()]
    for key in ("allow", "deny", "canaries"):
        if key in d:
            out.append(f"{key}: {_inline_cidrs(d[key])}")
    if not d["rules"]:
        out.append("rules: []")
    else:
        out.append("rules:")
        for r in d["rules"]:
            items = list(r.items())
            out.append(f"  - {items[0][0]}: {_inline(items[0][1])}")
            inline = {"sources": _inline_cidrs, "dst_ports": _inline_ports}
            out += [f"    {k}: {inline.get(k, _inline)(v)}" for k, v in items[1:]]
    return "\n".join(out) + "\n"

