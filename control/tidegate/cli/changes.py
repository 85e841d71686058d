"""Verbs that check and change the rules: validate, apply, rollback,
set-limit, promote, shadow, whatif, deny."""

from __future__ import annotations

import sys
import time

from tidegate.changes.blocklist import parse_ttl
from tidegate.cli.completion import rule_names, versions
from tidegate.cli.output import Output, duration, message_to_dict, print_estimate
from tidegate.cli.verb import (EXIT_CHECK_REFUSED, EXIT_OK, EXIT_ROLLED_BACK, EXIT_USAGE, EXIT_WARNINGS, LocalError,
                               arg, client_of, force, read_file, reason, verb)  # fmt: skip
from tidegate.ruleset.checks import warnings, warnings_json
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import parse_rule_set

FILE = arg("file", metavar="FILE", help="rule-set YAML file")


@verb("validate", "check a rule-set file offline (no agent needed)",
      "Parses and validates FILE exactly as the agent would, without contacting it. Every problem is\n"
      "printed on its own line as FILE:LINE: path: message. FILE may be - for standard input.\n"
      "Warnings (FILE:LINE: path: warning: ...): no default limit (unmatched traffic passes unlimited),\n"
      "a deny entry inside an allow entry (never fires), a rule an earlier rule hides (never matches).\n"
      "--against-agent also asks the agent for its blast-radius estimate (like whatif).\n"
      "Exit status 0 when the rule set is valid, 2 when it is not or cannot be read, 6 with --strict\n"
      "and warnings, 5 when the agent's check would refuse it.",
      "tidegate validate examples/edge-default.yaml\n"
      "tidegate -o json validate rules.yaml | jq .errors\n"
      "tidegate validate --strict --against-agent rules.yaml && tidegate apply rules.yaml -r ...\n"
      "git show HEAD:rules.yaml | tidegate validate -",
      arg("file", metavar="FILE", help="rule-set YAML file, or - for standard input"),
      arg("--strict", action="store_true",
          help=f"fail (exit {EXIT_WARNINGS}) when there are warnings: no default limit, a deny entry "
          "inside an allow entry, a rule an earlier rule hides"),
      arg("--against-agent", action="store_true",
          help=f"also ask the agent what FILE would newly drop (like whatif); exit {EXIT_CHECK_REFUSED} "
          "when over its budget or when a canary would be dropped"),
      remote=False, connects=True)  # fmt: skip
def validate(args, out: Output) -> int:
    """The offline validation, the warnings, and with --against-agent the agent's estimate.
    Exit 2 invalid, 6 warnings under --strict, 5 refused by the agent's check, 0 otherwise."""
    source = "<stdin>" if args.file == "-" else args.file
    text = read_file(args.file)
    try:
        rs = parse_rule_set(text, source)
    except RuleSetError as e:
        if out.is_json:
            out.json({"file": source, "valid": False, "rules": 0, "digest": None, "errors": [
                {"path": x.path, "line": x.line or 0, "message": x.message} for x in e.errors],
                "warnings": [], "estimate": None})  # fmt: skip
        for line in str(e).splitlines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    ws = warnings(rs, text)
    for w in ws:
        print(w.text(source), file=sys.stderr)
    est = None
    if args.against_agent:
        cl = client_of(args)
        est = cl.call("WhatIf", cl.pb.RuleSetText(yaml=text, source=source))
    code = EXIT_OK
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


@verb("apply", "apply a rule set as a new version (blast-radius checked, optionally guarded)",
      "Sends FILE to the agent, which validates it, estimates from the traffic it saw what the new set\n"
      "would newly drop, and refuses the change (FAILED_PRECONDITION, exit 1) when that exceeds its\n"
      "budget unless --force is given with a reason. The swap in the kernel is atomic; the new version\n"
      "is recorded with your name ($TIDEGATE_AUTHOR or user@host) and --reason.\n\n"
      "--shadow loads the set next to the active one: evaluated on every packet, counted, never enforced\n"
      "(see `tidegate shadow report`, `tidegate promote`).\n"
      "--guard watches the traffic for --guard-seconds after the swap and rolls back by itself when the\n"
      "drop share or the dropped sources jump, or a canary source is dropped; the command waits for the\n"
      "verdict (exit 4 when rolled back) unless --no-wait.",
      "tidegate apply rules.yaml --reason 'raise dns limit, ticket OPS-12'\n"
      "tidegate apply candidate.yaml --shadow --reason 'try on live traffic'\n"
      "tidegate apply rules.yaml --guard --guard-seconds 120 --reason 'tighter api limit'\n"
      "tidegate apply rules.yaml --force --reason 'flood in progress, risk accepted by on-call'",
      FILE,
      reason(),
      arg("--shadow", action="store_true", help="load as the shadow set: counted, not enforced"),
      force("override the blast-radius check (audited; needs a reason)"),
      arg("--guard", dest="guard", action="store_true", default=None,
          help="watch after the swap and roll back automatically (default: the agent's setting)"),
      arg("--no-guard", dest="guard", action="store_false", help="no guard, even if the agent defaults to one"),
      arg("--guard-seconds", type=int, default=0, metavar="N", help="guard window in seconds (default: the agent's, 60)"),
      arg("--no-wait", action="store_true", help="with --guard: return at once, the guard keeps watching"))  # fmt: skip
