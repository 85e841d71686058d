"""Verbs that read what the filter sees: status, counters, top, watch,
insight, review."""

from __future__ import annotations

import itertools

from tidegate.client import ClientError
from tidegate.cli.output import Output, duration, make_table, message_to_dict, per_second, quiet_broken_pipe
from tidegate.cli.completion import version_arg
from tidegate.cli.verb import EXIT_OK, LocalError, arg, client_of, read_reply, verb


@verb("status", "show the agent, its interface, the attachment and the active version",
      "Prints the interface, whether the XDP program is attached and in which mode, the active and\n"
      "shadow versions, the tracked sources, whether a guard is watching, the program id and pins.",
      "tidegate status\n"
      "tidegate --server edge1:50051 --ca ca.pem --cert me.pem --key me.key status\n"
      "tidegate -o json status | jq .active_version")  # fmt: skip
def status(args, out: Output) -> int:
    if (s := read_reply(args, out, "GetStatus", "GetStatusRequest")) is None:
        return EXIT_OK
    out.kv(f"tidegate agent at {args.server}", [
        ("interface", s.interface),
        ("attached", f"yes ({s.xdp_mode})" if s.attached else "NO — traffic is not filtered"),
        ("active version", s.active_version or "none"),
        ("shadow version", s.shadow_version or "none"),
        ("guard", f"watching version {s.guard_version}" if s.guard_active else "idle"),
        ("auto-mitigation", _mitigation_line(s)),
        ("tracked sources", f"{s.tracked_sources:,} (sampled {s.sample_age_seconds:.0f} s ago)"),
        ("uptime", duration(s.uptime_seconds)),
        ("program id", s.prog_id or "-"),
        ("pins", s.pin_dir or "-"),
        ("agent version", s.agent_version),
    ])  # fmt: skip
    return EXIT_OK


def _mitigation_line(s) -> str:
    if not s.HasField("auto_mitigation"):
        return "none active"
    m = s.auto_mitigation
    return (f"version {m.version} ({m.action}{' on ' + m.rule if m.rule else ''}), expires in "
            f"{duration(m.expires_in_seconds)} restoring version {m.previous_version}'s rules")  # fmt: skip


def _counter_tables(c) -> list:
    total = c.packets or 1
    tables = [make_table(f"packets (active version {c.active_version}): {c.packets:,} seen, {c.dropped:,} dropped",
                         ["verdict", "reason", "packets", "share", "bytes"],
                         [[r.verdict, r.reason, r.packets, f"{r.packets / total:.1%}", r.bytes]
                          for r in c.reasons if r.packets])]  # fmt: skip
    tables.append(make_table("per rule", ["rule", "pass packets", "drop packets", "rate", "prefix", "blocked", "deny"],
                             [[r.rule, r.pass_packets, r.drop_packets, r.drop_rate, r.drop_prefix, r.drop_blocked,
                               r.drop_deny] for r in c.rules if r.pass_packets or r.drop_packets]))  # fmt: skip
    if c.shadow_version:
        tables.append(make_table(f"shadow version {c.shadow_version} (counted, not enforced)",
                                 ["rule", "packets", "would drop", "newly"],
                                 [[s.rule, s.packets, s.would_drop, s.would_drop_new] for s in c.shadow]))  # fmt: skip
    return tables


@verb("counters", "packets by verdict and reason, per rule, and shadow would-drops",
      "Totals since the program was loaded: pass/drop by reason, per rule (passed, dropped by rate,\n"
      "prefix limit, block or deny), the shadow set's would-drops, and the per-source table's inserts.",
      "tidegate counters\n"
      "tidegate -o json counters | jq '.rules[] | {rule, drop_packets}'")  # fmt: skip
def counters(args, out: Output) -> int:
    if (c := read_reply(args, out, "GetCounters", "GetCountersRequest")) is None:
        return EXIT_OK
    for t in _counter_tables(c):
        out.console.print(t)
    out.line(f"per-source table: {c.lru_inserts:,} inserts, {c.lru_insert_failures:,} insert failures")
    return EXIT_OK


@verb("top", "the busiest sources over the agent's last sample interval",
      "Sources (addresses masked to the rule set's prefix) ranked by packets or by drops, with their\n"
      "rates and the rule that matched them.",
      "tidegate top\n"
      "tidegate top -n 20 --by drops\n"
      "tidegate top --shadow --by drops   # whom the shadow set would drop",
      arg("-n", type=int, default=10, metavar="N", help="how many sources (default 10)"),
      arg("--by", choices=("packets", "drops"), default="packets", help="ranking (default packets)"),
      arg("--shadow", action="store_true", help="rank by what the shadow set would drop"))  # fmt: skip
