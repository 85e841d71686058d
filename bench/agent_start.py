#!/usr/bin/env python3
"""The agent's start-up and memory, measured from outside the process.

Method: a network namespace and veth pair are created for the run and a
real `tidegate agent` starts on the host end (its own state dir and pins,
--max-sources 1,048,576, a 10-CIDR + 50-rule set). Figures:
- fresh start, compiling = exec of `tidegate agent` with nothing attached,
  pinned or cached to the first gRPC health check that answers (SERVING:
  attached; compile in a child, load, apply, attach, serve); the first
  start, and again with the program unpinned and <state-dir>/program-cache
  removed (median of 1 + --restarts runs);
- fresh start, cached program = the same with the program and maps
  unpinned (`tidegate detach`, a reboot) but the first start's compile kept
  in <state-dir>/program-cache: loaded with the bpf syscalls, no compile
  (median of --restarts runs, each round one start from the cache, one
  compiling, one reference, so that all three see the same machine load);
- idle RSS = VmRSS of the agent from /proc/PID/status after two samples
  (--sample-interval 2) with no traffic;
- RSS with 1M sources = the pinned LRU filled with 1,048,576 entries by
  BPF_MAP_UPDATE_BATCH from this process, then two samples; VmRSS (median
  of 20 readings over 10 s) and VmHWM (peak) from /proc/PID/status;
- restart = SIGTERM, then exec to the first health answer again, with the same
  program attached and pinned (median of --restarts runs);
- each start also as a ratio to a same-run reference: exec of Python
  importing the agent's modules;
- the package's bytecode is compiled first, as the Debian package ships
  it: no start compiles modules from source;
- the start-up lines the agent logged (its progress) are counted, and
  how many starts compiled (from the log's `program compiled` lines; an
  agent that compiles in process at every start logs `program loaded`
  without `compiled=`).

    sudo .venv/bin/python bench/agent_start.py [--out FILE] [--before FILE]
    sudo .venv/bin/python bench/agent_start.py --against DIR [--pairs N]

--before FILE prints the figures of an earlier run (e.g. of the previous
commit) beside this one's, as one table. On a shared host a start moves by
half a second from one run to the next, more than most changes to it:
--against DIR (another checkout, e.g. `git worktree add /tmp/before
HEAD~1`) measures only the starts, in --pairs rounds that each start this
tree's agent and then DIR's (its control/ and bpf/, on this Python): fresh
start compiling, fresh start cached, restart; the medians, and in how many
rounds this tree's start was the faster. Printed only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from lab_run import lab_with_rules, remove_all
from report import bytecode_as_installed, header_lines, machine, save, table, use_repo_package

use_repo_package()

from agent_process import Agent, active_epoch, fill_sources  # noqa: E402
from control_plane import rule_set_text  # noqa: E402

from tidegate.daemon.early import PROGRAM_CACHE  # noqa: E402

ROWS = (
    ("fresh_start_s", "fresh start to serving, compiling: nothing cached, attached or pinned (s)", "{:.2f}"),
    ("cached_start_s", "fresh start to serving, cached program: nothing attached or pinned (s)", "{:.2f}"),
    ("restart_s", "restart to serving, same program attached (s)", "{:.2f}"),
    ("import_floor_s", "reference: exec + import of the agent's modules, no work (s)", "{:.2f}"),
    ("fresh_over_floor", "fresh start, compiling / that reference", "{:.2f}"),
    ("cached_over_floor", "fresh start, cached program / that reference", "{:.2f}"),
    ("restart_over_floor", "restart / that reference", "{:.2f}"),
    ("compiled_at_fresh_start", "compiles at the compiling fresh starts", "{}"),
    ("compiled_at_cached_start", "compiles at the cached fresh starts", "{}"),
    ("compiled_at_restart", "compiles at the restarts", "{}"),
    ("idle_rss_mb", "agent RSS idle (MB)", "{:.0f}"),
    ("lru_rss_mb", "agent RSS, 1M-entry LRU full, median over 10 s (MB)", "{:.0f}"),
    ("lru_hwm_mb", "agent peak RSS, 1M-entry LRU full (MB)", "{:.0f}"),
    ("startup_log_lines", "start-up log lines (progress)", "{}"),
)


def compiles(lines: list[str]) -> int:
    """Compiles a start's log shows: a compile child, or (agents that compiled
    in process at every start) a `program loaded` line without `compiled=`."""
    return sum('msg="program compiled"' in ln or ('msg="program loaded"' in ln and "compiled=" not in ln)
               for ln in lines)  # fmt: skip


def log_since(path: Path, offset: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def _fmt(fmt: str, v) -> str:
    return "-" if v is None else fmt.format(v)


def import_floor() -> float:
    """The same-run reference: a Python process that imports what the agent
    imports and exits (what any restart of a Python agent pays)."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import tidegate.daemon.main, tidegate.api.server, tidegate.observation.metrics"], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    return time.monotonic() - t0


