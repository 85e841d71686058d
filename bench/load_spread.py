#!/usr/bin/env python3
"""Load spread: the same programs loaded several times, each copy measured.

bench/packet_path.py loads every row once. In its cycled cases (64k sources
whose entries miss the caches) one load of a program can differ from the
next load of the very same program by 15-30%: each load gets its own map
memory and its own hash seed, so the entries land on other pages and in
other hash chains. A ratio of two rows loaded once is then partly a draw.
Part of that draw came from walking the 64k sources in the order their
entries were made, which the CPU's prefetchers follow by an amount set by
where a load's entries landed; the cycled cases now walk them in another
fixed order (bench/packet_workload.py VISIT_ORDER), as packet_path does.

Method: --copies loads each of the minimal token bucket (bench/ref/
token_bucket.c, the reference), tidegate's full rule set and the full set
with a shadow set loaded (the rule sets of bench/packet_workload.py), each
copy with maps of its own (1,048,576 entries, prefilled with 1M sources as in
packet_path). Every copy is measured in every case of issue 15's
packet-path rows: hot, 64k of 1M, 64k spread, IPv6 hot and VLAN hot
(BPF_PROG_TEST_RUN, repeat 1,000,000, median of --runs calls, all copies
interleaved in shuffled rounds). Reported per case: each copy's
ns/packet, the spread between copies of one program (max/min), and the
ratio of the medians over copies (tidegate / minimal token bucket).

    sudo .venv/bin/python bench/load_spread.py [--copies 4] [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

report.use_repo_package()
from packet_rows import Bench  # noqa: E402
from packet_workload import (  # noqa: E402
    BIG,
    CYCLE_BASE,
    MAP_SIZE,
    SPREAD_BASE,
    SPREAD_STRIDE,
    VISIT_ORDER,
    frames,
    realistic_lists,
)

PROGRAMS = (("tb", "minimal token bucket"), ("tg_full", "tidegate: full (lists + 50 rules + prefix)"),
            ("tg_shadow", "tidegate: full + shadow set"))  # fmt: skip
# (case, label, frame, cycle): the cases of issue 15's packet-path rows, as packet_path measures them; the hot
# ones too, as one run's verdict on them is a draw as well (README, Figures).
CASES = (("v4", "v4 hot", "v4", None), ("cycle", "v4 64k of 1M", "v4", (CYCLE_BASE, 65536, 1)),
         ("spread", "v4 64k spread", "v4", (SPREAD_BASE, 65536, SPREAD_STRIDE)),
         ("v6", "v6 hot", "v6", None), ("vlan", "VLAN hot", "vlan", None))  # fmt: skip


def load_copies(bench: Bench, copies: int) -> dict[str, list[str]]:
    lists = realistic_lists()
    keys: dict[str, list[str]] = {p: [] for p, _ in PROGRAMS}
    for i in range(copies):  # one copy of each program per round, so no program gets all the early memory
        key = f"tb-{i}"
        bench.add_ref(key, "minimal token bucket", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}"], lru=True)  # fmt: skip
        keys["tb"].append(key)
        for prog, label in PROGRAMS[1:]:
            key = f"{prog}-{i}"
            print(f"loading {label} (copy {i + 1} of {copies}) ...", flush=True)
            bench.load_tidegate(key, label, "full", "pass", lists, shadow=prog == "tg_shadow")
            keys[prog].append(key)
    return keys


def summarize(cases: dict, keys: dict[str, list[str]]) -> tuple[list[list], dict]:
    rows, out = [], {}
    for case, label, _, _ in CASES:
        got = cases[case]
        med = {p: statistics.median(got[k]["ns"] for k in ks) for p, ks in keys.items()}
        out[case] = {"median_ns": med, "ratio": {p: med[p] / med["tb"] for p in keys if p != "tb"}}
        for prog, plabel in PROGRAMS:
            ns = [got[k]["ns"] for k in keys[prog]]
            spread = max(ns) / min(ns) if min(ns) else None
            rows.append([label, plabel, " ".join(f"{x:.0f}" for x in ns), report.fmt(spread, 2),
                         f"{med[prog]:.0f}", report.fmt(med[prog] / med["tb"], 2)])  # fmt: skip
    return rows, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=4, help="loads of each program (default 4)")
    ap.add_argument("--runs", type=int, default=5, help="calls per copy and case; the median is kept (default 5)")
    ap.add_argument("--repeat", type=int, default=1_000_000, help="BPF_PROG_TEST_RUN repeat per call")
    ap.add_argument("--quick", action="store_true", help="2 copies, 3 runs, results printed only")
    args = ap.parse_args()
    if args.quick:
        args.copies, args.runs = 2, 3
    if args.copies < 2 or args.runs < 1 or args.repeat < 1:
        ap.error("--copies must be at least 2, --runs and --repeat positive")
    report.require_root()
    report.require_bcc()
    method = __doc__.split("Method:")[1].split("    sudo")[0].strip().replace("--copies", str(args.copies)).replace(
        "--runs", str(args.runs))
    head = report.header_lines("Load spread: the same programs loaded several times", method)
    print("\n".join(head), flush=True)
    bench = Bench(args)
    results: dict = {"bench": "load_spread", "machine": report.machine(), "git": report.git_commit(),
                     "copies": args.copies, "runs": args.runs, "repeat": args.repeat, "visit_order": VISIT_ORDER,
                     "cases": {}}  # fmt: skip
    try:
        fr = frames()
        bench.load_cyclers()
        keys = load_copies(bench, args.copies)
        every = [k for ks in keys.values() for k in ks]
        print(f"prefilling {len(every)} maps with {MAP_SIZE:,} sources ...", flush=True)
        bench.prefill(every, fr["v4"])
        for case, label, frame, cycle in CASES:
            print(f"case {label}: {len(every)} copies x {args.runs} runs ...", flush=True)
            results["cases"][case] = bench.measure_case(every, fr[frame], cycle=cycle, order=VISIT_ORDER,
                                                        warmup_repeat=2 * 65536 if cycle else None)  # fmt: skip
    finally:
        bench.cleanup()
    rows, results["summary"] = summarize(results["cases"], keys)
    body = report.table(["case", "program", "ns/pkt of each copy", "max / min", "median ns", "x token bucket"],
                        rows)  # fmt: skip
    md = "\n".join(head) + "\n\n" + body + "\n"
    print(body)
    if not args.quick:
        for p in report.save("load_spread", results, md):
            print(f"saved {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