def apply(args, out: Output) -> int:
    text = read_file(args.file)
    cl = client_of(args)
    wait = bool(args.guard) and not args.no_wait and not args.shadow
    req = cl.pb.ApplyRequest(yaml=text, source=args.file, reason=args.reason, shadow=args.shadow, force=args.force,
                             guard=bool(args.guard), no_guard=args.guard is False, guard_seconds=args.guard_seconds,
                             wait_for_guard=wait)  # fmt: skip
    guard_s = args.guard_seconds or 60
    timeout = args.timeout + guard_s + 30 if wait else None
    label = (f"applying {args.file}; the guard watches for {guard_s} s ..." if wait
             else f"applying {args.file} ...")  # fmt: skip
    with out.progress(label):
        r = cl.call("ApplyRuleSet", req, timeout=timeout)
    rolled_back = r.guard_outcome == "rolled-back"
    if not out.as_json(r):
        kind = "shadow version" if r.shadow else "version"
        out.line(f"applied {args.file} as {kind} {r.version}")
        if r.estimate and r.estimate.summary:
            print_estimate(out, r.estimate, sys.stdout)
        if r.guarded:
            if rolled_back:
                out.line(f"GUARD ROLLED BACK to version {r.rolled_back_to}: {r.guard_cause}")
            elif r.guard_outcome == "watching":
                out.line(f"guard: watching version {r.version} (see `tidegate status`, `tidegate audit`)")
            else:
                out.line(f"guard: {r.guard_outcome or 'watching'}")
    if rolled_back and out.is_json:
        out.note(f"tidegate: guard rolled back to version {r.rolled_back_to}: {r.guard_cause}")
    return EXIT_ROLLED_BACK if rolled_back else EXIT_OK


@verb("rollback", "make the previous (or a given) version active again",
      "Swaps the kernel back to the version active before the current one, or to --to VERSION, in one\n"
      "atomic step, and records who did it and why. `tidegate versions` lists the numbers.",
      "tidegate rollback --reason 'too tight, users blocked'\n"
      "tidegate rollback --to 3 --reason 'back to known good'",
      arg("--to", type=int, default=0, metavar="VERSION", help="version (default: the previous one)",
          completer=versions),
      reason())  # fmt: skip
def rollback(args, out: Output) -> int:
    return _swap(args, out, "rolling back ...", "Rollback", lambda pb: pb.RollbackRequest(to_version=args.to,
                 reason=args.reason), "rolled back: version {} is active")  # fmt: skip


def _swap(args, out: Output, doing: str, method: str, request, done: str) -> int:
    """A verb that makes another version active: one call, then one line naming the version."""
    cl = client_of(args)
    with out.progress(doing):
        r = cl.call(method, request(cl.pb))
    if not out.as_json(r):
        out.line(done.format(r.version))
    return EXIT_OK


@verb("set-limit", "change one rule's (or the default) rate limit as a new version",
      "Copies the active rule set, changes the limit of RULE (or of the defaults with `default`) and\n"
      "applies it like any apply: validated, blast-radius checked, versioned, audited. --bps is in\n"
      "bits per second, as `bps` in rule sets; without it the rule keeps its byte limit.",
      "tidegate set-limit dns --pps 200 --burst 400 --reason 'more resolvers'\n"
      "tidegate set-limit default --pps 50 --reason 'tighten during incident' --force\n"
      "tidegate set-limit bulk --pps 5000 --bps 80000000 --reason 'at most 10 MB/s per source'",
      arg("rule", metavar="RULE", help="rule name, or `default` for the defaults", completer=rule_names),
      arg("--pps", type=int, required=True, help="packets per second per source"),
      arg("--burst", type=int, default=0, help="bucket size in packets (default: the new --pps)"),
      arg("--bps", type=int, default=0, metavar="BITS",
          help="byte-rate limit in bits per second per source, like the rule set's `bps` "
          "(e.g. 80000000 for 10 MB/s; default: keep the rule's current byte limit)"),
      reason("why (required)"),
      force())  # fmt: skip