def top(args, out: Output) -> int:
    r = read_reply(args, out, "TopSources", "TopSourcesRequest", n=args.n, by=args.by, shadow=args.shadow)
    if r is None:
        return EXIT_OK
    what = "shadow would-drops" if args.shadow and args.by == "drops" else args.by
    folded = f"; {r.folded_intervals} folded: sources under 1 pps not summed" if r.folded_intervals else ""
    out.table(f"top sources by {what} (last {r.interval_seconds:.1f} s, {r.tracked_sources:,} tracked{folded})",
              ["source", "rule", "pps", "drop pps", "packets", "drops"],
              [[s.address, s.rule, s.pps, s.drop_pps, s.packets, s.drops] for s in r.sources],
              empty="no samples yet: the agent samples sources every few seconds")  # fmt: skip
    return EXIT_OK


def _shape_table(r):
    """The insight figures behind the reading (see `tidegate insight`), from an InsightResponse."""
    def share(x):
        return f"{x:.0%}"

    h = r.rate_histogram
    spread = ", ".join(f"{f.name.removeprefix('le_')}: {getattr(h, f.name):,}" for f in h.DESCRIPTOR.fields)
    rows = [
        ["sources in the window", f"{r.sources:,}", "first seen within the baseline", share(r.new_source_share)],
        ["packets from known sources", share(r.known_source_packet_share), "top 10 prefixes' share",
         share(r.top_prefixes_packet_share)],
        ["distinct /24 and /48 prefixes", f"{r.distinct_prefixes:,}", "sources per prefix",
         f"{r.sources_per_prefix:g}"],
        ["median pps per source", f"{r.median_source_pps:g}", "traffic vs its baseline",
         f"x{r.traffic_factor:g}" if r.traffic_factor else "-"],
        ["spoof-only address space", share(r.impossible_source_share), "confidence", share(r.confidence)],
    ]  # fmt: skip
    if r.HasField("rate_histogram"):
        rows.append(["sources by pps (<= bucket)", spread, "", ""])
    heavy = ", ".join(f"{p.prefix} ({p.packet_share:.0%}, {p.sources:,} src)" for p in r.top_prefixes[:3])
    if heavy:
        rows.append(["heaviest prefixes", heavy, "", ""])
    return make_table(f"traffic shape: {r.verdict or '?'}", ["figure", "value", "figure", "value"], rows)


def _insight(cl):
    """The agent's last insight reading (an InsightResponse), or None when it has none to give."""
    try:
        return cl.call("Insight", cl.pb.InsightRequest())
    except ClientError:
        return None


def _watch_frame(c, prev, top, server: str, shape=None):
    """One refresh of the live view: rates by reason, per rule, top sources."""
    from rich.console import Group  # lazy: rich only once a verb runs (`tidegate --help` stays fast)
    from rich.text import Text

    dt = (c.time - prev.time) if prev else 0.0
    old_reasons = {(r.verdict, r.reason): r.packets for r in prev.reasons} if prev else {}
    old_rules = {r.rule: r for r in prev.rules} if prev else {}
    pps = per_second(c.packets, prev.packets if prev else None, dt)
    dps = per_second(c.dropped, prev.dropped if prev else None, dt)
    head = Text.assemble(
        ("tidegate ", "bold"), f"{server} — active v{c.active_version}",
        (f", shadow v{c.shadow_version}" if c.shadow_version else ""),
        f" — {pps:,.0f} pps, ", (f"{dps:,.0f} dropped/s", "bold red" if dps else ""),
        f" ({dps / pps:.1%})" if pps else "", "   Ctrl-C to quit",
    )  # fmt: skip
    reasons = make_table("by verdict and reason", ["verdict", "reason", "pps", "packets"],
                         [[r.verdict, r.reason, per_second(r.packets, old_reasons.get((r.verdict, r.reason)), dt),
                           r.packets] for r in c.reasons if r.packets])  # fmt: skip
    rows = []
    for r in c.rules:
        o = old_rules.get(r.rule)
        if r.pass_packets or r.drop_packets:
            rows.append([r.rule, per_second(r.pass_packets, o.pass_packets if o else None, dt),
                         per_second(r.drop_packets, o.drop_packets if o else None, dt), r.drop_packets])  # fmt: skip
    parts = [head, reasons, make_table("per rule", ["rule", "pass pps", "drop pps", "dropped packets"], rows)]
    if c.shadow_version:
        parts.append(make_table(f"shadow v{c.shadow_version} (not enforced)", ["rule", "would drop", "newly"],
                                [[s.rule, s.would_drop, s.would_drop_new] for s in c.shadow if s.packets]))  # fmt: skip
    if top is not None:
        parts.append(make_table(f"top sources by drops (last {top.interval_seconds:.0f} s)",
                                ["source", "rule", "pps", "drop pps"],
                                [[s.address, s.rule, s.pps, s.drop_pps] for s in top.sources]))  # fmt: skip
    if shape is not None:
        if shape.verdict:  # the figures come with the first per-source sample
            parts.append(_shape_table(shape))
        parts.append(Text(shape.reading))
    return Group(*parts)


