#!/usr/bin/env python3
"""Insight under load: is the reading fresh while a flood saturates the machine?

Method: a namespace and veth pair made for the run; the real agent on the
host end (sample interval --sample-interval, default 1 s). From inside the
namespace, --senders senders flood as fast as they can from a pool of
100,000 spoofed sources spread over the whole IPv4 space (the outage's
shape). Meanwhile the Insight RPC is called over gRPC every 200 ms and
timed; each answer carries the age of the newest sample and the sampler
thread's CPU seconds. Reported: the flood's rate at the agent, the sample
age (p50, p99, max, against two sample intervals), the sampler's CPU share
of one core and of the machine, the agent's CPU share, the Insight call's
p50/p99, the readings' verdicts, and how many said STALE.

    sudo .venv/bin/python bench/insight_fresh.py [--seconds 60] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections import Counter

from lab_run import admin_client, lab_agent, lab_with_rules, remove_all, rule_set
from report import header_lines, machine, pct, save, table, use_repo_package

use_repo_package()

RULES = rule_set("flooded")


def proc_cpu_seconds(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--sample-interval", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="20 s, printed only")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 20
    tmp, lab = lab_with_rules("if", "10.210.7", RULES)
    agent = lab_agent(tmp, lab, "fresh", metrics=False, sample_interval=args.sample_interval)
    procs = []
    try:
        agent.start(timeout=120)
        cl = admin_client(agent, timeout=10)
        time.sleep(3 * args.sample_interval)  # a baseline of silence
        c0 = cl.call("GetCounters", cl.pb.GetCountersRequest())
        for i in range(args.senders):
            procs.append(lab.sender("--src-net", "0.0.0.0/0", "--sources", "100000", "--seed", str(i + 1),
                                    "--count", str(int(400_000 * args.seconds)), "--dport", "9",
                                    "--time-limit", str(args.seconds), stdout=subprocess.PIPE))  # fmt: skip
        time.sleep(2)  # the senders build their frames first
        lat, ages, verdicts, stale = [], [], Counter(), 0
        first = None
        cpu0, t0 = proc_cpu_seconds(agent.proc.pid), time.monotonic()
        while any(p.poll() is None for p in procs):
            t = time.perf_counter()
            r = cl.call("Insight", cl.pb.InsightRequest())
            lat.append((time.perf_counter() - t) * 1000)
            if r.verdict:  # the figures come with the first per-source sample
                ages.append(r.sample_age_seconds)
                verdicts[r.verdict] += 1
                stale += r.stale
                first = first if first is not None else r.sampler
                last = r.sampler
            time.sleep(0.2)
        wall = time.monotonic() - t0
        agent_cpu = proc_cpu_seconds(agent.proc.pid) - cpu0
        c1 = cl.call("GetCounters", cl.pb.GetCountersRequest())
        for p in procs:
            p.communicate(timeout=60)
        sampler_cpu = last.cpu_seconds - first.cpu_seconds if first is not None else 0.0
        ncpu = os.cpu_count() or 1
        data = {
            "machine": machine(), "seconds": round(wall, 1), "senders": args.senders,
            "sample_interval": args.sample_interval,
            "flood_pps_at_agent": round((c1.packets - c0.packets) / max(1e-9, c1.time - c0.time)),
            "sample_age_s": {"p50": pct(ages, 50), "p99": pct(ages, 99), "max": max(ages) if ages else None,
                             "limit": 2 * args.sample_interval},
            "stale_readings": stale, "readings": len(ages), "verdicts": dict(verdicts),
            "sampler_cpu_share_of_one_core": round(sampler_cpu / wall, 4),
            "sampler_cpu_share_of_machine": round(sampler_cpu / wall / ncpu, 4),
            "agent_cpu_share_of_one_core": round(agent_cpu / wall, 4),
            "insight_ms": {"n": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat) if lat else None},
        }  # fmt: skip
        lines = header_lines("insight under load: freshness during a veth flood", __doc__.split("Method:")[1]
                             .split("    sudo")[0].strip())  # fmt: skip
        a = data["sample_age_s"]
        lines += ["", table(["figure", "value"], [
            ["flood at the agent",
             f"{data['flood_pps_at_agent']:,} pps for {data['seconds']} s ({args.senders} senders)"],
            ["sample age p50 / p99 / max", f"{a['p50']} / {a['p99']} / {a['max']} s (two intervals: {a['limit']:g} s)"],
            ["readings that said STALE", f"{stale} of {len(ages)}"],
            ["verdicts", ", ".join(f"{k} {v}" for k, v in verdicts.most_common())],
            ["sampler CPU", f"{data['sampler_cpu_share_of_one_core']:.1%} of a core "
                            f"({data['sampler_cpu_share_of_machine']:.1%} of the machine)"],
            ["agent CPU", f"{data['agent_cpu_share_of_one_core']:.1%} of a core"],
            ["Insight call p50 / p99", f"{data['insight_ms']['p50']:.1f} / {data['insight_ms']['p99']:.1f} ms "
                                       f"({len(lat)} calls)"],
        ])]  # fmt: skip
        text = "\n".join(lines)
        print(text)
        if not args.quick:
            save("insight_fresh", data, text)
        return 0
    finally:
        remove_all(tmp, lab, agent, procs)


if __name__ == "__main__":
    raise SystemExit(main())
