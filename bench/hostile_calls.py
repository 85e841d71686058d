#!/usr/bin/env python3
"""The worst calls a hostile caller can make within the API's limits, and
what each costs a real agent.

Method: a network namespace and veth pair are made for the run. For each
call below a fresh `tidegate agent` starts on the host end with its default
limits (8 MiB rule-set text, 8 MiB + 64 KiB messages, 8 nesting levels,
values bounded by the kernel's capacity, read callers' expensive calls 10 at
once then 1 a second) and is warmed up with one small ValidateRuleSet and
WhatIf (a fresh agent per call: memory a call frees stays in the process and
would hide the next call's growth). The call is made from this process, over
gRPC on loopback, as an unauthenticated caller (no token) or a read caller
(the read token), repeated with 1.5 s between calls.
For each call the agent's own figures are read from /proc/PID: CPU time
as the sum of its threads' schedstat run time across the call, and peak
RSS as VmHWM after the call minus VmRSS before it, with the peak reset
(`echo 5 > /proc/PID/clear_refs`) just before. The agent's idle CPU over
the same wall time, measured just before each call, is the reference: the
sampler, counter history and watchdog threads keep running. Each figure is
the median (CPU) or the maximum (RSS) of the repetitions. Target: at most
1 s of CPU and 50 MB of extra RSS for the worst call of each caller.

    sudo .venv/bin/python bench/hostile_calls.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab_run import lab_with_rules, remove_all, rule_set
from report import header_lines, machine, require_bcc, require_root, save, table, use_repo_package

use_repo_package()

import grpc  # noqa: E402

from tidegate.lab.veth import VethLab  # noqa: E402

from agent_process import Agent  # noqa: E402

RULES = rule_set("app")


def cpu_ns(pid: int) -> int:
    """Run time of every thread of the process so far (schedstat: ns on CPU)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):  # a thread that just ended
            pass
    return total


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# ------------------------------------------------------------- the texts
def largest_v6() -> str:
    """The largest rule set the kernel holds, as long as its text gets: 64 rules
    sharing 131,072 full-length IPv6 /128s written one a line (7.1 MB)."""
    lines = ["defaults:", "  limit: {pps: 1000, burst: 2000}", "rules:"]
    n = 0
    for r in range(64):
        lines += [f"  - name: rule-{r:02d}", "    protocol: udp", f"    dst_ports: [{1000 + r}]",
                  "    limit: {pps: 100, burst: 200}", "    sources:"]  # fmt: skip
        for _ in range(131072 // 64):
            lines.append(f"      - 'ffff:{n >> 16:04x}:{n & 0xFFFF:04x}:ffff:ffff:ffff:ffff:ffff/128'")
            n += 1
    return "\n".join(lines) + "\n"


def largest_v4() -> str:
    return "allow: [" + ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(131072)) + "]\n" \
        "rules: []\n"  # fmt: skip


