#!/usr/bin/env python3
"""Where a compile of the XDP program spends its time.

Method: each compile runs in a new Python process, as the agent's compile
child does, with the agent's build options (pin dir of its own, 1,048,576
sources); its CPU time (user + system, getrusage) is read around
- BCC's compile: `BPF(text=...)`, clang's front end (BCC parses the source
  twice: its rewriter, then the compile), LLVM and the maps' creation;
- the kernel's verifier: `load_func`, the load of the instructions;
for three sources, interleaved, --rounds times each (medians):
- the program as it is (bpf/kernel_defs.h: its own few kernel definitions);
- the same with the kernel headers it included before instead
  (<linux/in.h>, if_ether.h, ip.h, ipv6.h, jiffies.h);
- a program that returns XDP_PASS: BCC's own floor (its helpers, the
  kernel config, its two passes).
The kernel's tag of each load (a hash of the instructions, map fds left
out) shows the first two are the same program.

    sudo .venv/bin/python bench/compile_time.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from report import header_lines, machine, require_bcc, require_root, save, table, use_repo_package

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
source = sys.stdin.read()
c0 = cpu()
b = BPF(text=source, cflags=flags)
c1 = cpu()
fn = b.load_func(b"tidegate_xdp", BPF.XDP)
c2 = cpu()
info = open(f"/proc/self/fdinfo/{fn.fd}").read()
tag = [ln.split()[1] for ln in info.splitlines() if ln.startswith("prog_tag:")][0]
print(json.dumps({"compile_cpu_s": c1 - c0, "verify_cpu_s": c2 - c1, "tag": tag}))
"""


def sources() -> dict[str, str]:
    src = loader.program_source()
    ours = "/* --- kernel_defs.h --- */\n" + inline_source(bpf_source_dir() / "kernel_defs.h")
    if src.count(ours) != 1:
        raise SystemExit("bpf/tidegate.c does not include kernel_defs.h once: nothing to compare")
    return {"program (kernel_defs.h)": src, "program with the kernel's headers": src.replace(ours, KERNEL_HEADERS),
            "XDP_PASS (BCC's floor)": FLOOR}  # fmt: skip


def compile_once(source: str, flags: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(flags)], input=source, capture_output=True,
                       text=True, timeout=300, check=False)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"compile failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="two rounds, results printed only")
    args = ap.parse_args()
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
        srcs = sources()
        for _ in range(rounds):
            for name, src in srcs.items():
                out["runs"].setdefault(name, []).append(compile_once(src, flags))
    finally:
        loader.remove_pins(config.pin_dir)
        os.rmdir(pin_root)
    rows = []
    for name, runs in out["runs"].items():
        c = statistics.median(r["compile_cpu_s"] for r in runs)
        v = statistics.median(r["verify_cpu_s"] for r in runs)
        tags = sorted({r["tag"] for r in runs})
        rows.append([name, f"{c:.2f}", f"{v:.2f}", f"{c + v:.2f}", ", ".join(tags)])
    method = __doc__.split("Method:")[1].split("    sudo")[0].strip()
    text = "\n".join(header_lines("compile time of the XDP program", method))
    text += "\n\n" + table(["source", "BCC compile, CPU s", "verifier, CPU s", "total", "kernel tag"], rows)
    text += f"\n\nload average at the run: {' '.join(out['uptime'])}; {rounds} rounds"
    print(text)
    if not args.quick:
        save("compile_time", out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
