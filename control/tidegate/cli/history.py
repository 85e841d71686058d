"""Verbs about what was changed: versions, show, diff, audit."""

from __future__ import annotations

import difflib
import os
import sys

from tidegate.client import ClientError
from tidegate.cli.completion import version_arg, versions as version_numbers
from tidegate.cli.output import (Output, colour_diff, error_document, message_to_dict, print_error,
                                 use_colour)  # fmt: skip
from tidegate.cli.verb import EXIT_OK, EXIT_USAGE, LocalError, arg, client_of, read_file, read_reply, verb
from tidegate.ruleset.dump import dump_yaml
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import parse_rule_set


@verb("versions", "list rule-set versions with author, reason and state",
      "Every applied rule set is a numbered version; the active one is marked with *.",
      "tidegate versions\n"
      "tidegate versions --limit 5\n"
      "tidegate -o json versions | jq '.[] | select(.active)'",
      arg("--limit", type=int, default=50, metavar="N", help="newest N versions (default 50)"))  # fmt: skip
def versions(args, out: Output) -> int:
    cl = client_of(args)
    r = cl.call("ListVersions", cl.pb.ListVersionsRequest(limit=args.limit))
    if out.is_json:
        out.json([message_to_dict(v) for v in r.versions])
        return EXIT_OK
    out.table("versions", ["#", "active", "state", "created", "author", "source", "reason"],
              [[v.number, "*" if v.active else "", v.state, v.created, v.author, v.source, v.reason]
               for v in r.versions], empty="no versions yet: tidegate apply FILE --reason TEXT")  # fmt: skip
    return EXIT_OK


@verb("show", "print one version's rule set (canonical YAML) and metadata",
      "Prints the version's canonical YAML preceded by comment lines with its author, time and reason;\n"
      "the YAML can be edited and applied again.",
      "tidegate show 4\n"
      "tidegate show 4 > rules.yaml   # edit, then: tidegate apply rules.yaml --reason ...",
      version_arg())  # fmt: skip
def show(args, out: Output) -> int:
    if (v := read_reply(args, out, "GetVersion", "GetVersionRequest", number=args.version)) is None:
        return EXIT_OK
    i = v.info
    out.line(f"# version {i.number} ({i.state}{', active' if i.active else ''}), {i.created}, by {i.author}")
    out.line(f"# reason: {i.reason}")
    if i.source:
        out.line(f"# source: {i.source}")
    out.line(f"# digest: {i.digest}")
    sys.stdout.write(v.yaml if v.yaml.endswith("\n") else v.yaml + "\n")
    return EXIT_OK


@verb("diff", "compare two versions, or a file with the active version (unified diff)",
      "A unified diff of the canonical YAML of version A and version B, coloured on a terminal.\n"
      "With one FILE: FILE's canonical YAML against the active version (comments, order and\n"
      "spelling do not count); exit 0 when the same, 1 when different, 2 on an error (kubectl diff).",
      "tidegate diff 3 4\n"
      "tidegate diff 3 4 | less -R\n"
      "tidegate diff /etc/tidegate/rules.yaml || echo 'the file is not what runs'",
      arg("a", metavar="A|FILE", help="old version, or a rule-set file to compare with the active version",
          completer=version_numbers),
      arg("b", type=int, nargs="?", metavar="B", help="new version", completer=version_numbers))  # fmt: skip
def diff(args, out: Output) -> int:
    if args.b is None and args.a.isdigit() and not os.path.exists(args.a):
        raise LocalError(f"diff: {args.a}: two version numbers, or one rule-set file")
    if args.b is None:
        return _diff_file(args, out)
    if not args.a.isdigit():
        raise LocalError(f"diff: {args.a!r}: two version numbers, or one rule-set file")
    args.a = int(args.a)
    cl = client_of(args)
    a = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.a))
    b = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.b))
    lines = list(difflib.unified_diff(a.yaml.splitlines(), b.yaml.splitlines(), f"version {args.a}",
                                      f"version {args.b}", lineterm=""))  # fmt: skip
    if out.is_json:
        out.json({"a": args.a, "b": args.b, "identical": not lines, "diff": lines})
        return EXIT_OK
    if not lines:
        out.line(f"versions {args.a} and {args.b} are identical")
    for ln in colour_diff(lines, use_colour()):
        out.line(ln)
    return EXIT_OK


def _diff_file(args, out: Output) -> int:
    """`tidegate diff FILE`: 0 when FILE's rule set is the active one, 1 when
    it differs, 2 when FILE is unreadable or invalid, 3 unreachable."""
    cl = client_of(args)
    text = read_file(args.a)
    try:
        active, lines = _against_active(cl, text, args.a)
    except RuleSetError as e:
        if out.is_json:
            print_error(error_document(f"{args.a} is not a valid rule set", EXIT_USAGE, "INVALID_RULE_SET", e.errors,
                                       args.a), out.mode)  # fmt: skip
        else:
            print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except ClientError as e:
        if e.exit_code == 1:  # 1 means "differs" here: the agent's refusal is an error like a local one
            e.exit_code = EXIT_USAGE
        raise
    if out.is_json:
        out.json({"file": args.a, "active_version": active, "identical": not lines, "diff": lines})
    elif lines:
        for ln in colour_diff(lines, use_colour()):
            out.line(ln)
    return 1 if lines else 0


def _against_active(cl, text: str, source: str) -> tuple[int, list[str]]:
    """(active version or 0, unified diff lines) of FILE's canonical YAML
    against the agent's active version."""
    candidate = dump_yaml(parse_rule_set(text, source))
    active = cl.call("GetStatus", cl.pb.GetStatusRequest()).active_version
    current = cl.call("GetVersion", cl.pb.GetVersionRequest(number=active)).yaml if active else ""
    label = f"active version {active}" if active else "no active version"
    lines = list(difflib.unified_diff(current.splitlines(), candidate.splitlines(), label, source, lineterm=""))
    return active, lines


@verb("audit", "who changed what, when, why and from where",
      "The agent's append-only audit log: applies, rollbacks, refused changes, guard decisions and\n"
      "denied calls, with author and peer address.",
      "tidegate audit\n"
      "tidegate audit --limit 20 --action rollback\n"
      "tidegate audit --action auth-denied",
      arg("--limit", type=int, default=50, metavar="N", help="newest N entries (default 50)"),
      arg("--action", default="", help="only this action (apply, rollback, guard-rollback, auth-denied, ...)"))  # fmt: skip
def audit(args, out: Output) -> int:
    cl = client_of(args)
    r = cl.call("ListAudit", cl.pb.ListAuditRequest(limit=args.limit, action=args.action))
    if out.is_json:
        out.json([message_to_dict(e) for e in r.entries])
        return EXIT_OK
    out.table("audit log", ["time", "action", "result", "author", "peer", "version", "detail"],
              [[e.time, e.action, e.result, e.author, e.peer, e.version or "", e.detail] for e in r.entries],
              empty="nothing recorded")  # fmt: skip
    return EXIT_OK
