"""Checks a pipeline can gate on: warnings about a valid rule set that does
not do what its author probably meant (`tidegate validate`, `--strict`
fails on them), the comparison of a file with the agent's active version
(`tidegate diff FILE`), and errors as JSON for `-o json`.

Warnings (pure logic on the validated model, no agent needed):

- no-defaults: no `defaults.limit`, so unmatched traffic passes unlimited;
- deny-inside-allow: a deny entry inside an allow entry never fires (allow
  wins over everything);
- shadowed-rule: a rule that can never match because an earlier rule
  matches every packet it would (the first matching rule wins).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import asdict, dataclass

import yaml

from tidegate.ruleset.model import PortRange, Rule, RuleSet

# exit codes of the checking verbs, next to the CLI's 0-4 and 130
EXIT_CHECK_REFUSED = 5  # whatif / validate --against-agent: over budget, or a canary would be dropped
EXIT_WARNINGS = 6  # validate --strict: valid, with warnings
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


def _covers_net(outer, inner) -> bool:
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
    return all(any(_covers_net(o, i) for o in outer.sources) for i in inner_sources)


def _covers(earlier: Rule, later: Rule) -> bool:
    """Every packet `later` matches is matched by `earlier` first."""
    proto = earlier.protocol == "any" or earlier.protocol == later.protocol
    return proto and _ports_cover(earlier.dst_ports, later.dst_ports) and _sources_cover(earlier, later)


def _lines(text: str | None) -> dict[str, int]:
    """path -> 1-based line of the YAML node, for the paths warnings name."""
    if not text:
        return {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
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


def warnings(rs: RuleSet, text: str | None = None) -> list[RuleWarning]:
    lines = _lines(text)
    out: list[RuleWarning] = []
    if rs.defaults.limit is None:
        out.append(RuleWarning("no-defaults", "defaults.limit", lines.get("defaults"),
                           "no default limit: traffic no rule matches passes unlimited"))  # fmt: skip
    for i, d in enumerate(rs.deny):
        for j, a in enumerate(rs.allow):
            if _covers_net(a, d):
                out.append(RuleWarning("deny-inside-allow", f"deny[{i}]", lines.get(f"deny[{i}]"),
                                   f"{d} lies inside allow[{j}] {a}: allow wins, this entry never fires"))  # fmt: skip
                break
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


# ------------------------------------------------------------ diff FILE
def file_against_active(cl, text: str, source: str) -> tuple[int, list[str]]:
    """(active version or 0, unified diff lines) of FILE's canonical YAML
    against the agent's active version."""
    import difflib

    from tidegate.ruleset.model import dump_yaml, parse_rule_set

    candidate = dump_yaml(parse_rule_set(text, source))
    active = cl.call("GetStatus", cl.pb.GetStatusRequest()).active_version
    current = cl.call("GetVersion", cl.pb.GetVersionRequest(number=active)).yaml if active else ""
    label = f"active version {active}" if active else "no active version"
    lines = list(difflib.unified_diff(current.splitlines(), candidate.splitlines(), label, source, lineterm=""))
    return active, lines


# ------------------------------------------------------------ -o json errors
def error_document(message: str, exit_code: int, code: str = "", violations=(), source: str = "",
                   estimate=None) -> dict:  # fmt: skip
    doc = {"error": {"message": message, "code": code or ("USAGE" if exit_code == 2 else "FAILED"),
                     "exit_code": exit_code,
                     "violations": [{"path": v.path, "line": v.line or 0, "message": v.message} for v in violations],
                     "source": source}}  # fmt: skip
    if estimate is not None and getattr(estimate, "summary", ""):
        doc["error"]["estimate"] = estimate.summary
    return doc


def print_error(doc: dict, mode: str) -> None:
    """The error as one JSON object (or a YAML document) on stderr."""
    if mode == "yaml":
        sys.stderr.write(yaml.safe_dump(doc, sort_keys=True))
    else:
        print(json.dumps(doc, sort_keys=True), file=sys.stderr, flush=True)




