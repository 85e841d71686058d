"""tidegate — the operators' command line.

Exit codes:
  0  success
  1  the agent refused or failed the operation (the gRPC error is printed)
  2  usage error or bad local input (missing file, invalid rule set)
  3  the agent cannot be reached
  4  a guarded apply was rolled back by the agent
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ROLLED_BACK = 0, 1, 2, 3, 4

EPILOG = """exit codes: 0 ok, 1 the agent refused or failed, 2 usage or bad local input,
3 agent unreachable, 4 guarded apply rolled back.

environment: TIDEGATE_SERVER (agent address), TIDEGATE_TOKEN_FILE (API tokens,
default /var/lib/tidegate/tokens), TIDEGATE_AUTHOR (recorded with every change)."""

VERBS: dict[str, tuple[str, str]] = {
    "agent": ("run the agent (see `tidegate agent --help`)", "tidegate agent --interface eth0 --rules rules.yaml"),
    "status": ("show the agent, interface, attachment and active version", "tidegate status\n  tidegate -o json status"),
    "validate": ("validate a rule-set file offline (no agent needed)", "tidegate validate examples/edge-default.yaml"),
    "apply": ("apply a rule set (checked for blast radius first)",
              "tidegate apply rules.yaml --reason 'raise dns limit'\n  tidegate apply candidate.yaml --shadow "
              "--reason 'try on live traffic'\n  tidegate apply rules.yaml --guard --guard-seconds 60 --reason x\n"
              "  tidegate apply rules.yaml --force --reason 'flood in progress, accepted risk'"),
    "rollback": ("activate the previous (or a given) version", "tidegate rollback --reason 'too tight'\n"
                 "  tidegate rollback --to 3 --reason 'back to known good'"),
    "versions": ("list rule-set versions", "tidegate versions"),
    "show": ("print one version's rule set and metadata", "tidegate show 4"),
    "diff": ("compare two versions' rule sets", "tidegate diff 3 4"),
    "counters": ("packets by verdict and reason, per rule, shadow would-drops", "tidegate counters"),
    "top": ("top sources over the last sample interval", "tidegate top -n 20 --by drops"),
    "watch": ("live view: pass/drop by reason, per rule, top sources", "tidegate watch --interval 1"),
    "set-limit": ("change one rule's (or the default) limit as a new version",
                  "tidegate set-limit dns --pps 200 --burst 400 --reason 'more resolvers'"),
    "promote": ("make the shadow rule set active (new activation of its version)",
                "tidegate promote --reason 'shadow looked clean for 1h'"),
    "shadow": ("report on or clear the shadow rule set", "tidegate shadow report\n  tidegate shadow clear --reason x"),
    "whatif": ("estimate what a rule set would newly drop, without applying it", "tidegate whatif candidate.yaml"),
    "review": ("post-deployment review of a version", "tidegate review 4"),
    "audit": ("who changed what, when, why and from where", "tidegate audit --limit 20"),
    "insight": ("read the traffic's shape: surge or flood?", "tidegate insight"),
    "replay": ("run a pcap through the real XDP program offline", "tidegate replay --pcap cap.pcap --rules new.yaml "
               "--against current.yaml"),
    "detach": ("remove the XDP program and its pinned maps from an interface",
               "tidegate detach --interface eth0   # stop the agent first"),
    "lab": ("local lab: namespaces, veth, an agent, a flood and legitimate traffic", "sudo tidegate lab"),
    "certs": ("make a lab CA, server and client certificates for mTLS",
              "tidegate certs --out /etc/tidegate/pki --server-name edge1 --client alice --role admin"),
    "completion": ("print a shell completion script", "source <(tidegate completion bash)"),
    "version": ("print tidegate's version (and the agent's)", "tidegate version"),
}


class Output:
    def __init__(self, mode: str):
        self.mode = mode
        from rich.console import Console

        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    def json(self, data) -> None:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))

    def table(self, title: str, columns: list[str], rows: list[list], caption: str | None = None) -> None:
        from rich.table import Table

        t = Table(title=title, caption=caption, title_justify="left")
        for c in columns:
            t.add_column(c, justify="right" if c.endswith(("pps", "packets", "drops", "bytes", "share", "#")) else "left")
        for r in rows:
            t.add_row(*[_fmt(x) for x in r])
        self.console.print(t)

    def kv(self, title: str, items: list[tuple[str, object]]) -> None:
        from rich.table import Table

        t = Table(title=title, show_header=False, title_justify="left")
        t.add_column("key", style="bold")
        t.add_column("value")
        for k, v in items:
            t.add_row(k, _fmt(v))
        self.console.print(t)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.2f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def _msg_dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tidegate",
        description="tidegate: XDP edge filter with safe rule changes. Talks to the local agent over gRPC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--server", default=os.environ.get("TIDEGATE_SERVER", "127.0.0.1:50051"),
                   help="agent address (default $TIDEGATE_SERVER or 127.0.0.1:50051)")  # fmt: skip
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    p.add_argument("--ca", help="CA certificate for a TLS agent")
    p.add_argument("--cert", help="client certificate (mTLS)")
    p.add_argument("--key", help="client key (mTLS)")
    p.add_argument("--server-name", help="expected name in the agent's certificate")
    p.add_argument("--token-file", help="API token file (default $TIDEGATE_TOKEN_FILE or /var/lib/tidegate/tokens)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str) -> argparse.ArgumentParser:
        help_, examples = VERBS[name]
        return sub.add_parser(name, help=help_, description=help_ + ".",
                              epilog=f"EXAMPLES\n  {examples}\n\n{EPILOG}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    a = verb("agent")
    a.add_argument("args", nargs=argparse.REMAINDER)
    verb("status")
    v = verb("validate")
    v.add_argument("file")
    ap = verb("apply")
    ap.add_argument("file")
    ap.add_argument("--reason", "-r", default="", help="why (required; recorded in the audit log)")
    ap.add_argument("--shadow", action="store_true", help="load as the shadow set: counted, not enforced")
    ap.add_argument("--force", action="store_true", help="override the blast-radius check (audited)")
    ap.add_argument("--guard", dest="guard", action="store_true", default=None,
                    help="watch after the swap and roll back automatically")  # fmt: skip
    ap.add_argument("--no-guard", dest="guard", action="store_false")
    ap.add_argument("--guard-seconds", type=int, default=0)
    ap.add_argument("--no-wait", action="store_true", help="with --guard: return at once instead of waiting")
    rb = verb("rollback")
    rb.add_argument("--to", type=int, default=0, help="version number (default: the previously active one)")
    rb.add_argument("--reason", "-r", default="")
    verb("versions").add_argument("--limit", type=int, default=50)
    verb("show").add_argument("version", type=int)
    d = verb("diff")
    d.add_argument("a", type=int)
    d.add_argument("b", type=int)
    verb("counters")
    t = verb("top")
    t.add_argument("-n", type=int, default=10)
    t.add_argument("--by", choices=("packets", "drops"), default="packets")
    t.add_argument("--shadow", action="store_true", help="sources the shadow set tracks")
    w = verb("watch")
    w.add_argument("--interval", type=float, default=1.0)
    w.add_argument("--count", type=int, default=0, help="stop after N updates (default: until Ctrl-C)")
    sl = verb("set-limit")
    sl.add_argument("rule", help="rule name or 'default'")
    sl.add_argument("--pps", type=int, required=True)
    sl.add_argument("--burst", type=int, default=0)
    sl.add_argument("--bps", type=int, default=0)
    sl.add_argument("--reason", "-r", default="")
    sl.add_argument("--force", action="store_true")
    verb("promote").add_argument("--reason", "-r", default="")
    sh = verb("shadow")
    sh.add_argument("action", choices=("report", "clear"))
    sh.add_argument("--reason", "-r", default="")
    sh.add_argument("--top", type=int, default=10)
    verb("whatif").add_argument("file")
    verb("review").add_argument("version", type=int)
    au = verb("audit")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("--action", default="")
    verb("insight")
    r = verb("replay")
    r.add_argument("--pcap", required=True)
    r.add_argument("--rules", required=True)
    r.add_argument("--against", help="base rule set to compare with (e.g. the active one)")
    r.add_argument("--top", type=int, default=10)
    dt = verb("detach")
    dt.add_argument("--interface", "-i", required=True)
    dt.add_argument("--pin-root", default="/sys/fs/bpf/tidegate")
    dt.add_argument("--pin-name")
    lb = verb("lab")
    lb.add_argument("--rules", help="rule set for the lab agent (default examples/lab.yaml)")
    lb.add_argument("--duration", type=float, default=0, help="stop after N seconds (default: until Ctrl-C)")
    lb.add_argument("--flood-pps", type=float, default=2000)
    lb.add_argument("--legit-pps", type=float, default=20)
    lb.add_argument("--no-view", action="store_true", help="print a summary instead of the live view")
    c = verb("certs")
    c.add_argument("--out", required=True)
    c.add_argument("--server-name", default="tidegate")
    c.add_argument("--client", action="append", default=[], help="client common name (repeatable)")
    c.add_argument("--role", choices=("admin", "read"), default="admin")
    verb("completion").add_argument("shell", choices=("bash", "zsh"))
    verb("version")
    return p


# ------------------------------------------------------------------- verbs
def _client(args):
    from .client import Client

    return Client(args.server, args.timeout, args.ca, args.cert, args.key, token_file=args.token_file,
                  server_name=args.server_name)  # fmt: skip


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LocalError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocalError(f"{path}: cannot read: {e}") from None


class LocalError(Exception):
    pass


def cmd_validate(args, out: Output) -> int:
    from .ruleset import RuleSetError, load_rule_set

    try:
        rs = load_rule_set(args.file)
    except RuleSetError as e:
        if out.mode == "json":
            out.json({"valid": False, "errors": [{"path": x.path, "line": x.line, "message": x.message}
                                                 for x in e.errors]})  # fmt: skip
        else:
            print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if out.mode == "json":
        out.json({"valid": True, "rules": len(rs.rules), "digest": rs.digest()})
    else:
        print(f"{args.file}: valid ({len(rs.rules)} rules, {len(rs.allow)} allow, {len(rs.deny)} deny)")
    return EXIT_OK


def cmd_status(args, out: Output) -> int:
    cl = _client(args)
    s = cl.call("GetStatus", cl.pb.GetStatusRequest())
    if out.mode == "json":
        out.json(_msg_dict(s))
        return EXIT_OK
    out.kv(f"tidegate agent at {args.server}", [
        ("interface", s.interface), ("attached", f"yes ({s.xdp_mode})" if s.attached else "NO"),
        ("active version", s.active_version or "none"), ("shadow version", s.shadow_version or "none"),
        ("tracked sources", s.tracked_sources), ("uptime", f"{s.uptime_seconds:.0f} s"),
        ("guard", f"watching version {s.guard_version}" if s.guard_active else "idle"),
        ("program id", s.prog_id), ("pins", s.pin_dir), ("agent version", s.agent_version),
    ])  # fmt: skip
    return EXIT_OK


def _print_estimate(out: Output, est) -> None:
    if est is None or not est.summary:
        return
    out.err.print(f"blast radius: {est.summary}")
    for r in est.rules[:5]:
        out.err.print(f"  rule {r.rule}: {r.sources_newly_dropped} sources, {r.newly_dropped_pps:.0f} pps newly dropped")


def cmd_apply(args, out: Output) -> int:
    text = _read_file(args.file)
    cl = _client(args)
    req = cl.pb.ApplyRequest(yaml=text, source=args.file, reason=args.reason, shadow=args.shadow, force=args.force,
                             guard=bool(args.guard), no_guard=args.guard is False, guard_seconds=args.guard_seconds,
                             wait_for_guard=bool(args.guard) and not args.no_wait)  # fmt: skip
    timeout = args.timeout + (args.guard_seconds or 60) + 30 if req.wait_for_guard else None
    if req.wait_for_guard and sys.stderr.isatty() and out.mode != "json":
        with out.err.status(f"applied; guard watching for {args.guard_seconds or 60} s ..."):
            r = cl.call("ApplyRuleSet", req, timeout=timeout)
    else:
        r = cl.call("ApplyRuleSet", req, timeout=timeout)
    if out.mode == "json":
        out.json(_msg_dict(r))
    else:
        kind = "shadow version" if r.shadow else "version"
        print(f"applied {args.file} as {kind} {r.version}")
        if r.estimate and r.estimate.summary:
            _print_estimate(out, r.estimate)
        if r.guarded:
            if r.guard_outcome == "rolled-back":
                print(f"GUARD ROLLED BACK to version {r.rolled_back_to}: {r.guard_cause}")
            else:
                print(f"guard: {r.guard_outcome}")
    return EXIT_ROLLED_BACK if r.guard_outcome == "rolled-back" else EXIT_OK


def cmd_rollback(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("Rollback", cl.pb.RollbackRequest(to_version=args.to, reason=args.reason))
    if out.mode == "json":
        out.json(_msg_dict(r))
    else:
        print(f"rolled back: version {r.version} is active")
    return EXIT_OK


def cmd_versions(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("ListVersions", cl.pb.ListVersionsRequest(limit=args.limit))
    if out.mode == "json":
        out.json(_msg_dict(r).get("versions", []))
        return EXIT_OK
    out.table("versions", ["#", "active", "state", "created", "author", "source", "reason"],
              [[v.number, "*" if v.active else "", v.state, v.created, v.author, v.source, v.reason]
               for v in r.versions])  # fmt: skip
    return EXIT_OK


def cmd_show(args, out: Output) -> int:
    cl = _client(args)
    v = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.version))
    if out.mode == "json":
        out.json(_msg_dict(v))
    else:
        i = v.info
        print(f"# version {i.number} ({i.state}{', active' if i.active else ''}) by {i.author} at {i.created}")
        print(f"# reason: {i.reason}")
        print(v.yaml, end="")
    return EXIT_OK


def cmd_diff(args, out: Output) -> int:
    cl = _client(args)
    a = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.a))
    b = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.b))
    lines = list(difflib.unified_diff(a.yaml.splitlines(), b.yaml.splitlines(), f"version {args.a}",
                                      f"version {args.b}", lineterm=""))  # fmt: skip
    if out.mode == "json":
        out.json({"a": args.a, "b": args.b, "identical": not lines, "diff": lines})
        return EXIT_OK
    if not lines:
        print(f"versions {args.a} and {args.b} are identical")
    color = sys.stdout.isatty()
    for ln in lines:
        if color and ln.startswith("+") and not ln.startswith("+++"):
            ln = f"\x1b[32m{ln}\x1b[0m"
        elif color and ln.startswith("-") and not ln.startswith("---"):
            ln = f"\x1b[31m{ln}\x1b[0m"
        print(ln)
    return EXIT_OK


def _counter_tables(out: Output, c) -> None:
    total = c.packets or 1
    out.table(f"packets (active version {c.active_version})", ["verdict", "reason", "packets", "share", "bytes"],
              [[r.verdict, r.reason, r.packets, f"{r.packets / total:.1%}", r.bytes] for r in c.reasons])  # fmt: skip
    out.table("per rule", ["rule", "pass packets", "drop packets", "rate", "prefix", "blocked", "deny"],
              [[r.rule, r.pass_packets, r.drop_packets, r.drop_rate, r.drop_prefix, r.drop_blocked, r.drop_deny]
               for r in c.rules if r.pass_packets or r.drop_packets])  # fmt: skip
    if c.shadow:
        out.table(f"shadow version {c.shadow_version} (not enforced)", ["rule", "packets", "would drop", "newly"],
                  [[s.rule, s.packets, s.would_drop, s.would_drop_new] for s in c.shadow])  # fmt: skip


def cmd_counters(args, out: Output) -> int:
    cl = _client(args)
    c = cl.call("GetCounters", cl.pb.GetCountersRequest())
    if out.mode == "json":
        out.json(_msg_dict(c))
    else:
        _counter_tables(out, c)
        print(f"per-source LRU: {c.lru_inserts:,} inserts, {c.lru_insert_failures:,} insert failures")
    return EXIT_OK


def cmd_top(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("TopSources", cl.pb.TopSourcesRequest(n=args.n, by=args.by, shadow=args.shadow))
    if out.mode == "json":
        out.json(_msg_dict(r))
        return EXIT_OK
    out.table(f"top sources by {args.by} (last {r.interval_seconds:.1f} s, {r.tracked_sources:,} tracked)",
              ["source", "rule", "pps", "drop pps", "packets", "drops"],
              [[s.address, s.rule, s.pps, s.drop_pps, s.packets, s.drops] for s in r.sources])  # fmt: skip
    return EXIT_OK


def cmd_watch(args, out: Output) -> int:
    cl = _client(args)
    req = cl.pb.WatchRequest(interval_ms=int(args.interval * 1000), max_updates=args.count)
    if out.mode == "json":
        for c in cl.stream("WatchCounters", req):
            print(json.dumps(_msg_dict(c), sort_keys=True), flush=True)
        return EXIT_OK
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table

    prev = None
    try:
        with Live(console=out.console, refresh_per_second=4, transient=False) as live:
            for c in cl.stream("WatchCounters", req):
                dt = (c.time - prev.time) if prev else 0
                t = Table(title=f"tidegate — active v{c.active_version}" +
                          (f", shadow v{c.shadow_version}" if c.shadow_version else ""), title_justify="left")  # fmt: skip
                for col in ("verdict", "reason", "pps", "packets"):
                    t.add_column(col, justify="right" if col in ("pps", "packets") else "left")
                old = {r.reason: r.packets for r in prev.reasons} if prev else {}
                for r in c.reasons:
                    rate = (r.packets - old.get(r.reason, r.packets)) / dt if dt else 0
                    t.add_row(r.verdict, r.reason, f"{rate:,.0f}", f"{r.packets:,}")
                rt = Table(title="per rule", title_justify="left")
                for col in ("rule", "pass pps", "drop pps", "dropped"):
                    rt.add_column(col, justify="left" if col == "rule" else "right")
                oldr = {r.rule: r for r in prev.rules} if prev else {}
                for r in c.rules:
                    o = oldr.get(r.rule)
                    pr = (r.pass_packets - o.pass_packets) / dt if (o and dt) else 0
                    dr = (r.drop_packets - o.drop_packets) / dt if (o and dt) else 0
                    if r.pass_packets or r.drop_packets:
                        rt.add_row(r.rule, f"{pr:,.0f}", f"{dr:,.0f}", f"{r.drop_packets:,}")
                parts = [t, rt]
                try:
                    top = cl.call("TopSources", cl.pb.TopSourcesRequest(n=5, by="drops"))
                    tt = Table(title=f"top sources by drops (last {top.interval_seconds:.0f} s)", title_justify="left")
                    for col in ("source", "rule", "pps", "drop pps"):
                        tt.add_column(col)
                    for s in top.sources:
                        tt.add_row(s.address, s.rule, f"{s.pps:,.0f}", f"{s.drop_pps:,.0f}")
                    parts.append(tt)
                except Exception:
                    pass
                live.update(Group(*parts))
                prev = c
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_set_limit(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("UpdateThresholds", cl.pb.UpdateThresholdsRequest(rule=args.rule, pps=args.pps, burst=args.burst,
                                                                  bps=args.bps, reason=args.reason, force=args.force))  # fmt: skip
    if out.mode == "json":
        out.json(_msg_dict(r))
    else:
        print(f"limit of {args.rule} set to {args.pps} pps as version {r.version}")
    return EXIT_OK


def cmd_promote(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("PromoteShadow", cl.pb.PromoteRequest(reason=args.reason))
    if out.mode == "json":
        out.json(_msg_dict(r))
    else:
        print(f"promoted: shadow version {r.version} is now active")
    return EXIT_OK


def cmd_shadow(args, out: Output) -> int:
    cl = _client(args)
    if args.action == "clear":
        r = cl.call("ClearShadow", cl.pb.ClearShadowRequest(reason=args.reason))
        if out.mode == "json":
            out.json(_msg_dict(r))
        else:
            print(f"shadow version {r.cleared_version} cleared")
        return EXIT_OK
    r = cl.call("ShadowReport", cl.pb.ShadowReportRequest(top=args.top))
    if out.mode == "json":
        out.json(_msg_dict(r))
        return EXIT_OK
    out.table(f"shadow version {r.shadow_version} vs active {r.active_version} "
              f"({r.loaded_seconds:.0f} s, {r.packets:,} packets): would newly drop {r.share:.2%}",
              ["rule", "packets", "would drop", "newly dropped", "sources", "share"],
              [[x.rule, x.packets, x.would_drop, x.would_drop_new, x.sources, f"{x.share:.2%}"] for x in r.rules])  # fmt: skip
    if r.top_affected:
        out.table("top affected sources", ["source", "rule", "packets", "newly dropped"],
                  [[s.address, s.rule, s.packets, s.drops] for s in r.top_affected])  # fmt: skip
    return EXIT_OK


def cmd_whatif(args, out: Output) -> int:
    text = _read_file(args.file)
    cl = _client(args)
    e = cl.call("WhatIf", cl.pb.RuleSetText(yaml=text, source=args.file))
    if out.mode == "json":
        out.json(_msg_dict(e))
    else:
        verdict = "within budget" if e.within_budget else "OVER BUDGET (apply would be refused without --force)"
        print(f"{args.file}: {verdict}")
        print(e.summary)
        if e.rules:
            out.table("newly dropped by rule", ["rule", "sources", "pps"],
                      [[r.rule, r.sources_newly_dropped, r.newly_dropped_pps] for r in e.rules])  # fmt: skip
    return EXIT_OK


def cmd_review(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("GetReview", cl.pb.GetReviewRequest(version=args.version))
    data = json.loads(r.json)
    if out.mode == "json":
        out.json(data)
        return EXIT_OK
    print(f"review of version {args.version} ({'complete' if r.complete else 'in progress'}): "
          f"by {data.get('author')} — {data.get('reason')}")  # fmt: skip
    for side in ("before", "after"):
        s = data.get(side)
        if s:
            print(f"  {side:6s}: {s['pps']:,.1f} pps, drop share {s['drop_share']:.2%} over {s['seconds']:.0f} s")
    print(f"  guard fired: {'yes' if data.get('guard_fired') else 'no'}")
    if data.get("note"):
        print(f"  note: {data['note']}")
    return EXIT_OK


def cmd_audit(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("ListAudit", cl.pb.ListAuditRequest(limit=args.limit, action=args.action))
    if out.mode == "json":
        out.json(_msg_dict(r).get("entries", []))
        return EXIT_OK
    out.table("audit log", ["time", "action", "result", "author", "peer", "version", "detail"],
              [[e.time, e.action, e.result, e.author, e.peer, e.version or "", e.detail[:80]] for e in r.entries])  # fmt: skip
    return EXIT_OK


def cmd_insight(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("Insight", cl.pb.InsightRequest())
    if out.mode == "json":
        out.json(json.loads(r.json))
    else:
        print(r.reading)
    return EXIT_OK


def cmd_replay(args, out: Output) -> int:
    from .replay import replay
    from .ruleset import RuleSetError, load_rule_set

    try:
        rs = load_rule_set(args.rules)
        base = load_rule_set(args.against) if args.against else None
    except RuleSetError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if not os.path.exists(args.pcap):
        raise LocalError(f"{args.pcap}: no such file")
    if out.mode != "json" and sys.stderr.isatty():
        with out.err.status("compiling the replay program and replaying ..."):
            res = replay(args.pcap, rs, base)
    else:
        res = replay(args.pcap, rs, base)
    data = res.to_dict(args.top)
    if out.mode == "json":
        out.json(data)
        return EXIT_OK
    runs = [("candidate", data["candidate"]), ("base", data["base"])] if base else [("result", data)]
    for label, d in runs:
        out.table(f"{label}: {d['packets']:,} packets, {d['dropped']:,} dropped", ["rule", "pass", "drop", "rate",
                  "prefix", "blocked", "deny"], [[n, r["pass_packets"], r["drop_packets"], r["drop_rate"],
                  r["drop_prefix"], r["drop_blocked"], r["drop_deny"]] for n, r in d["rules"].items()
                  if r["pass_packets"] or r["drop_packets"]])  # fmt: skip
    if base:
        print(f"candidate newly drops {data['newly_dropped_packets']:,} packets from "
              f"{data['newly_dropped_sources']:,} sources; newly passes {data['newly_passed_packets']:,}")  # fmt: skip
        for s in data["top_newly_dropped_sources"]:
            print(f"  {s['source']}: {s['packets']:,}")
    return EXIT_OK


def cmd_detach(args, out: Output) -> int:
    from .kernel import FilterConfig, KernelError, KernelFilter

    if os.geteuid() != 0:
        raise LocalError("detach needs root")
    kf = KernelFilter(FilterConfig(interface=args.interface, pin_root=args.pin_root, pin_name=args.pin_name))
    try:
        kf.detach(remove_pins=True)
    except KernelError as e:
        print(f"tidegate: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"detached tidegate from {args.interface} and removed {kf.config.pin_dir}")
    return EXIT_OK


def cmd_version(args, out: Output) -> int:
    from .client import ClientError

    data = {"tidegate": __version__}
    try:
        cl = _client(args)
        cl.timeout = 2
        data["agent"] = cl.call("GetStatus", cl.pb.GetStatusRequest()).agent_version
    except (ClientError, Exception):
        data["agent"] = None
    if out.mode == "json":
        out.json(data)
    else:
        print(f"tidegate {__version__}" + (f" (agent {data['agent']} at {args.server})" if data["agent"] else ""))
    return EXIT_OK


def cmd_completion(args, out: Output) -> int:
    verbs = " ".join(VERBS)
    if args.shell == "bash":
        print(f"""# bash completion for tidegate: source <(tidegate completion bash)