def set_limit(args, out: Output) -> int:
    cl = client_of(args)
    with out.progress(f"changing the limit of {args.rule} ..."):
        r = cl.call("UpdateThresholds", cl.pb.UpdateThresholdsRequest(
            rule=args.rule, pps=args.pps, burst=args.burst, bps=args.bps, reason=args.reason, force=args.force))  # fmt: skip
    if not out.as_json(r):
        burst = f", burst {args.burst}" if args.burst else ""
        bps = f", {args.bps} bits/s" if args.bps else ""
        out.line(f"limit of {args.rule} set to {args.pps} pps{burst}{bps}: version {r.version} is active")
        print_estimate(out, r.estimate, sys.stdout)
    return EXIT_OK


@verb("promote", "make the shadow rule set the active one",
      "Atomically activates the rule set loaded with `apply --shadow` (its version becomes active) and\n"
      "clears the shadow slot.",
      "tidegate promote --reason 'shadow looked clean for 1h'",
      reason("why (recorded in the audit log)"),
      force())  # fmt: skip
def promote(args, out: Output) -> int:
    return _swap(args, out, "promoting the shadow set ...", "PromoteShadow",
                 lambda pb: pb.PromoteRequest(reason=args.reason, force=args.force),
                 "promoted: shadow version {} is now active")  # fmt: skip


@verb("shadow", "report on or clear the shadow (candidate) rule set",
      "`report`: per rule, what the candidate would drop that the active set passes (packets, sources,\n"
      "share of traffic) and the most affected sources. `clear`: unload the candidate.",
      "tidegate shadow report\n"
      "tidegate shadow report --top 20\n"
      "tidegate shadow clear --reason 'candidate too tight'",
      arg("action", choices=("report", "clear"), help="report or clear"),
      reason("with clear: why"),
      arg("--top", type=int, default=10, metavar="N",
          help="with report: affected sources shown per rule (default 10, at most 100)"))  # fmt: skip
def shadow(args, out: Output) -> int:
    cl = client_of(args)
    if args.action == "clear":
        r = cl.call("ClearShadow", cl.pb.ClearShadowRequest(reason=args.reason))
        if not out.as_json(r):
            out.line(f"shadow version {r.cleared_version} cleared")
        return EXIT_OK
    r = cl.call("ShadowReport", cl.pb.ShadowReportRequest(top=args.top))
    if out.as_json(r):
        return EXIT_OK
    out.line(f"shadow version {r.shadow_version} vs active {r.active_version}: loaded {duration(r.loaded_seconds)},"
             f" {r.packets:,} packets seen, would newly drop {r.would_drop_new:,} ({r.share:.2%})")
    out.table("per rule (the candidate is counted, not enforced)",
              ["rule", "packets", "would drop", "newly dropped", "sources", "share"],
              [[x.rule, x.packets, x.would_drop, x.would_drop_new, x.sources, f"{x.share:.2%}"] for x in r.rules])  # fmt: skip
    for x in r.rules:  # who each rule would hurt: one bounded table per rule
        if x.top_affected:
            out.table(f"most affected sources: {x.rule} ({x.sources:,} sources)",
                      ["source", "packets", "newly dropped"], [[s.address, s.packets, s.drops] for s in x.top_affected])
    return EXIT_OK


@verb("whatif", "estimate what a rule set would newly drop, without applying it",
      "Asks the agent what FILE would newly drop compared with the active set, from the per-source\n"
      "rates it observed over its estimate window, and whether an apply would pass the blast-radius\n"
      "check. Nothing is changed. Exit 5 when the check would refuse it (over budget, or a canary\n"
      "would be dropped).",
      "tidegate whatif candidate.yaml\n"
      "tidegate -o json whatif candidate.yaml | jq .packet_share",
      arg("file", metavar="FILE", help="candidate rule-set YAML file"))  # fmt: skip