@verb("watch", "live view: pass/drop by reason, per rule, top sources",
      "Refreshes in place every --interval seconds: packet rates by verdict and reason, per-rule pass and\n"
      "drop rates, the top sources by drops, and the traffic shape (active and new sources, share from\n"
      "known sources, prefix concentration, per-source rate spread) with its plain reading: surge or\n"
      "flood. Ctrl-C leaves (exit 0). With -o json, prints one JSON object per line per update (the\n"
      "counters, and the shape under \"insight\"), for scripts and log shippers.",
      "tidegate watch\n"
      "tidegate watch --interval 0.5\n"
      "tidegate -o json watch --count 10 > counters.jsonl",
      arg("--interval", type=float, default=1.0, metavar="S", help="seconds between updates (default 1)"),
      arg("--count", type=int, default=0, metavar="N", help="stop after N updates (default: until Ctrl-C)"),
      arg("--top", type=int, default=5, metavar="N", help="top sources shown (default 5, 0 hides them)"))  # fmt: skip
def watch(args, out: Output) -> int:
    cl = client_of(args)
    req = cl.pb.WatchRequest(interval_ms=max(100, int(args.interval * 1000)), max_updates=args.count)
    updates = cl.stream("WatchCounters", req)
    try:
        with out.progress(f"connecting to the agent at {args.server} ..."):
            first = next(updates, None)
        if first is None:
            return EXIT_OK
        if out.is_json:
            # each line: the counters, and the traffic-shape figures of the
            # agent's last sample under "insight"
            for c in itertools.chain([first], updates):
                shape = _insight(cl)
                out.json_line({**message_to_dict(c), "insight": message_to_dict(shape) if shape else None})
            return EXIT_OK
        from rich.live import Live  # lazy: see _watch_frame

        def top_sources():
            if args.top <= 0:
                return None
            try:
                return cl.call("TopSources", cl.pb.TopSourcesRequest(n=args.top, by="drops"))
            except ClientError:
                return None

        prev = None
        with Live(_watch_frame(first, None, top_sources(), args.server, _insight(cl)), console=out.console,
                  refresh_per_second=4, auto_refresh=False) as live:  # fmt: skip
            prev = first
            for c in updates:
                live.update(_watch_frame(c, prev, top_sources(), args.server, _insight(cl)), refresh=True)
                prev = c
        if not out.console.is_terminal:
            out.line()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        quiet_broken_pipe()
    return EXIT_OK


@verb("review", "post-deployment review of a version: before and after",
      "Traffic before and after the version became active (pass/drop share and rates, per rule), the\n"
      "sources it newly dropped (not dropped in the 5 min before it), and whether a guard fired. The\n"
      "agent records it when its review period (default 1 h) ends or the version is replaced.",
      "tidegate review 4\n"
      "tidegate -o json review 4",
      version_arg())  # fmt: skip