# ------------------------------------------------------------ CLI verbs
def add_validate_options(p) -> None:
    p.add_argument("--strict", action="store_true",
                   help=f"fail (exit {EXIT_WARNINGS}) when there are warnings: no default limit, a deny entry "
                   "inside an allow entry, a rule an earlier rule hides")  # fmt: skip
    p.add_argument("--against-agent", action="store_true",
                   help=f"also ask the agent what FILE would newly drop (like whatif); exit {EXIT_CHECK_REFUSED} "
                   "when over its budget or when a canary would be dropped")  # fmt: skip


def cmd_validate_checked(args, out, source: str, text: str, client_of) -> int:
    """`validate [--strict] [--against-agent]`: the offline validation, the
    warnings, and with --against-agent the agent's estimate. Exit 2 invalid, 6 warnings under
    --strict, 5 refused by the agent's check, 0 otherwise."""
    from tidegate.ruleset.model import RuleSetError, parse_rule_set

    try:
        rs = parse_rule_set(text, source)
    except RuleSetError as e:
        if out.is_json:
            out.json({"file": source, "valid": False, "rules": 0, "digest": None, "errors": [
                {"path": x.path, "line": x.line or 0, "message": x.message} for x in e.errors],
                "warnings": [], "estimate": None})  # fmt: skip
        for line in str(e).splitlines():
            print(line, file=sys.stderr)
        return 2
    ws = warnings(rs, text)
    for w in ws:
        print(w.text(source), file=sys.stderr)
    est = None
    if args.against_agent:
        from tidegate.cli.output import message_to_dict

        cl = client_of(args)
        est = cl.call("WhatIf", cl.pb.RuleSetText(yaml=text, source=source))
    code = 0
    if ws and args.strict:
        code = EXIT_WARNINGS
    if est is not None and not est.within_budget:
        code = EXIT_CHECK_REFUSED
    if out.is_json:
        out.json({"file": source, "valid": True, "rules": len(rs.rules), "allow": len(rs.allow),
                  "deny": len(rs.deny), "digest": rs.digest(), "errors": [],
                  "warnings": warnings_json(ws), "strict": bool(args.strict),
                  "estimate": message_to_dict(est) if est is not None else None})  # fmt: skip
        return code
    out.line(f"{source}: valid ({len(rs.rules)} rules, {len(rs.allow)} allow, {len(rs.deny)} deny"
             f"{f', {len(ws)} warnings' if ws else ''})")  # fmt: skip
    if est is not None:
        verdict = "within budget" if est.within_budget else "REFUSED by the agent's check"
        out.line(f"against the agent: {verdict}" + (f": {est.summary}" if est.summary else ""))
    return code


def cmd_diff_file(args, out, cl, read_file) -> int:
    """`tidegate diff FILE`: 0 when FILE's rule set is the active one, 1 when
    it differs, 2 when FILE is unreadable or invalid, 3 unreachable."""
    from tidegate.client import ClientError
    from tidegate.cli.output import colour_diff, use_colour
    from tidegate.ruleset.model import RuleSetError

    text = read_file(args.a)
    try:
        active, lines = file_against_active(cl, text, args.a)
    except RuleSetError as e:
        if out.is_json:
            print_error(error_document(f"{args.a} is not a valid rule set", 2, "INVALID_RULE_SET", e.errors,
                                       args.a), out.mode)  # fmt: skip
        else:
            print(str(e), file=sys.stderr)
        return 2
    except ClientError as e:
        if e.exit_code == 1:  # 1 means "differs" here: the agent's refusal is an error like a local one
            e.exit_code = 2
        raise
    if out.is_json:
        out.json({"file": args.a, "active_version": active, "identical": not lines, "diff": lines})
    elif lines:
        for ln in colour_diff(lines, use_colour()):
            out.line(ln)
    return 1 if lines else 0