def whatif(args, out: Output) -> int:
    text = read_file(args.file)
    cl = client_of(args)
    with out.progress(f"estimating {args.file} against the observed traffic ..."):
        e = cl.call("WhatIf", cl.pb.RuleSetText(yaml=text, source=args.file))
    refused = EXIT_OK if e.within_budget else EXIT_CHECK_REFUSED
    if out.as_json(e):
        return refused
    verdict = "within budget" if e.within_budget else "OVER BUDGET (an apply would be refused without --force)"
    out.line(f"{args.file}: {verdict}")
    out.line(f"  {e.summary}" if e.summary else "")
    out.line(f"  over the last {e.window_seconds:.0f} s: {e.sources_seen:,} sources, {e.packets_per_second:,.1f} pps;"
             f" newly dropped {e.sources_newly_dropped:,} sources ({e.source_share:.2%}, budget {e.source_budget:.0%}),"
             f" {e.newly_dropped_pps:,.1f} pps ({e.packet_share:.2%}, budget {e.packet_budget:.0%})")  # fmt: skip
    if e.rules:
        out.table("newly dropped by rule", ["rule", "sources", "pps"],
                  [[r.rule, r.sources_newly_dropped, r.newly_dropped_pps] for r in e.rules])  # fmt: skip
    if e.top_affected:
        out.table("most affected sources", ["source", "rule", "pps", "drop pps"],
                  [[s.address, s.rule, s.pps, s.drop_pps] for s in e.top_affected])  # fmt: skip
    return refused


@verb("deny", "quick block list: deny a CIDR for a while, remove it, list with expiry",
      "`add CIDR --ttl 10m --reason R` makes a new version: the active rule set with CIDR on its deny\n"
      "list, through the same checks as apply (validated, audited, blast-radius checked: a canary cannot\n"
      "be denied; --force overrides, audited). After --ttl the agent removes it again as a new version\n"
      "by agent:ttl. `remove CIDR --reason R` removes any deny entry as a new version. `list` shows the\n"
      "active deny list, who added each quick entry and when it expires.",
      "tidegate deny add 203.0.113.0/24 --ttl 10m --reason 'scanner, INC-42'\n"
      "tidegate deny list\n"
      "tidegate deny remove 203.0.113.0/24 --reason 'scanner gone'",
      arg("action", choices=("add", "remove", "list"), help="add, remove or list"),
      arg("cidr", nargs="?", metavar="CIDR", help="address or CIDR (add, remove)"),
      arg("--ttl", default="0", metavar="DURATION",
          help="with add: remove it after this long (90s, 10m, 2h, 1d; default: until removed)"),
      reason("why (required for add and remove; audited)"),
      force("with add: override the blast-radius check (audited)"))  # fmt: skip
def deny(args, out: Output) -> int:
    from tidegate.v1 import blocklist_pb2 as bpb  # lazy: generated gRPC code imports grpc
    from tidegate.v1 import blocklist_pb2_grpc as bpbg

    if args.action in ("add", "remove") and not args.cidr:
        raise LocalError(f"deny {args.action}: which CIDR?")
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as e:
        raise LocalError(f"--ttl: {e}") from None
    cl = client_of(args)
    cl.stub = bpbg.BlocklistStub(cl.channel)
    if args.action == "list":
        r = cl.call("DenyList", bpb.DenyListRequest())
        if out.as_json(r):
            return EXIT_OK
        now = time.time()
        rows = [[e.cidr, _expiry(e.expires, now), e.author if e.quick else "(rule set)", e.reason]
                for e in r.entries]  # fmt: skip
        out.table(f"deny list (active version {r.active_version})", ["cidr", "expires", "added by", "reason"], rows,
                  empty="no deny entries")  # fmt: skip
        return EXIT_OK
    if args.action == "add":
        r = cl.call("DenyAdd", bpb.DenyAddRequest(cidr=args.cidr, ttl_seconds=ttl, reason=args.reason,
                                                  force=args.force))  # fmt: skip
        what = f"denied {r.cidr}" + (f" until {_expiry(r.expires, time.time())}" if r.expires else "")
    else:
        r = cl.call("DenyRemove", bpb.DenyRemoveRequest(cidr=args.cidr, reason=args.reason))
        what = f"removed {r.cidr} from the deny list"
    if not out.as_json(r):
        out.line(f"{what}: version {r.version}")
    return EXIT_OK


def _expiry(expires: float, now: float) -> str:
    if not expires:
        return "never"
    left = max(0, int(expires - now))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires))
    return f"{stamp}Z (in {left // 60}m{left % 60:02d}s)"