def review(args, out: Output) -> int:
    if (r := read_reply(args, out, "GetReview", "GetReviewRequest", version=args.version)) is None:
        return EXIT_OK
    e = r.ended
    if r.complete:
        state = "complete"
    elif e.kind == "replaced":
        how = f"{e.how}, {e.cause}" if e.cause else e.how
        state = f"ended after {e.after_seconds:.0f} s: replaced by version {e.by_version} ({how})"
    elif r.final:
        state = f"ended after {e.after_seconds:.0f} s: {e.kind or 'recorded'}"
    else:
        state = "in progress"
    who = f": by {r.author} — {r.reason}" if r.author else ""
    out.line(f"review of version {args.version} ({state}){who}")
    sides = [(name, getattr(r, name)) for name in ("before", "after") if r.HasField(name)]
    for name, s in sides:
        out.line(f"  {name:6s}: {s.pps:,.1f} pps, drop share {s.drop_share:.2%} over {s.seconds:.0f} s")
    before, after = r.before.by_rule_pps, r.after.by_rule_pps
    rules = sorted(set(before) | set(after))
    if rules:
        def cell(side, name, k):
            return getattr(side[name], k) if name in side else 0.0

        out.table("per rule (pps)", ["rule", "pass before", "pass after", "drop before", "drop after"],
                  [[n, cell(before, n, "pass"), cell(after, n, "pass"), cell(before, n, "drop"),
                    cell(after, n, "drop")] for n in rules])  # fmt: skip
    if r.HasField("newly_dropped_sources"):
        floor = "more than " if r.newly_dropped_capped else ""
        out.line(f"  newly dropped sources: {floor}{r.newly_dropped_sources:,} (dropped after the change; not "
                 f"among the {r.before_dropped_sources:,} dropped in the "
                 f"{duration(r.before_sampled_seconds)} sampled before it)")  # fmt: skip
        if r.top_newly_dropped:
            out.table("top newly dropped sources", ["source", "rule", "packets", "drops"],
                      [[s.address, s.rule, s.packets, s.drops] for s in r.top_newly_dropped])  # fmt: skip
    out.line(f"  guard fired: {'YES' if r.guard_fired else 'no'}")
    for g in r.guard:
        out.line(f"    {g.action}: {g.result} {g.detail}")
    if r.note:
        out.line(f"  note: {r.note}")
    return EXIT_OK


def proposal_words(p) -> str:
    """A Proposal in plain words, for the terminal."""
    if p.action == "none":
        return f"no change proposed: {p.reason}"
    w = p.what_if
    return (f"proposed ({p.action}): {p.reason}.\n"
            f"what-if over the last {w.window_seconds:g} s: would newly drop {w.flood_packet_share_dropped:.1%} "
            f"of the flood's passing packets ({w.flood_sources:,} new sources), "
            f"{w.known_packet_share_dropped:.2%} of known sources' packets and "
            f"{w.known_source_share_dropped:.2%} of known sources ({w.known_sources:,}); "
            f"{'within' if w.within_budget else 'OVER'} the blast-radius budget ({w.summary})")  # fmt: skip


def write_proposal(path: str, p) -> None:
    """The candidate rule set of a Proposal as a file, with what it is as a comment."""
    head = [f"# proposed by tidegate insight from a {p.verdict} reading on version {p.based_on_version}",
            f"# {p.action}: {p.reason}",
            "# not applied: review, then `tidegate apply FILE --shadow`"]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n" + p.rule_set)


@verb("insight", "read the traffic's shape: legitimate surge or flood?",
      "A hint from the counters (not a verdict): known versus new sources, concentration in prefixes,\n"
      "heavy hitters.",
      "tidegate insight\n"
      "tidegate insight --propose --out proposal.yaml   # then: tidegate apply proposal.yaml --shadow\n"
      "tidegate -o json insight",
      arg("--propose", action="store_true",
          help="also propose a rule-set change from the reading, with its what-if (nothing is applied)"),
      arg("--out", metavar="FILE", default="proposal.yaml",
          help="with --propose: write the candidate rule set here (default proposal.yaml)"))  # fmt: skip
def insight(args, out: Output) -> int:
    cl = client_of(args)
    r = cl.call("Insight", cl.pb.InsightRequest(propose=args.propose))
    p = r.proposal if r.HasField("proposal") else cl.pb.Proposal(action="none", reason="no reading yet")
    written = False
    if args.propose and p.rule_set:
        try:
            write_proposal(args.out, p)
        except OSError as e:
            raise LocalError(f"{args.out}: cannot write the proposal: {e.strerror}") from None
        written = True
    if out.is_json:
        data = message_to_dict(r)
        if written:
            data["proposal"]["written_to"] = args.out
        out.json(data)
        return EXIT_OK
    out.line(r.reading)
    if args.propose:
        out.line(proposal_words(p))
        if written:
            out.line(f"written to {args.out}: tidegate apply {args.out} --shadow --reason '{p.verdict}: {p.action}'")
    return EXIT_OK
