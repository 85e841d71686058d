#!/usr/bin/env python3
"""Flood over veth: tidegate and its peers end to end, bounded in time.

Set-up (all of it created by this bench under unique names and removed at
the end, also on Ctrl-C or failure):

    netns tg-bf<N>                          netns tg-bf<N>-h
    trafgen (CPU 0) ─┐                      ┌─ the filter under test
    legit sender ────┴─ tgbf<N>p ══ veth ══ tgbf<N>h ─ NAPI kthread (CPU 1) ─ UDP sockets

- Both ends live in namespaces of their own (tidegate.lab.veth.VethLab with
  host_in_ns), so no spoofed packet and no rule of this bench ever touches
  the host's interfaces or firewall.
- Generator: Debian's trafgen (netsniff-ng 0.6.8), pinned to CPU 0, sending
  64-byte UDP frames to port 9 from --sources spoofed addresses in
  198.18.0.0/15, round robin, as fast as it can. trafgen 0.6.8 aborts with
  "Flushing TX_RING failed" as soon as the receiver falls behind (the skbs
  queued on the receiving CPU hold its socket's send-buffer memory, and its
  own sysctl tuning is refused inside a namespace), so it runs under an
  LD_PRELOAD shim (bench/trafgen_retry.c, built with gcc at start) that
  gives its packet socket a 16 MiB send buffer and retries EAGAIN/ENOBUFS:
  backpressure instead of an abort. Without gcc, the bench falls back to
  restarting trafgen in bounded bursts and says so in the results.
- Legitimate stream: --legit-pps UDP packets/s to port 7000 from the
  generator namespace's own address (tidegate.lab.traffic, AF_PACKET, CPU 0),
  counted on arrival by a UDP socket in the receiver namespace.
- Receiver: GRO is switched on for the receiving veth and TSO off for the
  sending one, so veth receives every packet through its NAPI poll (by
  default it does so only with native XDP attached), and that NAPI is made
  threaded: one kthread, pinned
  to CPU 1 (--rx-cpu), does all of this row's receive work: native XDP,
  generic XDP, the netfilter hooks, the IP/UDP stack and socket delivery.

Rows: no filter; XDP_DROP-everything (floor; drops legit traffic too);
minimal BCC token bucket (bench/ref/token_bucket.c) native and generic;
tidegate native and generic with a per-source-limit rule set (what the peers
do) and with the realistic full rule set of the packet-path bench (2x10k
CIDR lists, 50 rules, prefix limits); nftables dynamic set with
`limit rate over` (the `meter` idiom) in the netdev ingress hook and in
ip prerouting; iptables hashlimit --hashlimit-mode srcip in raw PREROUTING,
both with Debian's default iptables (iptables-nft, which translates the rule
into an nft meter) and with iptables-legacy (the xt_hashlimit match).
Every filter gets the same per-source limit: --limit pps, burst 2x.

Each row runs two phases: trafgen at a fixed --rate (default 300 kpps, the
same offered load for every row, so CPU per packet compares like with
like: per-packet cost on the receiving CPU falls as batches grow with load)
and then trafgen as fast as it goes (the heaviest flood this host makes,
for legitimate delivery). Figures per phase, medians over --rounds rounds
(rows interleaved per round):
- offered pps (generator's packets that reached the receive side: veth TX
  minus veth and backlog drops), dropped by the filter per second;
- receive CPU ns per packet: the NAPI kthread's run time (exact, from the
  scheduler clock in /proc/<pid>/schedstat) / packets offered. It is our
  receive work only: other engineers' processes and softirqs on the same
  CPU are not in it (they were in a first version that read the CPU's
  softirq time from /proc/stat, and moved the figures by +-30% between
  rounds). The kthread's tick-sampled utime+stime and CPU 1's whole busy
  time are kept in the JSON as cross-checks;
- legitimate delivery %: legit packets counted at the socket / sent.

Run as root with the project venv or Debian's python3:
  .venv/bin/python bench/veth_flood.py            # 3 rounds, 2 x 8 s per row
  .venv/bin/python bench/veth_flood.py --quick    # 1 round, 2 x 3 s, fewer rows
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

report.use_repo_package()

from flood_filters import Filters  # noqa: E402
from flood_rig import (  # noqa: E402
    FLOOD_NET,
    Generator,
    Receiver,
    backlog_drops,
    cpu_times,
    find_napi_thread,
    link_stats,
    prepare_lab,
    thread_cpu_ns,
    thread_runtime_ns,
)
from tidegate.lab.veth import VethLab  # noqa: E402


# ---------------------------------------------------------------------- measuring
ROWS = {
    "none": "no filter",
    "xdp_drop_native": "XDP_DROP everything, native (floor)",
    "xdp_drop_generic": "XDP_DROP everything, generic (floor)",
    "tb_native": "minimal token bucket, native",
    "tb_generic": "minimal token bucket, generic",
    "tg_simple_native": "tidegate native (per-source limit)",
    "tg_simple_generic": "tidegate generic (per-source limit)",
    "tg_full_native": "tidegate native (full rule set)",
    "tg_full_generic": "tidegate generic (full rule set)",
    "nft_ingress": "nft dynamic set, netdev ingress",
    "nft_prerouting": "nft dynamic set, ip prerouting",
    "iptables": "iptables hashlimit srcip (nft backend)",
    "iptables_legacy": "iptables-legacy hashlimit srcip",
}
QUICK_ROWS = ["none", "tg_simple_native", "tg_simple_generic", "nft_ingress", "nft_prerouting", "iptables_legacy"]


def measure_row(row, lab, filters, gen, recv, args) -> dict:
    """Both phases of one row: the fixed rate, then the generator's maximum."""
    filters.setup(row)
    try:
        return {"fixed": measure_phase(row, lab, filters, gen, recv, args, args.rate),
                "max": measure_phase(row, lab, filters, gen, recv, args, None)}
    finally:
        filters.teardown(row)


