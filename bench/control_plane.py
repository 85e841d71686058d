#!/usr/bin/env python3
"""Control-plane benchmark: apply latency, counter and source reads,
/metrics scrape time, agent start, memory.

Method: everything runs in this process against the real program (a
test-only pin directory, no interface needed for most rows):
- apply = parse + validate the YAML, build the kernel entries, write a free
  slot, flip the selector, wait for the RCU grace period; rule sets with N
  allow-list CIDRs (plus 50 rules), p50/p99 over repeated applies;
- the per-source LRU is filled to N entries with BPF_MAP_UPDATE_BATCH
  (as if N sources had sent), then: GetCounters (kernel counters), one
  sampler snapshot (batched read of the whole LRU), TopSources from it, and
  a full /metrics render (the agent's collector);
- cold start = compile + load with no pinned maps; warm restart = load
  adopting the pinned maps (what a restarted agent does);
- kernel memory per tracked source = the LRU's memlock / max_entries.

    sudo .venv/bin/python bench/control_plane.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import time

from report import header_lines, machine, pct, save, table, use_repo_package

use_repo_package()

import numpy as np  # noqa: E402

from tidegate.kernel import bpfsys  # noqa: E402
from tidegate.kernel.filter import FilterConfig, KernelFilter  # noqa: E402
from tidegate.kernel.layout import tg_src  # noqa: E402
from tidegate.ruleset.parse import parse_rule_set  # noqa: E402


def rule_set_text(cidrs: int, rules: int = 50, first: int = 0) -> str:
    """`cidrs` allow-list /24s (the first-th /24 from 10.0.0.0 on) and `rules` rules."""
    allow = ", ".join(f'"{10 + i // 65536}.{(i // 256) % 256}.{i % 256}.0/24"' for i in range(first, first + cidrs))
    body = "\n".join(
        f"  - name: r{i}\n    protocol: udp\n    dst_ports: [{1000 + i}]\n    limit: {{pps: 100, burst: 100}}"
        for i in range(rules)
    )
    return f"defaults:\n  limit: {{pps: 1000, burst: 1000}}\nallow: [{allow}]\nrules:\n{body}\n"


def apply_latency(sizes, reps: int, apply_one, out: dict) -> list[list]:
    """Time apply_one(yaml_text, n, i) for rule sets of each size (fewer runs
    for 100,000 entries), twice: the same set applied again and again (the
    slot written holds it already from two applies back: its trie entries
    are left as they are), then a new set each time (every CIDR differs from
    any slot's: every entry is deleted and written). Table rows, and every
    run under out["apply_ms"] and out["apply_new_ms"]. When apply_one returns
    the CPU milliseconds the apply cost (the agent's, read from outside),
    their median is a column of its own, before the run count."""
    rows = []
    for n in sizes:
        runs = reps if n < 100000 else max(3, reps // 4)
        for key, what, texts in (("apply_ms", "the same set", [rule_set_text(n)] * runs),
                                 ("apply_new_ms", "a new set each time",
                                  [rule_set_text(n, first=(i + 1) * n) for i in range(runs)])):  # fmt: skip
            times, cpu = [], []
            for i, text in enumerate(texts):
                t = time.perf_counter()
                used = apply_one(text, n, i)
                times.append((time.perf_counter() - t) * 1000)
                if used is not None:
                    cpu.append(used)
            rows.append([f"{n:,} CIDRs + 50 rules, {what}", f"{pct(times, 50):.1f}", f"{pct(times, 99):.1f}",
                         *([f"{pct(cpu, 50):.0f}"] if cpu else []), len(times)])  # fmt: skip
            out.setdefault(key, {})[n] = {"p50": pct(times, 50), "p99": pct(times, 99), "runs": times,
                                          **({"cpu_ms": cpu} if cpu else {})}  # fmt: skip
    return rows


def trie_floor(sizes, reps: int, out: dict) -> list[list]:
    """The kernel's share of an apply of a new set, measured here for the
    same entries (the /24s of rule_set_text as IPv4 trie keys of one slot,
    bpf/layout.h): a fresh LPM trie like tg_cidrs4 holding one set, then
    per run BPF_MAP_DELETE_BATCH of the n entries it holds and
    BPF_MAP_UPDATE_BATCH of n others, the least an apply that replaces every
    entry must do, with every key and value ready in memory. Table rows, and
    every run under out["trie_floor_ms"]."""
    rows = []
    for n in sizes:
        runs = reps if n < 100000 else max(3, reps // 4)
        sets = []
        for first in range(0, (runs + 1) * n, n):
            keys = np.zeros(n, [("plen", "<u4"), ("slot", "<u4"), ("addr", ">u4")])
            keys["plen"] = 32 + 24
            keys["addr"] = (np.arange(first, first + n, dtype=np.uint32) << 8) + (10 << 24)
            sets.append(keys.tobytes())
        values = np.zeros(n, [("mask", "<u8"), ("flags", "<u4"), ("pad", "<u4")])
        values["flags"] = 1  # CF_ALLOW
        vb = values.tobytes()
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_LPM_TRIE, 12, 16, 2 * n, bpfsys.BPF_F_NO_PREALLOC, b"bench_floor")
        try:
            bpfsys.update_batch(fd, sets[0], vb, n)
            times = []
            for i in range(runs):
                t = time.perf_counter()
                bpfsys.delete_batch(fd, sets[i], n)
                bpfsys.update_batch(fd, sets[i + 1], vb, n)
                times.append((time.perf_counter() - t) * 1000)
        finally:
            os.close(fd)
        rows.append([f"{n:,} entries", f"{pct(times, 50):.1f}", f"{pct(times, 99):.1f}", len(times)])
        out.setdefault("trie_floor_ms", {})[n] = {"p50": pct(times, 50), "p99": pct(times, 99), "runs": times}
    return rows


def fill_sources(kf: KernelFilter, n: int, epoch: int) -> None:
    kf.clear_sources()
    if n:
        fill_sources_fd(kf._tables["tg_state"].map_fd, n, epoch)


def fill_sources_fd(fd: int, n: int, epoch: int) -> None:
    """n per-source entries (10.0.0.0 upwards, default rule) written into the
    LRU behind fd with BPF_MAP_UPDATE_BATCH, as if n sources had sent.

    The LRU keeps one list per CPU (bpf/maps.h): an entry comes from the
    list of the CPU that inserts it, so the writes are spread over every CPU,
    as a NIC's receive queues spread sources, or one CPU's share would cap
    the fill at max_entries / CPUs."""
    kd = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("epoch", "<u4"), ("rule", "u1"), ("kind", "u1"), ("pad", "<u2")])
    vd = np.dtype(tg_src)  # the program's per-source value, as bpf/layout.h lays it out
    k = np.zeros(n, kd)
    addrs = np.arange(n, dtype=np.uint64) + np.uint64(0x0A000000)
    k["lo"] = np.uint64(0xFFFF0000) | (addrs.byteswap() >> np.uint64(32) << np.uint64(32))
    k["epoch"] = epoch
    k["rule"] = 64
    v = np.zeros(n, vd)
    v["packets"] = np.arange(n, dtype=np.uint64) % 1000 + 1
    v["drops"] = np.arange(n, dtype=np.uint64) % 7
    cpus = sorted(os.sched_getaffinity(0))
    per = -(-n // len(cpus))
    try:
        for i, cpu in enumerate(cpus):
            part = slice(i * per, min(n, (i + 1) * per))
            if part.start >= part.stop:
                break
            os.sched_setaffinity(0, {cpu})
            bpfsys.update_batch(fd, k[part].tobytes(), v[part].tobytes(), part.stop - part.start)
    finally:
        os.sched_setaffinity(0, cpus)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    args = ap.parse_args()
    reps = 5 if args.quick else 20
    sizes = [10, 1000, 10000] if args.quick else [10, 1000, 10000, 100000]
    src_sizes = [1000, 100000] if args.quick else [10, 1000, 1_000_000]
    out: dict = {"machine": machine()}
    lines = header_lines("control plane", __doc__.split("Method:")[1].split("    sudo")[0].strip())

    pin = f"bench-cp-{os.getpid()}"
    t0 = time.monotonic()
    kf = KernelFilter(FilterConfig(interface=None, pin_name=pin, max_sources=1 << 20, max_cidrs=3 * 131072))
    kf.load()
    cold = time.monotonic() - t0
    try:
        # ---- apply latency
        applied = []

        def apply_one(text, n, i):
            applied.append(1)
            kf.apply(parse_rule_set(text), len(applied))

        rows = apply_latency(sizes, reps, apply_one, out)
        version = len(applied)
        lines += ["", "### apply (parse + validate + write + atomic swap)", "",
                  table(["rule set", "p50 ms", "p99 ms", "runs"], rows)]  # fmt: skip

        # ---- reads vs tracked sources
        from tidegate.daemon.agent import Agent
        from tidegate.daemon.options import build_parser
        from tidegate.observation.metrics import build_registry
        from tidegate.store import VersionStore
        from prometheus_client import generate_latest

        import tempfile

        tmp = tempfile.mkdtemp(prefix="tg-bench-")
        opts = build_parser().parse_args(["--interface", "lo", "--state-dir", tmp])
        store = VersionStore.open(tmp)
        agent = Agent(kf, store, opts)
        agent.require_attached = lambda: None  # no interface here: the reads are the same
        reg = build_registry(agent)
        rows = []
        epoch = kf.state().active.epoch
        for n in src_sizes:
            fill_sources(kf, n, epoch)
            t = time.perf_counter()
            kf.counters()
            counters_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            agent.sampler.sample()
            agent.sampler.sample()
            sample_ms = (time.perf_counter() - t) * 1000 / 2
            t = time.perf_counter()
            agent.top_sources(10, "packets")
            top_ms = (time.perf_counter() - t) * 1000
            scrapes = []
            for _ in range(5):
                t = time.perf_counter()
                generate_latest(reg)
                scrapes.append((time.perf_counter() - t) * 1000)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append([f"{n:,} ({agent.sampler.tracked_entries:,} in the map)", f"{counters_ms:.1f}",
                         f"{sample_ms:.0f}", f"{top_ms:.1f}",
                         f"{statistics.median(scrapes):.1f}", f"{rss:.0f}"])  # fmt: skip
            out.setdefault("sources", {})[n] = {"counters_ms": counters_ms, "sample_ms": sample_ms, "top_ms": top_ms,
                                                "scrape_ms": statistics.median(scrapes), "max_rss_mb": rss}  # fmt: skip
        lines += ["", "### reads vs tracked sources", "",
                  "GetCounters reads per-CPU counters only; TopSources and /metrics use the sampler's last snapshot, "
                  "so only the sample (one batched read every --sample-interval) grows with the map.", "",
                  table(["tracked sources", "GetCounters ms", "sample (batched read) ms", "TopSources ms",
                         "/metrics ms", "agent max RSS MB"], rows)]  # fmt: skip

        # ---- kernel memory per tracked source
        info = subprocess.run(["bpftool", "-j", "map", "show", "pinned", f"/sys/fs/bpf/tidegate/{pin}/tg_state"],
                              capture_output=True, text=True)  # fmt: skip
        if info.returncode == 0:
            import json

            m = json.loads(info.stdout)
            per = m.get("bytes_memlock", 0) / max(1, m.get("max_entries", 1))
            out["kernel_bytes_per_source"] = per
            lines += ["", f"kernel memory: per-source LRU {m.get('bytes_memlock', 0) / 2**20:.0f} MiB for "
                          f"{m.get('max_entries'):,} entries = {per:.0f} bytes per tracked source (preallocated)"]
    except BaseException:
        kf.close()
        kf.remove_pins()
        raise
    kf.close()
    # ---- warm restart (adopt pinned maps) vs cold start
    kf2 = KernelFilter(FilterConfig(interface=None, pin_name=pin, max_sources=1 << 20, max_cidrs=3 * 131072))
    try:
        t0 = time.monotonic()
        kf2.load()
        warm = time.monotonic() - t0
    finally:
        kf2.close()
        kf2.remove_pins()  # a benchmark leaves nothing behind, even when it fails
    out["cold_start_s"], out["warm_restart_s"] = cold, warm
    lines += ["", f"agent start: cold (compile + load, fresh maps) {cold:.2f} s; warm restart (compile + adopt "
                  f"pinned maps and their {version} versions' slots) {warm:.2f} s"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if not args.quick:  # --quick runs are printed only (bench/README.md)
        save("control_plane", out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
