#!/usr/bin/env python3
"""Packet-path benchmark: tidegate's XDP program next to the floor and its peers.

Every row is an XDP program run by the kernel itself with BPF_PROG_TEST_RUN
(repeat = --repeat per call, default 1,000,000; the kernel reports the mean
ns per run of that call). Each figure is the median of --runs calls (default
5). All rows are loaded at the same time and measured in interleaved rounds
(round r measures every row once, in a shuffled order), so load from other
processes on the machine hits all rows alike; ratios are taken between rows
of the same run only.

Rows
  bare XDP_DROP            `return XDP_DROP;`
  parse+drop (floor)       Ethernet, up to 2 VLAN tags, IPv4/IPv6 source, drop
  parse+drop+ktime         the floor plus one bpf_ktime_get_ns()
  parse+drop+coarse        the floor plus one bpf_ktime_get_coarse_ns()
  parse+drop+jiffies       the floor plus one bpf_jiffies64() (tidegate's
                           bucket clock)
  minimal token bucket     bench/ref/token_bucket.c: per-source bucket in an
                           LRU hash with bpf_ktime_get_ns (the afternoon job);
                           the ratios are taken against this row
  token bucket variants    the same with the coarse clock, and with per-CPU
                           LRU lists (BPF_F_NO_COMMON_LRU): what two one-line
                           changes to the reference would buy; and with
                           tidegate's entry size (its state key and value,
                           sized from kernel/layout.py): what the size alone
                           costs
  xdp-filter               Debian's xdp-tools program (all features, allow
                           policy, a few filter entries), loaded by
                           `xdp-filter load` on a veth pair this bench makes,
                           fetched by id
  tidegate: ...            bpf/tidegate.c compiled by the kernel layer
                           (KernelFilter) with rule-set variants: defaults
                           only; + prefix limit; + allow/deny lists of 10,000
                           CIDRs each; 50 rules with ports instead of lists;
                           the full set (lists + 50 rules + prefix limits);
                           the full set with a shadow set loaded

Cases
  v4 hot        one IPv4/UDP source, within its rate (every bucket passes)
  v4 hot over   one IPv4/UDP source over its rate (limits 100 pps / burst
                100: the token-bucket rows drop it)
  v6 hot        one IPv6/UDP source, within its rate
  VLAN hot      one 802.1Q-tagged IPv4/UDP source, within its rate
  v4 64k of 1M  65,536 sources in round robin, per-source maps prefilled
                with 1,048,576 other sources first
  v4 64k spread 65,536 sources spread over all of IPv4 (a random-source
                flood: some fall in the allow/deny lists), maps full
  v4 hot, 1M    the hot source again, with the map full (1M entries)
  v4 2M churn   2,097,152 sources round robin through maps of 1,048,576:
                every packet is a source the map no longer holds

Probe rows (bench/ref/lookup_probe.c) price single lookups with tidegate's
layout and alternatives, filled with the entries of the full rule set.

How the cycled case works: BPF_PROG_TEST_RUN repeats one frame, and the
frame's bytes persist between repeats, so bench/ref/source_cycler.c rewrites
the frame's source address and tail-calls the row's program. Prefill is the
same front end with 1,048,576 sources, a block from each CPU, pinned to it
(tidegate's maps keep an LRU list per CPU, each holding its share of the
entries, as under a flood that comes in on every CPU). A warm-up makes the
64k sources' entries in the order of their addresses; the measured calls
then walk them in another fixed order (run n: source n x --visit-order mod
65536), as a flood's sources do not come back in the order their entries
were made.
Walked in that same order, the CPU's prefetchers fetched each next entry
ahead of its packet, by an amount that depended on where the kernel's LRU
had placed a row's entries: the same program read 30-45% apart depending on
whether its prefill and warm-up had evicted entries on the CPU that measured
it (--visit-order 1 measures that walk again). Every row of that case
carries the front end's cost; "cycler+bare" measures it.

Also measured: agent-side load time (KernelFilter.load() = BCC compile +
map creation, + apply of a small rule set + native attach to a veth), median
of --load-runs.

Run as root with the project venv or Debian's python3:
  .venv/bin/python bench/packet_path.py            # full run, saves results
  .venv/bin/python bench/packet_path.py --quick    # fewer runs, not saved
While iterating, --cases and --rows measure a subset (never saved), e.g.
  .venv/bin/python bench/packet_path.py --quick --cases v4,cycle --rows tg_full,tg_shadow
A change to the program is measured against the code before it in the same
run (rows move by tens of ns between runs on a shared host): --against DIR
loads the tidegate rows a second time from another bpf/ directory (a
worktree of an earlier commit), labelled with its commit, e.g.
  git worktree add /tmp/before HEAD~1
  .venv/bin/python bench/packet_path.py --no-save --cases v4,v6,cycle,spread \
      --rows tg_full,tg_shadow --against /tmp/before/bpf
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

report.use_repo_package()

from packet_report import (  # noqa: E402
    cost_breakdown,
    cycler_cost,
    issue2_lines,
    pieces_table,
    reference_table,
    summarize,
    targets_table,
)
from packet_rows import Bench  # noqa: E402
from packet_workload import (  # noqa: E402
    BIG,
    CHURN_SOURCES,
    CYCLE_BASE,
    MAP_SIZE,
    PREFILL_BASE,
    SMALL,
    SPREAD_BASE,
    SPREAD_STRIDE,
    VISIT_ORDER,
    entry_pads,
    frames,
    realistic_lists,
    rule_set,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1_000_000, help="BPF_PROG_TEST_RUN repeat per call (default 1e6)")
    p.add_argument("--runs", type=int, default=5, help="calls per row and case; the median is reported (default 5)")
    p.add_argument("--load-runs", type=int, default=5, help="agent load-time samples (default 5)")
    p.add_argument("--quick", action="store_true", help="3 runs, 2 load samples, results not saved unless --save")
    p.add_argument("--save", action="store_true", help="with --quick: save anyway (as <name>-quick)")
    p.add_argument("--name", default="packet_path", help="results file name under bench/results/")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--cases", help="comma-separated case keys to measure (v4,over,v6,vlan,cycle,spread,hot1m,churn); "
                   "a subset is never saved")
    p.add_argument("--rows", help="comma-separated tidegate row keys to load (tg_defaults,tg_full,tg_shadow,...); "
                   "a subset is never saved")
    p.add_argument("--visit-order", type=int, default=VISIT_ORDER, metavar="N",
                   help=f"cycled cases: run n shows source (n * N) mod 65536 (default {VISIT_ORDER}; 1 walks them in "
                   "the order their entries were made, as runs before 954acb3 did; not saved unless the default)")
    p.add_argument("--against", metavar="DIR",
                   help="also load the tidegate rows from this bpf/ directory (never saved)")
    args = p.parse_args(argv)
    if args.against and not os.path.exists(os.path.join(args.against, "tidegate.c")):
        p.error(f"{args.against}/tidegate.c does not exist: --against names a bpf/ directory")
    if args.cases or args.rows or args.against or args.visit_order != VISIT_ORDER:
        args.no_save = True
    want_case = set(args.cases.split(",")) if args.cases else None
    if args.quick:
        args.runs = min(args.runs, 3)
        args.load_runs = min(args.load_runs, 2)
    if args.repeat < 1:
        p.error("--repeat must be positive")
    if args.visit_order % 2 == 0:
        p.error("--visit-order must be odd (an even one shows only some of the sources)")
    report.require_root()
    report.require_bcc()

    method = (f"BPF_PROG_TEST_RUN, repeat {args.repeat:,} per call, median of {args.runs} calls per row, all rows "
              "loaded together and measured in shuffled interleaved rounds; 64-byte UDP frames (68 with VLAN, 84 "
              "IPv6). Cycled case: bench/ref/source_cycler.c rewrites the source per run and tail-calls the row; the "
              f"measured calls walk the 64k sources in a fixed order unrelated to the order their entries were made "
              f"(run n: source n x {args.visit_order} mod 65536).")
    head = report.header_lines("Packet path: tidegate vs the floor and its peers", method)
    print("\n".join(head), flush=True)

    bench = Bench(args)
    interrupted = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    results: dict = {"bench": "packet_path", "machine": report.machine(), "git": report.git_commit(),
                     "method": method, "repeat": args.repeat, "runs": args.runs, "visit_order": args.visit_order,
                     "cases": {}, "labels": {},
                     "setup": {}}
    try:
        fr = frames()
        t0 = time.monotonic()
        lists = realistic_lists()
        results["setup"]["lists_s"] = round(time.monotonic() - t0, 2)
        bench.make_veth()
        print("loading reference programs ...", flush=True)
        bench.add_ref("bare", "bare XDP_DROP", "bare_drop.c")
        bench.add_ref("parse", "parse+drop (floor)", "parse_drop.c")
        bench.add_ref("parse_ktime", "parse+drop + bpf_ktime_get_ns", "parse_drop.c", ["-DCLOCK=1"])
        bench.add_ref("parse_coarse", "parse+drop + bpf_ktime_get_coarse_ns", "parse_drop.c", ["-DCLOCK=2"])
        bench.add_ref("parse_jiffies", "parse+drop + bpf_jiffies64", "parse_drop.c", ["-DCLOCK=3"])
        bench.add_ref("tb", "minimal token bucket", "token_bucket.c", [f"-DRATE={BIG}", f"-DBURST={BIG}",
                                                                        f"-DMAX_SOURCES={MAP_SIZE}"], lru=True)
        bench.add_ref("tb_coarse", "token bucket, coarse clock (variant)", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}", "-DCOARSE_CLOCK=1"], lru=True)
        bench.add_ref("tb_pcpu", "token bucket, per-CPU LRU lists (variant)", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}", "-DLRU_FLAGS=2"], lru=True)
        key_pad, val_pad = entry_pads()
        bench.add_ref("tb_big", "token bucket, tidegate's entry size (variant)", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}", f"-DKEY_PAD={key_pad}",
                       f"-DVAL_PAD={val_pad}"], lru=True)
        bench.add_ref("tb_over", "minimal token bucket (100 pps)", "token_bucket.c",
                      [f"-DRATE={SMALL}", f"-DBURST={SMALL}", f"-DMAX_SOURCES={MAP_SIZE}"], lru=True)
        bench.load_cyclers()
        bench.load_xdp_filter(lists)
        tg = [
            ("tg_defaults", "tidegate: defaults only", "defaults", "pass", False),
            ("tg_prefix", "tidegate: defaults + prefix limit", "prefix", "pass", False),
            ("tg_lists", "tidegate: + allow/deny 2x10k CIDRs", "lists", "pass", False),
            ("tg_rules_any", "tidegate: + 50 rules (ports, any source)", "rules-any", "pass", False),
            ("tg_rules", "tidegate: + 50 rules (ports, 10 with CIDRs)", "rules", "pass", False),
            ("tg_full", "tidegate: full (lists + 50 rules + prefix)", "full", "pass", False),
            ("tg_shadow", "tidegate: full + shadow set", "full", "pass", True),
            ("tg_defaults_over", "tidegate: defaults only (100 pps)", "defaults", "over", False),
            ("tg_full_over", "tidegate: full (100 pps)", "full", "over", False),
            ("tg_shadow_over", "tidegate: full + shadow (100 pps)", "full", "over", True),
        ]
        if args.rows:
            tg = [t for t in tg if t[0] in args.rows.split(",")]
        if args.against:
            at = report.short_commit(args.against)
            tg += [(f"{k}@{at}", f"{label} [at {at}]", v, m, sh) for k, label, v, m, sh in tg]
        for key, label, variant, mode, shadow in tg:
            print(f"loading {label} ...", flush=True)
            # the rows of --against compile the other bpf/ (loader.bpf_source_dir)
            with mock.patch.dict(os.environ, {"TIDEGATE_BPF_DIR": args.against} if "@" in key else {}):
                results["setup"][key] = bench.load_tidegate(key, label, variant, mode, lists, shadow)
        print("loading lookup probes ...", flush=True)
        results["setup"]["probes"] = bench.load_probes(rule_set("full", "pass", lists))
        results["labels"] = {k: r.label for k, r in bench.rows.items()}
        probes = [k for k in bench.rows if k.startswith("probe_")]

        common = ["bare", "parse", "parse_ktime", "parse_coarse", "parse_jiffies"] + (["xdpf"] if "xdpf" in bench.rows else [])
        pass_tg = [k for k, _, _, m, _ in tg if m == "pass"]
        over_tg = [k for k, _, _, m, _ in tg if m == "over"]
        tbs = ["tb", "tb_coarse", "tb_pcpu", "tb_big"]
        for ckey, frame, keys in (("v4", fr["v4"], common + tbs + pass_tg + probes),
                                  ("over", fr["v4"], common + ["tb_over"] + over_tg),
                                  ("v6", fr["v6"], common + tbs + pass_tg),
                                  ("vlan", fr["vlan"], common + tbs + pass_tg)):
            if want_case is not None and ckey not in want_case:
                continue
            print(f"case {ckey}: {len(keys)} rows x {args.runs} runs ...", flush=True)
            c = bench.measure_case(keys, frame)
            c["_tb"] = "tb_over" if ckey == "over" else "tb"
            c["_floor"] = "parse"
            results["cases"][ckey] = c

        lru_rows = tbs + pass_tg
        cyc_keys = ["bare", "parse"] + (["xdpf", "bare37"] if "xdpf" in bench.rows else []) + lru_rows

        def wanted(ckey):
            return want_case is None or ckey in want_case

        if want_case is None or want_case & {"cycle", "spread", "hot1m"}:
            print(f"prefilling {len(lru_rows)} maps with {MAP_SIZE:,} sources ...", flush=True)
            results["prefill"] = bench.prefill(lru_rows, fr["v4"])
        for ckey, cycle in (("cycle", (CYCLE_BASE, 65536, 1)), ("spread", (SPREAD_BASE, 65536, SPREAD_STRIDE))):
            if not wanted(ckey):
                continue
            keys = cyc_keys + probes
            print(f"case {ckey}: {len(keys)} rows x {args.runs} runs ...", flush=True)
            c = bench.measure_case(keys, fr["v4"], cycle=cycle, warmup_repeat=2 * 65536, order=args.visit_order)
            c["_tb"], c["_floor"] = "tb", "parse"
            results["cases"][ckey] = c
        if wanted("hot1m"):
            results["entries_after_cycle"] = {k: bench.map_entries(bench.rows[k]) for k in lru_rows}
            print("case hot1m ...", flush=True)
            c = bench.measure_case(common + lru_rows, fr["v4"])
            c["_tb"], c["_floor"] = "tb", "parse"
            results["cases"]["hot1m"] = c
        if wanted("churn"):
            print(f"case churn: {len(cyc_keys)} rows x {args.runs} runs ...", flush=True)
            c = bench.measure_case(cyc_keys, fr["v4"], cycle=(PREFILL_BASE, CHURN_SOURCES, 1),
                                   warmup_repeat=MAP_SIZE)
            c["_tb"], c["_floor"] = "tb", "parse"
            results["cases"]["churn"] = c

        if args.load_runs and want_case is None and not args.rows:
            print(f"agent load time x {args.load_runs} ...", flush=True)
            results["load_time"] = bench.load_times(args.load_runs)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        bench.cleanup()
        return 130
    finally:
        bench.cleanup()
        for s, h in old.items():
            signal.signal(s, h)

    results["notes"] = bench.notes
    body, _ = summarize(results)
    md = head + ["### Targets: tidegate / minimal token bucket (issue 15's packet-path rows first)\n",
                 targets_table(results), "",
                 "The verdict is on the ratio of the two rows' medians. The last column pairs the two rows "
                 "within each round instead (both measured under the same load) and gives the median and "
                 "quartiles of those ratios: a verdict whose quartiles straddle the target is not settled by "
                 "this run.", "",
                 "### Against the reference figures quoted in issue 7 (another machine)\n",
                 reference_table(results), "", body, "### Where tidegate's time goes (ns differences between rows, same run)\n",
                 cost_breakdown(results), "",
                 "### Single lookups: tidegate's layouts and alternatives (same entries as the full set)\n",
                 pieces_table(results), ""]
    if "prefill" in results:
        md += ["Per-source map entries after the 1M prefill: " + ", ".join(
            f"{results['labels'][k]} {v['entries']:,}" for k, v in results["prefill"].items()
            if v["entries"] is not None) + ".", ""]
    md += [f"Cycled-case front end (cycler + bare drop minus bare drop): "
           f"{report.fmt(cycler_cost(results), 1)} ns per packet, carried by every row of that case.", ""]
    if "load_time" in results:
        lt = results["load_time"]
        md += [f"Agent load time (KernelFilter.load + apply + native attach on veth), median of "
               f"{len(lt['runs'])}: {lt['total_s']:.2f} s, of which BCC compile + load {lt['compile_s']:.2f} s.", ""]
    md += issue2_lines(results)
    for n in bench.notes:
        md.append(f"Note: {n}")
    text = "\n".join(md)
    print(text[len("\n".join(head)):])
    if not args.no_save and (not args.quick or args.save):
        name = args.name + ("-quick" if args.quick else "")
        jp, mp = report.save(name, results, text)
        print(f"saved {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