def hostile_texts(max_values: int, max_bytes: int) -> dict[str, str]:
    n = max_values - 10  # as many values as a text may hold
    w = (max_bytes - 64) // n - 4  # each as long as the size limit then allows
    return {
        "largest rule set, IPv6 one a line (valid)": largest_v6(),
        "largest rule set, IPv4 flow list (valid)": largest_v4(),
        f"{n:,} invalid CIDRs of {w} chars": "deny: [" + ", ".join(f"'{i:0{w}d}'" for i in range(n)) + "]\n",
        f"{n:,} IPv6-like invalid CIDRs": "deny: [" + ", ".join(f"'{i:x}::{'f' * max(0, w - 30)}:zz/129'"
                                                              for i in range(n)) + "]\n",  # fmt: skip
        f"{n:,} CIDRs with host bits": "deny: [" + ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/8"
                                                           for i in range(n)) + "]\n",  # fmt: skip
        f"{n:,} copies of one CIDR": "deny: [" + ", ".join("10.0.0.0/8" for _ in range(n)) + "]\n",
        "100,000 unknown keys": "".join(f"key{i:06d}{'x' * 40}: 1\n" for i in range(100_000)) + "rules: []\n",
        f"{n:,} empty rules": "rules: [" + ",".join("{}" for _ in range(n)) + "]\n",
        "64 rules x 2,300 ports": "rules:\n" + "".join(
            f"  - name: r{r}\n    protocol: any\n    action: drop\n    dst_ports: ["
            + ",".join(str(1 + (i % 65535)) for i in range(n // 66)) + "]\n" for r in range(64)),  # fmt: skip
        "one 8 MiB string": "description: '" + "x" * (max_bytes - 32) + "'\nrules: []\n",
        "100,000 levels deep": "rules: " + "[" * 100_000 + "]" * 100_000 + "\n",
    }


# ------------------------------------------------------------- the calls
class Bench:
    def __init__(self, lab: VethLab, tmp: Path, reps: int):
        from tidegate.api.admission import MAX_MESSAGE_BYTES
        from tidegate.v1 import tidegate_pb2 as pb

        self.lab, self.tmp, self.reps, self.pb = lab, tmp, reps, pb
        self.agent: Agent | None = None
        self.max_message = MAX_MESSAGE_BYTES
        self.rows: list[list] = []
        self.data: list[dict] = []

    def fresh_agent(self) -> None:
        from tidegate.v1 import tidegate_pb2_grpc as pbg

        self.stop_agent()
        subprocess.run(["rm", "-rf", str(self.tmp / "state")])
        self.agent = Agent(self.lab, self.tmp / "state", self.tmp / "rules.yaml")
        self.agent.start()
        self.pid = self.agent.proc.pid
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.agent.port}", options=opts)
        self.stub = pbg.FilterStub(self.channel)
        self.read = [("authorization", f"Bearer {self.agent.token('read')}")]
        warm = self.pb.RuleSetText(yaml=RULES)
        self.stub.ValidateRuleSet(warm, metadata=self.read, timeout=30)
        self.stub.WhatIf(warm, metadata=self.read, timeout=30)

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.channel.close()
            self.agent.stop()
            self.agent.remove_kernel_objects()
            self.agent = None

    def call(self, fn) -> str:
        try:
            fn()
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    def measure(self, caller: str, name: str, size: int, call, concurrent: int = 1) -> None:
        """call(stub, read_metadata) is made `reps` times against a fresh agent."""
        from tidegate.v1 import tidegate_pb2_grpc as pbg

        self.fresh_agent()
        fn = lambda: call(self.stub, self.read)  # noqa: E731
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(f"127.0.0.1:{self.agent.port}", options=opts) for _ in range(concurrent)]
        stubs = [pbg.FilterStub(ch) for ch in channels] if concurrent > 1 else []
        cpus, idles, peaks, codes = [], [], [], set()
        for _ in range(self.reps):
            time.sleep(1.5)
            # the reference: the idle agent over the wall time the call will take (the last call's, or 1 s)
            wall = max(0.2, min(5.0, self.data[-1]["wall_s"] if self.data else 1.0))
            c0 = cpu_ns(self.pid)
            time.sleep(wall)
            idle = (cpu_ns(self.pid) - c0) / 1e9 / wall
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            rss0 = status_kb(self.pid, "VmRSS")
            c0, t0 = cpu_ns(self.pid), time.monotonic()
            if concurrent == 1:
                codes.add(self.call(fn))
            else:  # that many callers, each on a connection of its own
                with ThreadPoolExecutor(concurrent) as ex:
                    codes.update(ex.map(lambda stub: self.call(lambda: call(stub, self.read)), stubs))
            took = time.monotonic() - t0
            cpus.append((cpu_ns(self.pid) - c0) / 1e9)
            idles.append(idle * took)
            peaks.append((status_kb(self.pid, "VmHWM") - rss0) / 1024)
            self.data.append({"wall_s": took})
        for ch in channels:
            ch.close()
        row = {"caller": caller, "call": name, "bytes": size, "concurrent": concurrent, "status": sorted(codes),
               "cpu_s": cpus, "idle_cpu_s": idles, "peak_rss_delta_mb": peaks}  # fmt: skip
        self.data[-1].update(row)
        cpu, idle, peak = statistics.median(cpus), statistics.median(idles), max(peaks)
        self.rows.append([caller, name, f"{size / 1e6:.2f}", "/".join(sorted(codes)), f"{cpu:.2f}",
                          f"{idle:.2f}", f"{cpu - idle:.2f}", f"{peak:.0f}"])  # fmt: skip
        print(" | ".join(self.rows[-1]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, results printed only")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each call (default 3)")
    args = ap.parse_args()
    require_root()
    require_bcc()
    from tidegate.ruleset.model import MAX_FILE_BYTES, Capacity

    reps = 1 if args.quick else args.reps
    lines = header_lines("hostile calls", __doc__.split("Method:")[1].split("    sudo")[0].strip())
    tmp, lab = lab_with_rules("bh", "10.214.9", RULES)
    out: dict = {"machine": machine()}
    b = Bench(lab, tmp, reps)
    pb = b.pb
    try:
        print("caller | call | MB | status | agent CPU s | idle CPU s | CPU s over idle | peak RSS +MB")
        big = "#" * (MAX_FILE_BYTES - 10)
        at_limit = pb.RuleSetText(yaml="#" * (b.max_message - 64))
        # an unauthenticated caller: refused from the metadata, the body never read
        b.measure("none", "ValidateRuleSet, message at the receive limit", at_limit.ByteSize(),
                  lambda stub, read: stub.ValidateRuleSet(at_limit, timeout=60))  # fmt: skip
        over = pb.ApplyRequest(yaml="#" * (b.max_message + 10))
        b.measure("none", "ApplyRuleSet, message over the receive limit", over.ByteSize(),
                  lambda stub, read: stub.ApplyRuleSet(over, timeout=60))  # fmt: skip
        b.measure("none", "16 at once: ValidateRuleSet at the limit", 16 * at_limit.ByteSize(),
                  lambda stub, read: stub.ValidateRuleSet(at_limit, timeout=60), concurrent=16)  # fmt: skip
        # a read caller
        apply_big = pb.ApplyRequest(yaml=big, reason="x")
        b.measure("read", "ApplyRuleSet (admin only), 8 MiB", len(big),
                  lambda stub, read: stub.ApplyRuleSet(apply_big, metadata=read, timeout=60))  # fmt: skip
        texts = hostile_texts(Capacity().max_values, MAX_FILE_BYTES)
        if args.quick:
            texts = dict(list(texts.items())[:3])
        for name, text in texts.items():
            req = pb.RuleSetText(yaml=text, source="bench.yaml")
            b.measure("read", f"ValidateRuleSet: {name}", len(text.encode()),
                      lambda stub, read, req=req: stub.ValidateRuleSet(req, metadata=read, timeout=120))  # fmt: skip
        for name in list(texts)[:2]:
            req = pb.RuleSetText(yaml=texts[name], source="bench.yaml")
            b.measure("read", f"WhatIf: {name}", len(texts[name].encode()),
                      lambda stub, read, req=req: stub.WhatIf(req, metadata=read, timeout=120))  # fmt: skip
        headers = ["caller", "call", "MB sent", "status", "agent CPU s", "idle CPU s (same wall time)",
                   "CPU s over idle", "peak RSS +MB"]  # fmt: skip
        lines += ["", table(headers, b.rows), "",
                  f"{reps} repetition(s) of each call, each call against a fresh agent tracking no sources "
                  "(WhatIf's estimate grows with the tracked sources: about 2 s of CPU at 100,000; that is "
                  "the traffic's cost, which the rate limit bounds, not the input's)."]  # fmt: skip
        out["calls"] = [d for d in b.data if "call" in d]
    finally:
        b.stop_agent()
        remove_all(tmp, lab)
    text = "\n".join(lines)
    print()
    print(text)
    if not args.quick:
        save("hostile_calls", out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
