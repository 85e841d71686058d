#!/usr/bin/env python3
"""Under attack: a flood from 10,000,000 distinct spoofed sources over veth.

Method: a namespace and veth pair made for the run; the real agent on the
host end with a per-source LRU of --max-sources entries (default 262,144,
far fewer than the flood's sources) and a per-/16 prefix limit on the
flooded rule. From inside the namespace: the flood (every packet from the
next address of 10.0.0.0/8 ... i.e. distinct sources, built and sent in
batches of 65,536) and a legitimate client at 50 pps whose packets are
counted at a socket. Meanwhile GetStatus is called over gRPC every 50 ms
and timed. Reported: packets sent, drops by reason, LRU inserts / insert
failures / estimated evictions, tracked entries vs the configured size,
kernel memory of the LRU, agent RSS (/proc/PID/status VmRSS, read with
every GetStatus probe during the flood, and after it), legitimate delivery,
GetStatus p50/p99.

    sudo .venv/bin/python bench/under_attack.py [--sources 10000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import threading
import time

from lab_run import admin_client, lab_agent, lab_with_rules, remove_all, rule_set
from report import header_lines, machine, pct, save, table, use_repo_package

use_repo_package()

RULES = rule_set("app-and-flooded")


def agent_rss_mb(pid: int) -> float:
    return int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=10_000_000)
    ap.add_argument("--max-sources", type=int, default=262_144)
    ap.add_argument("--time-limit", type=float, default=300)
    ap.add_argument("--quick", action="store_true", help="1,000,000 sources")
    args = ap.parse_args()
    if args.quick:
        args.sources = 1_000_000
    tmp, lab = lab_with_rules("ua", "10.210.1", RULES)
    agent = lab_agent(tmp, lab, "attack", metrics=False, sample_interval=5,
                      extra=["--max-sources", str(args.max_sources)])
    procs = []
    try:
        agent.start(timeout=120)
        cl = admin_client(agent, timeout=5)
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind((lab.host_ip, 5555))
        rx.settimeout(0.5)
        received = [0]
        stop = threading.Event()
        flood_on, flood_done = threading.Event(), threading.Event()

        def receive():
            while not stop.is_set():
                try:
                    rx.recv(2048)
                    received[0] += 1
                except socket.timeout:
                    pass

        lat = []
        rss_during = []  # the agent's VmRSS (MB) as seen from outside, read with every probe during the flood

        def probe():
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    cl.call("GetStatus", cl.pb.GetStatusRequest())
                    lat.append((time.perf_counter() - t) * 1000)
                except Exception:
                    lat.append(float("inf"))
                if flood_on.is_set() and not flood_done.is_set():
                    rss_during.append(agent_rss_mb(agent.proc.pid))
                time.sleep(0.05)

        threads = [threading.Thread(target=receive, daemon=True), threading.Thread(target=probe, daemon=True)]
        for t in threads:
            t.start()
        legit_n = int(50 * args.time_limit)
        started = time.monotonic()
        legit = lab.sender("--src", lab.peer_ip, "--dport", "5555", "--count", str(legit_n), "--pps", "50",
                           "--time-limit", str(args.time_limit), stdout=subprocess.PIPE)  # fmt: skip
        flood = lab.sender("--src-net", "10.0.0.0/8", "--sequential", "--count", str(args.sources), "--dport", "9",
                           "--time-limit", str(args.time_limit), stdout=subprocess.PIPE)  # fmt: skip
        procs = [legit, flood]
        flood_on.set()
        flood_out = json.loads(flood.communicate(timeout=args.time_limit + 120)[0])
        flood_s = time.monotonic() - started
        flood_done.set()
        legit.send_signal(signal.SIGTERM)
        legit_out = legit.communicate(timeout=30)[0]
        legit_sent = json.loads(legit_out)["sent"] if legit_out.strip() else int(50 * flood_s)
        time.sleep(1)
        stop.set()
        counters = cl.call("GetCounters", cl.pb.GetCountersRequest())
        status = cl.call("GetStatus", cl.pb.GetStatusRequest())
        rss_kb = agent_rss_mb(agent.proc.pid) * 1024
        mem = subprocess.run(["bpftool", "-j", "map", "show", "pinned", "/sys/fs/bpf/tidegate/bench-attack/tg_state"],
                             capture_output=True, text=True)  # fmt: skip
        m = json.loads(mem.stdout) if mem.returncode == 0 else {}
        reasons = {r.reason: r.packets for r in counters.reasons}
        rules = {r.rule: r for r in counters.rules}
        data = {
            "machine": machine(),
            "flood_sources": args.sources, "flood_sent": flood_out["sent"], "flood_seconds": round(flood_s, 1),
            "flood_pps": round(flood_out["sent"] / flood_s), "reasons": reasons,
            "flooded_rule": {"pass": rules["flooded"].pass_packets, "drop": rules["flooded"].drop_packets,
                             "drop_prefix": rules["flooded"].drop_prefix, "drop_rate": rules["flooded"].drop_rate},
            "lru_inserts": counters.lru_inserts, "lru_insert_failures": counters.lru_insert_failures,
            "lru_evictions_estimated": max(0, counters.lru_inserts - args.max_sources),
            "lru_max_entries": args.max_sources, "tracked_sources": status.tracked_sources,
            "lru_kernel_bytes": m.get("bytes_memlock"), "agent_rss_mb": round(rss_kb / 1024, 1),
            "agent_rss_during_mb": {"n": len(rss_during), "p50": pct(rss_during, 50), "max": max(rss_during, default=None)},
            "legit_sent": legit_sent, "legit_received": received[0],
            "legit_delivery": round(received[0] / max(1, legit_sent), 4),
            "getstatus_ms": {"n": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat) if lat else None},
        }  # fmt: skip
        lines = header_lines("under attack: distinct spoofed sources over veth", __doc__.split("Method:")[1]
                             .split("    sudo")[0].strip())  # fmt: skip
        lines += ["", table(["figure", "value"], [
            ["distinct spoofed sources sent", f"{data['flood_sent']:,} in {data['flood_seconds']} s "
                                              f"({data['flood_pps']:,} pps)"],
            ["flooded rule: dropped / passed", f"{data['flooded_rule']['drop']:,} / {data['flooded_rule']['pass']:,} "
                                               f"(prefix-limit drops {data['flooded_rule']['drop_prefix']:,})"],
            ["LRU inserts / insert failures", f"{data['lru_inserts']:,} / {data['lru_insert_failures']:,}"],
            ["LRU evictions (estimated)", f"{data['lru_evictions_estimated']:,}"],
            ["tracked entries vs configured", f"{data['tracked_sources']:,} (LRU size {args.max_sources:,})"],
            ["LRU kernel memory", f"{(data['lru_kernel_bytes'] or 0) / 2**20:.0f} MiB (fixed by the configured size)"],
            ["agent RSS during the flood (VmRSS, median / max)",
             f"{data['agent_rss_during_mb']['p50']:.0f} / {data['agent_rss_during_mb']['max']:.0f} MB "
             f"({data['agent_rss_during_mb']['n']} readings)"],
            ["agent RSS after the flood", f"{data['agent_rss_mb']} MB"],
            ["legitimate delivery", f"{data['legit_received']:,} of {data['legit_sent']:,} "
                                    f"({data['legit_delivery']:.2%})"],
            ["GetStatus during the flood", f"p50 {data['getstatus_ms']['p50']:.1f} ms, p99 "
                                           f"{data['getstatus_ms']['p99']:.1f} ms ({len(lat)} calls)"],
        ])]  # fmt: skip
        text = "\n".join(lines)
        print(text)
        if not args.quick:  # --quick runs are printed only (bench/README.md)
            save("under_attack", data, text)
        return 0
    finally:
        remove_all(tmp, lab, agent, procs)


if __name__ == "__main__":
    raise SystemExit(main())
