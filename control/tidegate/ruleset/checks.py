"""Checks a pipeline can gate on: warnings about a valid rule set that does
not do what its author probably meant (`tidegate validate` prints them,
`--strict` fails on them; cli/changes.py).

Warnings (pure logic on the validated model, no agent needed):

- no-defaults: no `defaults.limit`, so unmatched traffic passes unlimited;
- deny-inside-allow: a deny entry inside an allow entry never fires (allow
  wins over everything);
- shadowed-rule: a rule that can never match because an earlier rule
  matches every packet it would (the first matching rule wins).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

import yaml

from tidegate.ruleset.model import PortRange, Rule, RuleSet

_ANY4 = ipaddress.ip_network("0.0.0.0/0")
_ANY6 = ipaddress.ip_network("::/0")


@dataclass(frozen=True)
class RuleWarning:
    code: str
    path: str
    line: int | None
    message: str

    def text(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path or '(document)'}: warning: {self.message}"


def covers_net(outer, inner) -> bool:
    return outer.version == inner.version and inner.subnet_of(outer)


def _ports_cover(outer: tuple[PortRange, ...], inner: tuple[PortRange, ...]) -> bool:
    if not outer:
        return True  # any port (and packets without one)
    if not inner:
        return False  # inner also matches packets with no port (ICMP) or any port
    return all(any(o.lo <= i.lo and i.hi <= o.hi for o in outer) for i in inner)


def _sources_cover(outer: Rule, inner: Rule) -> bool:
    if not outer.sources:
        return True
    inner_sources = inner.sources or (_ANY4, _ANY6)
    return all(any(covers_net(o, i) for o in outer.sources) for i in inner_sources)


def _covers(earlier: Rule, later: Rule) -> bool:
    """Every packet `later` matches is matched by `earlier` first."""
    proto = earlier.protocol == "any" or earlier.protocol == later.protocol
    return proto and _ports_cover(earlier.dst_ports, later.dst_ports) and _sources_cover(earlier, later)


def _lines(text: str | None) -> dict[str, int]:
    """path -> 1-based line of the YAML node, for the paths warnings name."""
    if not text:
        return {}
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: ~8x faster
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return out
    for k, v in root.value:
        out[k.value] = k.start_mark.line + 1
        if isinstance(v, yaml.SequenceNode):
            for i, item in enumerate(v.value):
                out[f"{k.value}[{i}]"] = item.start_mark.line + 1
    return out


def first_allow_around(deny, allow) -> list[int | None]:
    """For each deny network, the index of the first allow network that
    contains it (covers_net), or None. The allow networks are looked up by
    prefix length, so a list of 100,000 against 100,000 costs a dict lookup
    per deny entry and length, not a comparison per pair (which took
    minutes: `tidegate validate` of such a file)."""
    first: dict[tuple[int, int], dict[int, int]] = {}  # (version, length) -> network address -> first index
    for j, a in enumerate(allow):
        first.setdefault((a.version, a.prefixlen), {}).setdefault(int(a.network_address), j)
    lengths = {v: sorted(p for (fam, p) in first if fam == v) for v in (4, 6)}
    out: list[int | None] = []
    for d in deny:
        bits, addr, found = d.max_prefixlen, int(d.network_address), None
        for p in lengths[d.version]:
            if p > d.prefixlen:
                break
            j = first[(d.version, p)].get(addr >> (bits - p) << (bits - p))
            if j is not None and (found is None or j < found):
                found = j
        out.append(found)
    return out


def warnings(rs: RuleSet, text: str | None = None) -> list[RuleWarning]:
    lines = _lines(text)
    out: list[RuleWarning] = []
    if rs.defaults.limit is None:
        out.append(RuleWarning("no-defaults", "defaults.limit", lines.get("defaults"),
                           "no default limit: traffic no rule matches passes unlimited"))  # fmt: skip
    allow = rs.allow
    for (i, d), j in zip(enumerate(rs.deny), first_allow_around(rs.deny, allow)):
        if j is not None:
            a = allow[j]
            out.append(RuleWarning("deny-inside-allow", f"deny[{i}]", lines.get(f"deny[{i}]"),
                                   f"{d} lies inside allow[{j}] {a}: allow wins, this entry never fires"))  # fmt: skip
    for i, later in enumerate(rs.rules):
        for earlier in rs.rules[:i]:
            if _covers(earlier, later):
                out.append(RuleWarning("shadowed-rule", f"rules[{i}]", lines.get(f"rules[{i}]"),
                                   f"rule {later.name!r} never matches: rule {earlier.name!r} before it matches "
                                   "every packet it would (the first matching rule wins)"))  # fmt: skip
                break
    return out


def warnings_json(ws: list[RuleWarning]) -> list[dict]:
    return [asdict(w) | {"line": w.line or 0} for w in ws]
