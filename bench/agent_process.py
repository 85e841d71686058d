#!/usr/bin/env python3
"""The agent as an operator runs it: a real `tidegate agent` process on a
veth pair, measured from outside through its gRPC API and /metrics.

Method: a network namespace and veth pair are created for the run; the
agent starts on the host end with a state dir of its own. Figures:
- cold start = exec of `tidegate agent` to the first gRPC health check
  answering (SERVING: attached) (Python start, compile, load, apply --rules, attach, serve);
- apply over gRPC (ApplyRuleSet: parse, validate, blast-radius estimate
  (no traffic flows during the applies: it has nothing to classify), store,
  write, swap, review) of rule sets with N allow-list CIDRs plus 50 rules,
  p50/p99, for the same set applied again and again and for a new set each
  time (every trie entry replaced), one after the other; the agent trims a
  retired slot of 4,096 entries or more after answering, on a thread of its
  own, so an apply's time includes what is left of the previous one's trim;
  next to it, measured in this run, the kernel's floor for the new set:
  batched delete of the n trie entries a slot holds and batched write of n
  new ones, keys and values ready;
- the pinned per-source LRU is filled with N entries by BPF_MAP_UPDATE_BATCH
  from this process (as if N sources had sent); after the agent's next two
  samples: GetCounters, TopSources and a /metrics scrape (HTTP GET), medians
  of 5, and the agent's resident memory (VmRSS, VmHWM from /proc);
- the package's bytecode is compiled first, as the Debian package ships it;
- after the runs of new 100,000-CIDR sets, 3 more applied with 1,000
  tracked sources (the blast-radius estimate classifies them): the agent's
  resident memory, and rollbacks over gRPC between the last two versions;
- the agent's memory over many applies: 60 more 100,000-CIDR sets (30
  sets in turn, each new to the slots it is written to), one after the
  other, VmRSS read 1 s after each, by thirds (does it settle or grow?);
- quick blocks: DenyAdd then DenyRemove over gRPC, one after the other, on
  a set whose deny list holds 100,000 CIDRs (each a new version);
- warm restart = SIGTERM, then exec to attached again (adopting the
  attached program and pinned maps; the interface stays filtered).

    sudo .venv/bin/python bench/agent_process.py [--quick] [--no-save] [--apply-only] [--blocks-only]
        [--memory-only] [--agent-exe PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import urllib.request
from pathlib import Path

from lab_run import lab_with_rules, remove_all
from report import bytecode_as_installed, header_lines, machine, pct, save, table, use_repo_package

use_repo_package()

import grpc  # noqa: E402

from tidegate.kernel import bpfsys  # noqa: E402
from tidegate.lab.launcher import AgentProcess  # noqa: E402
from tidegate.lab.veth import VethLab  # noqa: E402
from tidegate.v1 import tidegate_pb2 as pb  # noqa: E402
from tidegate.v1 import tidegate_pb2_grpc as pbg  # noqa: E402

from control_plane import apply_latency, fill_sources_fd, rule_set_text, trie_floor  # noqa: E402


class Agent(AgentProcess):
    """The agent under measurement: started by the launcher everything else uses."""

    def __init__(self, lab: VethLab, state: Path, rules: Path, exe: str | None = None):
        super().__init__(lab.host_if, state, pin_name=f"bench-agent-{os.getpid()}", rules=rules, sample_interval=2,
                         extra=["--no-blast-check"], exe=exe)  # fmt: skip
        self.lab = lab

    @property
    def pin(self) -> str:
        return self.pin_name

    @property
    def mport(self) -> int:
        return self.metrics_port

    def start(self) -> float:
        """Seconds from exec to the first health answer (attached: it starts with --rules)."""
        t0 = time.monotonic()
        super().start(timeout=120)
        return time.monotonic() - t0

    def stub(self):
        ch = grpc.insecure_channel(self.server)
        return pb, pbg.FilterStub(ch), [("authorization", f"Bearer {self.token()}"), ("tidegate-author", "bench")]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the agent process so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self) -> tuple[float, float]:
        fields = {}
        for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = ln.partition(":")
            fields[k] = v.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def active_epoch(pin_dir: Path) -> int:
    """The active slot's epoch, read from the pinned maps (bpf/layout.h)."""
    fd = bpfsys.obj_get(str(pin_dir / "tg_ctl"))
    try:
        _, v, _ = bpfsys.lookup_batch(fd, 4, 8, 1)
        slot = int(v[0])
    finally:
        os.close(fd)
    fd = bpfsys.obj_get(str(pin_dir / "tg_sets"))
    try:
        vsz = bpfsys.map_info(fd).value_size
        _, v, _ = bpfsys.lookup_batch(fd, 4, vsz, 3)
        return int(v[slot * vsz + 8: slot * vsz + 12].view("<u4")[0])
    finally:
        os.close(fd)