def against(other: Path, pairs: int) -> int:
    """Starts of this tree's agent and of `other`'s, alternating (see --against)."""
    import report

    if not (other / "control" / "tidegate").is_dir() or not (other / "bpf" / "tidegate.c").exists():
        raise SystemExit(f"{other} is not a tidegate checkout (control/tidegate and bpf/tidegate.c)")
    bytecode_as_installed(other / "control")
    at = report.short_commit(other)
    here = Path(report.__file__).resolve().parents[1] / "control"
    trees = {f"this tree ({report.git_commit()['commit'][:7]})": here, f"{at} (--against)": other / "control"}
    kinds = ("fresh start, compiling (s)", "fresh start, cached program (s)", "restart, same program attached (s)")
    runs: dict = {t: {k: [] for k in kinds} for t in trees}
    tmp, lab = lab_with_rules("ba", "10.213.10", rule_set_text(10))
    # the `tidegate` command as installed, but of the tree on PYTHONPATH (its entry, or cli.main before it had one)
    exe = tmp / "tidegate"
    exe.write_text(f"#!{sys.executable}\nimport sys\ntry:\n    from tidegate.cli.entry import main\n"
                   "except ImportError:\n    from tidegate.cli.main import main\nsys.exit(main())\n")  # fmt: skip
    exe.chmod(0o755)
    agent = Agent(lab, tmp / "state", tmp / "rules.yaml", exe=str(exe))
    try:
        for i in range(pairs):
            for tree, path in trees.items():
                # the agent's imports, its compile child's and its bpf/
                with mock.patch.dict(os.environ, {"PYTHONPATH": str(path)}):
                    for kind in kinds:
                        if agent.proc is not None and agent.proc.poll() is None:
                            agent.stop()
                        if kind != kinds[2]:
                            agent.remove_kernel_objects()
                        if kind == kinds[0]:
                            shutil.rmtree(agent.state_dir / PROGRAM_CACHE, ignore_errors=True)
                        runs[tree][kind].append(agent.start())
            print(f"round {i + 1}: " + "; ".join(f"{t}: " + " / ".join(f"{r[k][-1]:.2f}" for k in kinds)
                                                 for t, r in runs.items()), flush=True)  # fmt: skip
    finally:
        remove_all(tmp, lab, agent)
    mine, theirs = runs.values()
    rows = [[k, f"{statistics.median(mine[k]):.2f}", f"{statistics.median(theirs[k]):.2f}",
             f"{sum(a < b for a, b in zip(mine[k], theirs[k]))} of {pairs}"] for k in kinds]  # fmt: skip
    print("\n" + table(["start (median of the rounds)", *trees, "rounds this tree was faster"], rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--before", help="JSON of an earlier run, printed beside this one")
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one restart, results printed only")
    ap.add_argument("--against", metavar="DIR", help="only the starts, alternating with another checkout's agent")
    ap.add_argument("--pairs", type=int, default=8, help="rounds of --against (default 8)")
    args = ap.parse_args()
    bytecode_as_installed()
    if args.against:
        return against(Path(args.against).resolve(), args.pairs)
    if args.quick:
        args.restarts = 1
    out: dict = {"machine": machine(), "uptime": Path("/proc/loadavg").read_text().split()[:3]}
    tmp, lab = lab_with_rules("bs", "10.213.9", rule_set_text(10))
    agent = Agent(lab, tmp / "state", tmp / "rules.yaml")
    try:
        agent.remove_kernel_objects()
        off = 0
        out["fresh_start_s"] = agent.start()
        lines = log_since(agent.log_path, off)
        out["startup_log_lines"] = len(lines)
        out["compiled_at_fresh_start"] = compiles(lines)
        time.sleep(5)
        out["idle_rss_mb"] = agent.memory_mb()[0]
        pin_dir = Path("/sys/fs/bpf/tidegate") / agent.pin
        fill_sources(pin_dir, 1 << 20, active_epoch(pin_dir))
        time.sleep(5)
        rss = []
        for _ in range(20):  # the sampler's snapshots come and go: the median over 10 s, and the peak
            rss.append(agent.memory_mb()[0])
            time.sleep(0.5)
        out["lru_rss_mb"], out["lru_hwm_mb"] = statistics.median(rss), agent.memory_mb()[1]
        restarts, compiled = [], 0
        for _ in range(args.restarts):
            agent.stop()
            off = agent.log_path.stat().st_size
            restarts.append(agent.start())
            compiled += compiles(log_since(agent.log_path, off))
        out["restart_s"] = statistics.median(restarts)
        out["restart_runs_s"] = restarts
        out["compiled_at_restart"] = compiled
        # then rounds of: a start from the cache, a start with nothing cached either, the reference; so that
        # the three see the same load from whatever else runs on the machine
        fresh, cached, floor = [out.pop("fresh_start_s")], [], []
        out["compiled_at_cached_start"] = 0
        for _ in range(args.restarts):
            for kind in ("cached", "fresh"):
                agent.stop()
                agent.remove_kernel_objects()  # `tidegate detach`, or a reboot
                if kind == "fresh":
                    shutil.rmtree(agent.state_dir / PROGRAM_CACHE, ignore_errors=True)
                off = agent.log_path.stat().st_size
                (cached if kind == "cached" else fresh).append(agent.start())
                lines = log_since(agent.log_path, off)
                out[f"compiled_at_{kind}_start"] += compiles(lines)
                if kind == "cached":
                    out["cached_log"] = [ln for ln in lines if "program" in ln]
            floor.append(import_floor())
        out["fresh_start_s"], out["fresh_runs_s"] = statistics.median(fresh), fresh
        out["cached_start_s"], out["cached_runs_s"] = statistics.median(cached), cached
        out["import_floor_s"], out["import_floor_runs_s"] = statistics.median(floor), floor
        for key in ("fresh", "cached", "restart"):
            out[f"{key}_over_floor"] = out[f"{key}_start_s" if key != "restart" else "restart_s"] / out["import_floor_s"]
        out["log_tail"] = log_since(agent.log_path, off)
    finally:
        remove_all(tmp, lab, agent)
    method = __doc__.split("Method:")[1].split("    sudo")[0].strip()
    text = "\n".join(header_lines("agent start-up and memory", method))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    heads = ["measure", "this run"] if before is None else ["measure", "before", "after"]
    rows = []
    for key, label, fmt in ROWS:
        row = [label] + ([_fmt(fmt, before.get(key))] if before else []) + [_fmt(fmt, out[key])]
        rows.append(row)
    load = f"load average at the run: {' '.join(out['uptime'])}"
    if before:
        load += f" (before: {' '.join(before.get('uptime', ['?']))}, commit {before.get('commit', '?')})"
    text += "\n\n" + table(heads, rows) + "\n\n" + load + "\n\nthe last cached start's program lines:\n\n" + "\n".join(
        "    " + ln for ln in out["cached_log"]) + "\n\nthe last start's log:\n\n" + "\n".join(
        "    " + ln for ln in out["log_tail"])
    print(text)
    if args.quick:
        return 0
    if args.out:
        import report

        Path(args.out).write_text(json.dumps({"commit": report.git_commit()["commit"][:12], **out}, indent=1) + "\n")
    else:
        save("agent_start", {**out, "before": before}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