_tidegate() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}}
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=( $(compgen -W "{verbs} --server --output --help" -- "$cur") )
    else
        case "${{COMP_WORDS[1]}}" in
            shadow) COMPREPLY=( $(compgen -W "report clear --reason" -- "$cur") ) ;;
            completion) COMPREPLY=( $(compgen -W "bash zsh" -- "$cur") ) ;;
            *) COMPREPLY=( $(compgen -f -- "$cur") ) ;;
        esac
    fi
}}
complete -F _tidegate tidegate""")
    else:
        print(f"""#compdef tidegate
# zsh completion for tidegate: source <(tidegate completion zsh)
_tidegate() {{
    if (( CURRENT == 2 )); then
        compadd {verbs}
    else
        _files
    fi
}}
compdef _tidegate tidegate""")
    return EXIT_OK


def cmd_certs(args, out: Output) -> int:
    from .certs import make_lab_pki

    files = make_lab_pki(args.out, args.server_name, args.client or ["admin"], args.role)
    for f in files:
        print(f)
    return EXIT_OK


def cmd_lab(args, out: Output) -> int:
    from .lab import run_lab

    return run_lab(args, out)


COMMANDS = {
    "status": cmd_status, "validate": cmd_validate, "apply": cmd_apply, "rollback": cmd_rollback,
    "versions": cmd_versions, "show": cmd_show, "diff": cmd_diff, "counters": cmd_counters, "top": cmd_top,
    "watch": cmd_watch, "set-limit": cmd_set_limit, "promote": cmd_promote, "shadow": cmd_shadow,
    "whatif": cmd_whatif, "review": cmd_review, "audit": cmd_audit, "insight": cmd_insight, "replay": cmd_replay,
    "detach": cmd_detach, "version": cmd_version, "completion": cmd_completion, "certs": cmd_certs, "lab": cmd_lab,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "agent":
        from .agent import main as agent_main

        return agent_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    if not args.verb:
        parser.print_help()
        return EXIT_USAGE
    out = Output(args.output)
    from .client import ClientError

    try:
        return COMMANDS[args.verb](args, out)
    except ClientError as e:
        print(f"tidegate: {e.message}", file=sys.stderr)
        for v in e.violations:
            where = f"{e.source}:{v.line}" if v.line else (e.source or "<request>")
            print(f"{where}: {v.path}: {v.message}", file=sys.stderr)
        if e.estimate is not None and e.estimate.summary:
            print(f"estimate: {e.estimate.summary}", file=sys.stderr)
        return e.exit_code
    except LocalError as e:
        print(f"tidegate: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