def fill_sources(pin_dir: Path, n: int, epoch: int) -> None:
    fd = bpfsys.obj_get(str(pin_dir / "tg_state"))
    try:
        fill_sources_fd(fd, n, epoch)
    finally:
        os.close(fd)


def timed(fn, runs: int = 5) -> float:
    xs = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and sizes, results printed only")
    ap.add_argument("--no-save", action="store_true", help="print the results only (bench/results/ is left as it is)")
    ap.add_argument("--apply-only", action="store_true", help="the apply rows and the kernel's floor only (no "
                    "source fill, reads or restart); results printed only")  # fmt: skip
    ap.add_argument("--agent-exe", metavar="PATH", help="run this executable as `tidegate` for the agent (another "
                    "checkout's, for a before/after pair in one session); implies --no-save")  # fmt: skip
    ap.add_argument("--blocks-only", action="store_true", help="the quick-block rows only (100,000-CIDR deny list); "
                    "results printed only")  # fmt: skip
    ap.add_argument("--memory-only", action="store_true", help="the agent's memory over 60 applies of "
                    "100,000-CIDR sets only; results printed only")  # fmt: skip
    args = ap.parse_args()
    bytecode_as_installed()
    reps = 5 if args.quick else 20
    sizes = [10, 1000, 10000] if args.quick else [10, 1000, 10000, 100000]
    src_sizes = [1000, 100000] if args.quick else [1000, 1_000_000]
    out: dict = {"machine": machine()}
    lines = header_lines("the agent process", __doc__.split("Method:")[1].split("    sudo")[0].strip())

    if args.agent_exe:
        lines += [f"The agent ran as `{args.agent_exe}` (--agent-exe), not this checkout's `tidegate`.", ""]
    tmp, lab = lab_with_rules("ba", "10.213.7", rule_set_text(10))
    agent = Agent(lab, tmp / "state", tmp / "rules.yaml", exe=args.agent_exe)
    try:
        cold = agent.start()
        pb, stub, md = agent.stub()
        if args.blocks_only:
            _printed(lines + quick_blocks(agent, stub, md, 100000, reps, out))
            return 0
        if args.memory_only:
            _printed(lines + memory_over_applies(agent, stub, md, RSS_APPLIES, out))
            return 0

        def apply_one(text, n, i):
            cpu = agent.cpu_seconds()
            stub.ApplyRuleSet(pb.ApplyRequest(yaml=text, reason=f"bench {n} #{i}", no_guard=True), metadata=md,
                              timeout=60)  # fmt: skip
            return (agent.cpu_seconds() - cpu) * 1000

        rows = apply_latency(sizes, reps, apply_one, out)
        lines += ["", "### ApplyRuleSet over gRPC (parse, validate, store, write, swap)", "",
                  "agent CPU: user + system time of the agent process (all its threads) over the call, from "
                  "/proc/PID/stat (10 ms ticks); unlike the wall time it hardly moves with the machine's load.", "",
                  table(["rule set", "p50 ms", "p99 ms", "agent CPU ms p50", "runs"], rows)]  # fmt: skip
        big = [n for n in sizes if n >= 10000]
        rows = trie_floor(big, reps, out)
        lines += ["", "### the kernel's floor for a new set (same entries, this run)", "",
                  table(["trie entries", "p50 ms", "p99 ms", "runs"], rows), "",
                  "apply of a new set / that floor, p50: " + ", ".join(
                      f"{n:,}: {out['apply_new_ms'][n]['p50'] / out['trie_floor_ms'][n]['p50']:.1f}x" for n in big)]

        if 100000 in sizes:
            lines += after_large_applies(agent, stub, md, reps, out)
            lines += memory_over_applies(agent, stub, md, RSS_APPLIES, out)
        lines += quick_blocks(agent, stub, md, 100000 if 100000 in sizes else 10000, reps, out)
        if args.apply_only:
            _printed(lines)
            return 0
        pin_dir = Path("/sys/fs/bpf/tidegate") / agent.pin
        rows = []
        metrics_url = f"http://127.0.0.1:{agent.mport}/metrics"
        for n in src_sizes:
            fill_sources(pin_dir, n, active_epoch(pin_dir))
            time.sleep(5)  # two samples of the agent's --sample-interval 2
            counters = timed(lambda: stub.GetCounters(pb.GetCountersRequest(), metadata=md, timeout=30))
            top = timed(lambda: stub.TopSources(pb.TopSourcesRequest(n=10, by="packets"), metadata=md, timeout=30))
            status = stub.GetStatus(pb.GetStatusRequest(), metadata=md, timeout=30)
            scrape = timed(lambda: urllib.request.urlopen(metrics_url, timeout=30).read())
            rss, hwm = agent.memory_mb()
            rows.append([f"{n:,}", f"{status.tracked_sources:,}", f"{counters:.1f}", f"{top:.1f}", f"{scrape:.1f}",
                         f"{rss:.0f}", f"{hwm:.0f}"])  # fmt: skip
            out.setdefault("sources", {})[n] = {"tracked": status.tracked_sources, "counters_ms": counters,
                                                "top_ms": top, "scrape_ms": scrape, "rss_mb": rss, "hwm_mb": hwm}
        lines += ["", "### reads against the live agent vs tracked sources", "",
                  table(["sources filled", "tracked (GetStatus)", "GetCounters ms", "TopSources ms", "/metrics ms",
                         "agent RSS MB", "agent peak RSS MB"], rows)]  # fmt: skip

        agent.stop()
        warm = agent.start()
        out["cold_start_s"], out["warm_restart_s"] = cold, warm
        lines += ["", f"agent start, exec to attached and serving: cold (fresh maps) {cold:.2f} s; warm restart "
                      f"(adopting the attached program and pinned maps) {warm:.2f} s"]  # fmt: skip
    finally:
        remove_all(tmp, lab, agent)
    text = _printed(lines)
    if not args.quick and not args.no_save and not args.agent_exe:
        save("agent_process", out, text)
    return 0