def _snapshot(row, lab, filters, recv, args) -> dict:
    return {
        "cpu": cpu_times(args.rx_cpu), "cpu_gen": cpu_times(args.gen_cpu),
        "backlog": backlog_drops(args.rx_cpu), "napi": thread_runtime_ns(filters.napi_pid),
        "napi_ticks": thread_cpu_ns(filters.napi_pid), "napi_pid": find_napi_thread(lab.host_if),
        "gen": link_stats(lab.ns, lab.peer_if), "drops": filters.drops(row), "legit": recv.count,
        "t": time.monotonic(),
    }


def measure_phase(row, lab, filters, gen, recv, args, rate) -> dict:
    # CPU 1's softirq rate with no traffic of ours: other work on the host
    s0, t0 = cpu_times(args.rx_cpu), time.monotonic()
    time.sleep(args.idle)
    s1, t1 = cpu_times(args.rx_cpu), time.monotonic()
    idle_softirq_rate = (s1["softirq"] - s0["softirq"]) / (t1 - t0)
    idle_busy_rate = (s1["busy"] - s0["busy"]) / (t1 - t0)

    before = _snapshot(row, lab, filters, recv, args)
    sent = gen.run(args.seconds, rate)
    time.sleep(0.5)  # let queues drain
    after = _snapshot(row, lab, filters, recv, args)

    wall = after["t"] - before["t"]
    secs = args.seconds
    gen_tx = after["gen"]["tx_packets"] - before["gen"]["tx_packets"]
    veth_drop = after["gen"]["tx_dropped"] - before["gen"]["tx_dropped"]
    backlog = after["backlog"] - before["backlog"]
    offered = gen_tx - veth_drop - backlog
    softirq = after["cpu"]["softirq"] - before["cpu"]["softirq"]
    napi = after["napi"] - before["napi"]
    napi_ticks = after["napi_ticks"] - before["napi_ticks"]
    same_thread = before["napi_pid"] == after["napi_pid"] == filters.napi_pid
    rx_cpu_ns = napi if same_thread else None
    busy = after["cpu"]["busy"] - before["cpu"]["busy"] - idle_busy_rate * wall
    drops = None
    if before["drops"] is not None and after["drops"] is not None:
        drops = after["drops"] - before["drops"]
    elif row.startswith("xdp_drop"):
        drops = offered
    legit_got = after["legit"] - before["legit"]
    return {
        "rate": rate,
        "generator_pps": gen_tx / secs,
        "offered_pps": offered / secs,
        "veth_drops": veth_drop, "backlog_drops": backlog,
        "filter_drops_per_s": drops / secs if drops is not None else None,
        "rx_cpu_ns_per_pkt": rx_cpu_ns / offered if offered > 0 and rx_cpu_ns is not None else None,
        # cross-checks: the same thread's tick-sampled utime+stime, and CPU 1 as a whole
        "rx_thread_ticks_ns_per_pkt": napi_ticks / offered if offered > 0 else None,
        "rx_cpu_busy_ns_per_pkt": busy / offered if offered > 0 else None,
        "rx_cpu_util": napi / (wall * 1e9),
        "napi_thread_ns": napi, "napi_thread_tick_ns": napi_ticks, "cpu_softirq_ns": softirq,
        "idle_softirq_ns_per_s": idle_softirq_rate, "idle_busy_ns_per_s": idle_busy_rate,
        "gen_cpu_softirq_ns": after["cpu_gen"]["softirq"] - before["cpu_gen"]["softirq"],
        "legit_sent": sent["legit_sent"], "legit_received": legit_got,
        "legit_pct": 100.0 * legit_got / sent["legit_sent"] if sent["legit_sent"] else None,
        "trafgen_restarts": sent["trafgen_restarts"], "trafgen_aborts": sent["trafgen_aborts"],
        "wall_s": wall,
    }


