#!/usr/bin/env python3
"""Where a compile of the XDP program spends its time.

Method: each compile runs in a new Python process, as the agent's compile
child does, with the agent's build options (pin dir of its own, 1,048,576
sources); its CPU time (user + system, getrusage) is read around
- BCC's compile: `BPF(text=...)`, clang's front end (BCC parses the source
  twice: its rewriter, then the compile), LLVM and the maps' creation;
- the kernel's verifier: `load_func`, the load of the instructions;
for these builds, interleaved, --rounds times each (medians):
- the program as it is (bpf/kernel_defs.h: its own few kernel definitions),
  built as the compile child builds it: no debug info (-g0), and in a
  mount namespace where /proc/kallsyms holds the two lines BCC asks of it
  (kernel/compiler.py own_mounts);
- the same as BCC builds it by default: debug info, the whole
  /proc/kallsyms;
- the same with the kernel headers it included before instead
  (<linux/in.h>, if_ether.h, ip.h, ipv6.h, jiffies.h);
- a program that returns XDP_PASS: BCC's own floor (its helpers, the
  kernel config, its two passes), as the compile child builds it and as
  BCC does by default;
- with --against DIR, the program of another bpf/ directory too (a
  worktree of an earlier commit: `git worktree add /tmp/before COMMIT`),
  so that a change to the program is measured against the code before it
  in the same run.
The kernel's tag of each load (a hash of the instructions, map fds left
out) shows the first two are the same program. Each load's size (the
instructions the kernel holds, bytes) and the instructions its verifier
walked (bpf_prog_info.verified_insns) are read from the kernel.

    sudo .venv/bin/python bench/compile_time.py [--rounds N] [--quick] [--against DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import header_lines, machine, require_bcc, require_root, save, short_commit, table, use_repo_package

use_repo_package()

from tidegate.kernel import loader  # noqa: E402
from tidegate.kernel.filter import FilterConfig, bpf_source_dir, inline_source  # noqa: E402

KERNEL_HEADERS = "".join(f"#include <linux/{h}.h>\n" for h in ("in", "if_ether", "ip", "ipv6", "jiffies"))
FLOOR = "#include <uapi/linux/bpf.h>\nint tidegate_xdp(struct xdp_md *ctx) { return XDP_PASS; }\n"

# run in a new process per compile: BCC's state (and LLVM's) never carries over
CHILD = """
import json, resource, sys
from bcc import BPF
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
flags = json.loads(sys.argv[1])
if sys.argv[2] == "child":
    from tidegate.kernel.compiler import own_mounts
    own_mounts(False)
source = sys.stdin.read()
c0 = cpu()
b = BPF(text=source, cflags=flags)
c1 = cpu()
fn = b.load_func(b"tidegate_xdp", BPF.XDP)
c2 = cpu()
from tidegate.kernel import bpfsys
pi = bpfsys.prog_info(fn.fd)
print(json.dumps({"compile_cpu_s": c1 - c0, "verify_cpu_s": c2 - c1, "tag": bytes(pi.tag).hex(),
                  "bytes": pi.xlated_prog_len, "verified_insns": pi.verified_insns}))
"""


BCC_DEFAULT = "bcc"  # a build as BCC makes it by default; "child": as the compile child makes it


def builds(against: str | None) -> dict[str, tuple[str, str]]:
    """Each row's (source, how it is built)."""
    src = loader.program_source()
    ours = "/* --- kernel_defs.h --- */\n" + inline_source(bpf_source_dir() / "kernel_defs.h")
    if src.count(ours) != 1:
        raise SystemExit("bpf/tidegate.c does not include kernel_defs.h once: nothing to compare")
    out = {"program (kernel_defs.h)": (src, "child"),
           "program, as BCC builds it by default (debug info, the whole /proc/kallsyms)": (src, BCC_DEFAULT)}
    if against:
        out[f"program at {short_commit(against)} (--against)"] = (inline_source(Path(against) / "tidegate.c"), "child")
    return {**out, "program with the kernel's headers": (src.replace(ours, KERNEL_HEADERS), "child"),
            "XDP_PASS (BCC's floor)": (FLOOR, "child"),
            "XDP_PASS, as BCC builds it by default": (FLOOR, BCC_DEFAULT)}  # fmt: skip


def compile_once(source: str, flags: list[str], how: str) -> dict:
    # the child reads the load's tag and size with tidegate's bpfsys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if how == BCC_DEFAULT:
        flags = [f for f in flags if f != "-g0"]
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(flags), how], input=source, capture_output=True,
                       text=True, timeout=300, check=False, env=env)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"compile failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="two rounds, results printed only")
    ap.add_argument("--against", metavar="DIR", help="also compile the program of this bpf/ directory")
    args = ap.parse_args()
    if args.against and not (Path(args.against) / "tidegate.c").exists():
        ap.error(f"{args.against}/tidegate.c does not exist: --against names a bpf/ directory")
    require_root()
    require_bcc()
    rounds = 2 if args.quick else args.rounds
    pin_root = tempfile.mkdtemp(prefix="tg-bench-compile-", dir="/sys/fs/bpf")
    config = FilterConfig(interface=None, pin_root=pin_root, pin_name="bench", max_sources=1 << 20)
    out: dict = {"machine": machine(), "uptime": open("/proc/loadavg").read().split()[:3], "runs": {}}
    try:
        loader.ensure_bpffs()
        os.makedirs(config.pin_dir, mode=0o700)
        flags = loader.cflags(config)
        rows_built = builds(args.against)
        for _ in range(rounds):
            for name, (src, how) in rows_built.items():
                out["runs"].setdefault(name, []).append(compile_once(src, flags, how))
    finally:
        loader.remove_pins(config.pin_dir)
        os.rmdir(pin_root)
    rows = []
    for name, runs in out["runs"].items():
        c = statistics.median(r["compile_cpu_s"] for r in runs)
        v = statistics.median(r["verify_cpu_s"] for r in runs)
        tags = sorted({r["tag"] for r in runs})
        size, walked = runs[-1].get("bytes"), runs[-1].get("verified_insns")
        rows.append([name, f"{c:.2f}", f"{v:.2f}", f"{c + v:.2f}", f"{size:,}" if size else "-",
                     f"{walked:,}" if walked else "-", ", ".join(tags)])  # fmt: skip
    method = __doc__.split("Method:")[1].split("    sudo")[0].strip()
    text = "\n".join(header_lines("compile time of the XDP program", method))
    text += "\n\n" + table(["source", "BCC compile, CPU s", "verifier, CPU s", "total", "bytes loaded",
                             "instructions verified", "kernel tag"], rows)  # fmt: skip
    text += f"\n\nload average at the run: {' '.join(out['uptime'])}; {rounds} rounds"
    print(text)
    if not args.quick:
        save("compile_time", out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