def after_large_applies(agent: Agent, stub, md, reps: int, out: dict) -> list[str]:
    """The agent's memory after new 100,000-CIDR sets applied with sources to
    classify (1,000 tracked: the blast-radius estimate classifies them
    against each set), the last one active; then rollbacks between the last
    two of them: each target is parsed again from the store (the agent
    keeps parsed versions besides the kernel's own only up to a budget of
    networks)."""
    pin_dir = Path("/sys/fs/bpf/tidegate") / agent.pin
    versions, seen = [], []
    for i in range(3):
        fill_sources(pin_dir, 1000, active_epoch(pin_dir))
        time.sleep(2.5)  # a sample of the agent's --sample-interval 2: the estimate's window has them
        r = stub.ApplyRuleSet(pb.ApplyRequest(yaml=rule_set_text(100000, first=(100 + i) * 100000),
                                              reason=f"bench classified #{i}", no_guard=True), metadata=md, timeout=60)
        versions.append(r.version)
        seen.append(r.estimate.sources_seen)
    time.sleep(5)  # two samples
    rss, hwm = agent.memory_mb()
    times = []
    for i in range(max(4, reps // 4)):
        t = time.perf_counter()
        stub.Rollback(pb.RollbackRequest(to_version=versions[-2:][i % 2], reason=f"bench rollback #{i}"),
                      metadata=md, timeout=60)  # fmt: skip
        times.append((time.perf_counter() - t) * 1000)
    out["after_100k_applies"] = {"rss_mb": rss, "hwm_mb": hwm, "estimate_sources_seen": seen}
    out["rollback_100k_ms"] = {"p50": statistics.median(times), "max": max(times), "n": len(times)}
    return ["", "### after the applies of new 100,000-CIDR sets (the last one active)", "",
            f"3 more new sets applied with 1,000 tracked sources (the estimates classified {', '.join(map(str, seen))} "
            f"sources); then agent RSS {rss:.0f} MB (peak so far {hwm:.0f} MB); rollback over gRPC to the version "
            f"before or back (100,000 CIDRs, parsed again from the store): p50 {statistics.median(times):.0f} ms, "
            f"max {max(times):.0f} ms, {len(times)} runs"]  # fmt: skip


RSS_APPLIES = 60


def memory_over_applies(agent: Agent, stub, md, k: int, out: dict) -> list[str]:
    """The agent's resident memory over k applies of 100,000-CIDR sets (30 in
    turn: each differs from the two the slots hold; no sources to classify),
    read 1 s after each, by thirds: whether it settles or keeps growing with
    the number of applies."""
    rss = []
    for i in range(k):
        stub.ApplyRuleSet(pb.ApplyRequest(yaml=rule_set_text(100000, first=(130 + i % 30) * 100000),
                                          reason=f"bench memory #{i}", no_guard=True), metadata=md, timeout=120)
        time.sleep(1)
        rss.append(agent.memory_mb()[0])
    hwm = agent.memory_mb()[1]
    third = max(1, k // 3)
    parts = {"first": rss[:third], "middle": rss[third:-third], "last": rss[-third:]}
    out["rss_over_applies_mb"] = {"after_each": rss, "hwm": hwm,
                                  **{f"{w}_third": {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}
                                     for w, xs in parts.items()}}  # fmt: skip
    said = "; ".join(f"{w} {len(xs)}: {min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f} MB"
                     for w, xs in parts.items())  # fmt: skip
    return ["", f"### the agent's memory over {k} more applies of 100,000-CIDR sets", "",
            f"VmRSS 1 s after each apply, lowest / median / highest {said}; peak RSS so far {hwm:.0f} MB"]


def quick_blocks(agent: Agent, stub, md, n: int, reps: int, out: dict) -> list[str]:
    """DenyAdd and DenyRemove over gRPC (a quick block and its removal, each a new version: the
    active set with one deny entry more or less, validated, stored, written, swapped) on a set
    whose deny list holds n CIDRs, one after the other, with the agent's CPU time."""
    from tidegate.v1 import blocklist_pb2 as bpb
    from tidegate.v1 import blocklist_pb2_grpc as bpbg

    deny = ", ".join(f'"{20 + i // 65536}.{(i // 256) % 256}.{i % 256}.0/24"' for i in range(n))
    stub.ApplyRuleSet(pb.ApplyRequest(yaml=f"deny: [{deny}]\n" + rule_set_text(10), reason=f"bench deny {n}",
                                      no_guard=True), metadata=md, timeout=120)  # fmt: skip
    blocks = bpbg.BlocklistStub(grpc.insecure_channel(agent.server))
    times: dict[str, list[float]] = {"add": [], "remove": []}
    cpu: dict[str, list[float]] = {"add": [], "remove": []}
    for i in range(reps):
        cidr = f"203.0.{i % 256}.0/24"
        for verb, call, req in (("add", blocks.DenyAdd, bpb.DenyAddRequest(cidr=cidr, ttl_seconds=600, reason="bench")),
                                ("remove", blocks.DenyRemove, bpb.DenyRemoveRequest(cidr=cidr, reason="bench"))):
            c, t = agent.cpu_seconds(), time.perf_counter()
            call(req, metadata=md, timeout=60)
            times[verb].append((time.perf_counter() - t) * 1000)
            cpu[verb].append((agent.cpu_seconds() - c) * 1000)
    rows = []
    for verb in ("add", "remove"):
        ts, p50, p99, c50 = times[verb], pct(times[verb], 50), pct(times[verb], 99), pct(cpu[verb], 50)
        out.setdefault("quick_block_ms", {})[verb] = {"deny_cidrs": n, "p50": p50, "p99": p99, "cpu_ms_p50": c50,
                                                      "runs": ts}  # fmt: skip
        rows.append([f"Deny{verb.capitalize()}", f"{p50:.0f}", f"{p99:.0f}", f"{c50:.0f}", len(ts)])
    return ["", f"### quick blocks on a deny list of {n:,} CIDRs (DenyAdd, then DenyRemove, over gRPC)", "",
            table(["call", "p50 ms", "p99 ms", "agent CPU ms p50", "runs"], rows)]


def _printed(lines: list[str]) -> str:
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