def aggregate(runs: list[dict]) -> dict:
    """Median of every numeric figure over the rounds."""
    agg = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        agg[k] = report.median(vals) if vals else None
    return agg


def summarize(results: dict, phase: str) -> str:
    rows = []
    agg = {k: v[phase] for k, v in results["rows"].items()}
    nfts = [agg[k]["rx_cpu_ns_per_pkt"] for k in ("nft_ingress", "nft_prerouting")
            if k in agg and agg[k]["rx_cpu_ns_per_pkt"] is not None]
    nft_best = min(nfts) if nfts else None
    none = agg.get("none", {}).get("rx_cpu_ns_per_pkt")
    for key, label in ROWS.items():
        a = agg.get(key)
        if not a:
            continue
        drops = a["filter_drops_per_s"]
        rows.append([
            label, report.fmt(a["offered_pps"] / 1e3, 0), report.fmt(drops / 1e3 if drops is not None else None, 0),
            report.fmt(a["rx_cpu_ns_per_pkt"], 0), report.fmt(report.ratio(a["rx_cpu_ns_per_pkt"], nft_best), 2),
            report.fmt(report.ratio(a["rx_cpu_ns_per_pkt"], none), 2),
            report.fmt(a["rx_cpu_util"] * 100 if a["rx_cpu_util"] is not None else None, 0),
            report.fmt(a["legit_pct"], 1),
        ])
    return report.table(["row", "offered kpps", "filter drops k/s", "rx CPU ns/pkt", "x best nft", "x no filter",
                         "rx CPU %", "legit %"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="flood time per row and phase (default 8)")
    p.add_argument("--rate", type=int, default=300_000,
                   help="flood rate of the fixed-load phase in pps (default 300000); the second phase runs "
                        "trafgen as fast as it goes")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all rows; medians reported (default 3)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--sources", type=int, default=1024, help="spoofed flood sources (default 1024)")
    p.add_argument("--limit", type=int, default=100, help="per-source limit in pps for every filter, burst 2x")
    p.add_argument("--legit-pps", type=int, default=50, help="legitimate stream rate (default 50)")
    p.add_argument("--gen-cpu", type=int, default=0)
    p.add_argument("--rx-cpu", type=int, default=1)
    p.add_argument("--idle", type=float, default=1.0, help="idle seconds before each row (softirq baseline)")
    p.add_argument("--quick", action="store_true", help="1 round x 3 s, 6 rows, results not saved unless --save")
    p.add_argument("--save", action="store_true")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--name", default="veth_flood")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, min(args.seconds, 3.0)
        if args.rows == ",".join(ROWS):
            args.rows = ",".join(QUICK_ROWS)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows: {bad}")
    if args.gen_cpu == args.rx_cpu or max(args.gen_cpu, args.rx_cpu) >= (os.cpu_count() or 1):
        p.error("--gen-cpu and --rx-cpu must be two different CPUs of this machine")
    report.require_root()
    report.require_bcc()
    for tool in ("trafgen", "nft", "iptables", "taskset", "ip"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (Debian: netsniff-ng, nftables, iptables, util-linux, iproute2)")

    tag = str(os.getpid() % 10000)
    lab = VethLab(f"bf{tag}", subnet=f"192.168.{200 + int(tag) % 50}", host_in_ns=True)
    workdir = Path(tempfile.mkdtemp(prefix="tg-flood-"))
    method = (f"veth pair between two namespaces made by the bench; trafgen on CPU {args.gen_cpu} floods 64-byte "
              f"UDP frames from {args.sources} spoofed sources in {FLOOD_NET} as fast as it can, plus "
              f"{args.legit_pps} pps of legitimate UDP from one address; all receive work in the veth's threaded NAPI "
              f"kthread on CPU {args.rx_cpu} (GRO on, so every row goes through NAPI). Every filter limits each source to {args.limit} pps, burst "
              f"{2 * args.limit}. Each row runs two phases of {args.seconds:g} s: trafgen at {args.rate:,} pps (same load for every row), then "
              f"trafgen as fast as it goes; {args.rounds} round(s), rows interleaved, medians. "
              "rx CPU ns/pkt = NAPI kthread run time (schedstat) / packets offered to the receiver.")
    head = report.header_lines("Flood over veth: tidegate vs nftables, iptables and references", method)
    print("\n".join(head), flush=True)

    results = {"bench": "veth_flood", "machine": report.machine(), "git": report.git_commit(), "method": method,
               "args": vars(args), "runs": {r: [] for r in rows}, "rows": {}, "notes": []}
    gen = filters = recv = None

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        lab.create()
        prepare_lab(lab)
        gen = Generator(lab, args, workdir)
        if gen.shim is None:
            results["notes"].append("gcc missing or the shim did not build: trafgen restarted after each abort")
        else:
            results["notes"].append("trafgen ran under bench/trafgen_retry.c (16 MiB send buffer, EAGAIN/ENOBUFS "
                                    "retried) so it applies backpressure instead of aborting")
        recv = Receiver(lab)
        filters = Filters(lab, args)
        print("loading filters ...", flush=True)
        results["setup"] = filters.load(rows)
        for rnd in range(args.rounds):
            for row in rows:
                print(f"round {rnd + 1}/{args.rounds}: {ROWS[row]} ...", flush=True)
                m = measure_row(row, lab, filters, gen, recv, args)
                results["runs"][row].append(m)
                for phase, x in m.items():
                    print(f"   {phase:5s}: offered {x['offered_pps'] / 1e3:.0f} kpps, rx CPU "
                          f"{report.fmt(x['rx_cpu_ns_per_pkt'], 0)} ns/pkt, drops "
                          f"{report.fmt((x['filter_drops_per_s'] or 0) / 1e3, 0)} k/s, legit "
                          f"{report.fmt(x['legit_pct'], 1)}%", flush=True)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if gen:
            gen.kill()
        if recv:
            recv.close()
        if filters:
            filters.close()
        lab.remove()
        shutil.rmtree(workdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)

    for row, runs in results["runs"].items():
        if runs:
            results["rows"][row] = {ph: aggregate([r[ph] for r in runs]) for ph in ("fixed", "max")}
    text = "\n".join(head + [
        f"### Fixed offered load: trafgen at {args.rate:,} pps (CPU per packet comparable across rows)\n",
        summarize(results, "fixed"), "",
        "### Generator's maximum rate (legitimate delivery under the heaviest flood this host makes)\n",
        summarize(results, "max"), ""] + [f"Note: {n}" for n in results["notes"]])
    print(text[len("\n".join(head)):])
    if not args.no_save and (not args.quick or args.save):
        jp, mp = report.save(args.name + ("-quick" if args.quick else ""), results, text)
        print(f"saved {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
