"""`tidegate lab`: the whole product on one machine, with no arguments.

Creates a network namespace and a veth pair (tg-lab / tglabh <-> tglabp,
10.99.0.1 <-> 10.99.0.2), starts an agent on the host end with the lab rule
set, sends a legitimate stream (10.99.0.2 -> UDP 5555, received by a socket
here) and a spoofed flood (198.18.0.0/16 -> UDP 9) from inside the
namespace, and shows what is passed, dropped, by which rule, and the top
sources. From another terminal, try `tidegate apply --shadow`, `whatif`,
`rollback` against it (the lab prints the exact commands). Everything it
created is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.table import Table

from tidegate.client import Client, ClientError
from tidegate.lab.launcher import AgentNotReady, AgentProcess
from tidegate.lab.veth import VethLab
from tidegate.lifetime import end_with_parent

GRPC_PORT = 50151
METRICS_PORT = 9741


def lab_rules_text() -> str:
    """The lab's rule set, shipped in the package (examples/lab.yaml links to it)."""
    return resources.files("tidegate.lab").joinpath("lab.yaml").read_text()


def _end_with_the_lab() -> None:
    """In the lab's agent, before it runs: SIGTERM when the lab process dies, even by SIGKILL (it
    runs for as long as the lab, a day without --duration, and must not outlive it). A preexec_fn:
    the agent starts before the lab has any gRPC channel; the senders, started after, get the same
    from setpriv instead (veth.popen_in_ns). Only a call here, prctl looked up at import (lifetime)."""
    end_with_parent(signal.SIGTERM)


class LegitReceiver(threading.Thread):
    def __init__(self, host: str, port: int):
        super().__init__(daemon=True, name="lab-receiver")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((host, port))
        self.sock.settimeout(0.5)
        self.received = 0
        # not `_stop`: that is a method of Thread, which join() and the after-fork clean-up call
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.sock.recv(2048)
                self.received += 1
            except socket.timeout:
                pass
            except OSError:
                return

    def stop(self) -> None:
        self._stopping.set()
        self.sock.close()


def run_lab(args, out) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tidegate-lab-"))
    lab = VethLab("lab", subnet="10.99.0")
    procs: list[subprocess.Popen] = []
    receiver = None
    agent = None
    stop = threading.Event()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with out.err.status("creating namespace tg-lab and veth tglabh <-> tglabp ..."):
            lab.create()
        if args.rules:
            rules = Path(args.rules)
        else:
            rules = tmp / "lab.yaml"
            rules.write_text(lab_rules_text())
        state = tmp / "state"
        agent = AgentProcess(lab.host_if, state, pin_name="lab", rules=rules, port=GRPC_PORT,
                             metrics_port=METRICS_PORT, extra=["--detach-on-exit"])  # fmt: skip
        with out.err.status("starting the agent (compiling the XDP program) ..."):
            try:
                agent.start(timeout=60, start_new_session=True, preexec_fn=_end_with_the_lab)
            except AgentNotReady as e:
                print(f"tidegate lab: {e}", file=sys.stderr)
                return 1
        os.environ["TIDEGATE_TOKEN_FILE"] = str(state / "tokens")
        client = Client(agent.server, timeout=5, token_file=str(state / "tokens"))
        receiver = LegitReceiver(lab.host_ip, 5555)
        receiver.start()
        limit = args.duration if args.duration else 24 * 3600
        legit_count = int(args.legit_pps * limit) + 1
        flood_count = int(args.flood_pps * limit) + 1
        # the senders start after the gRPC client: no preexec_fn in a process with gRPC threads (veth.popen_in_ns)
        procs.append(lab.sender("--time-limit", str(limit), "--src", lab.peer_ip, "--dport", "5555", "--count",
                                str(legit_count), "--pps", str(args.legit_pps), stdout=subprocess.PIPE,
                                end_with_parent=True))  # fmt: skip
        procs.append(lab.sender("--time-limit", str(limit), "--src-net", "198.18.0.0/16", "--sources", "20000",
                                "--dport", "9", "--count", str(flood_count), "--pps", str(args.flood_pps),
                                stdout=subprocess.PIPE, end_with_parent=True))  # fmt: skip
        started = time.monotonic()
        print(f"""tidegate lab is running on {lab.host_if} (namespace {lab.ns}).
  legitimate: {lab.peer_ip} -> {lab.host_ip}:5555 at {args.legit_pps:g} pps
  flood:      spoofed 198.18.0.0/16 -> {lab.host_ip}:9 at {args.flood_pps:g} pps
Try from another terminal (as root):
  export TIDEGATE_SERVER=127.0.0.1:{GRPC_PORT} TIDEGATE_TOKEN_FILE={state / 'tokens'}
  tidegate whatif examples/too-tight.yaml
  tidegate apply examples/too-tight.yaml --shadow --reason 'try it' && tidegate shadow report
  tidegate apply examples/too-tight.yaml --force --guard --guard-seconds 20 --reason 'the outage, replayed'
  tidegate rollback --reason 'back'      tidegate versions      tidegate top --by drops
metrics: curl -s 127.0.0.1:{METRICS_PORT}/metrics | grep ^tidegate_      Ctrl-C stops and removes everything.
""")  # fmt: skip
        _view(client, receiver, args, stop, started, out, legit_pps=args.legit_pps)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        if receiver:
            receiver.stop()
        if agent:
            agent.stop(timeout=20)
            try:
                agent.remove_kernel_objects()
            except Exception:
                pass
        lab.remove()
        shutil.rmtree(tmp, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
        print("tidegate lab: removed namespace tg-lab, veth tglabh/tglabp, pins and the agent's state")


def _view(client, receiver, args, stop: threading.Event, started: float, out, legit_pps: float) -> None:
    prev = None
    live = None if args.no_view or not sys.stdout.isatty() else Live(console=out.console, refresh_per_second=2)
    last_print = 0.0
    if live:
        live.start()
    try:
        while not stop.is_set():
            if args.duration and time.monotonic() - started >= args.duration:
                break
            try:
                c = client.call("GetCounters", client.pb.GetCountersRequest())
                top = client.call("TopSources", client.pb.TopSourcesRequest(n=5, by="drops"))
            except ClientError as e:
                print(f"tidegate lab: {e.message}", file=sys.stderr)
                stop.wait(1)
                continue
            elapsed = time.monotonic() - started
            # what the filter saw of the legitimate stream (its own rule, `app`, counts it: the counters are
            # read before the receiver, so every packet passed by then has been received); the sender's
            # rate times the time only while no such rule counts it (an operator's set without `app`)
            seen = sum(r.pass_packets + r.drop_packets for r in c.rules if r.rule == "app")
            expected = seen or max(1, int(min(elapsed, args.duration or elapsed) * legit_pps))
            delivered = min(1.0, receiver.received / expected)
            dt = (c.time - prev.time) if prev else 0
            t = Table(title=f"tidegate lab — {elapsed:.0f} s, rule set v{c.active_version}"
                      + (f", shadow v{c.shadow_version}" if c.shadow_version else ""), title_justify="left")  # fmt: skip
            for col in ("verdict", "reason", "pps", "packets"):
                t.add_column(col, justify="left" if col in ("verdict", "reason") else "right")
            old = {r.reason: r.packets for r in prev.reasons} if prev else {}
            for r in c.reasons:
                if r.packets:
                    rate = (r.packets - old.get(r.reason, r.packets)) / dt if dt else 0
                    t.add_row(r.verdict, r.reason, f"{rate:,.0f}", f"{r.packets:,}")
            rt = Table(title="by rule", title_justify="left")
            for col in ("rule", "passed", "dropped", "rate", "prefix", "blocked", "deny"):
                rt.add_column(col, justify="left" if col == "rule" else "right")
            for r in c.rules:
                if r.pass_packets or r.drop_packets:
                    rt.add_row(r.rule, f"{r.pass_packets:,}", f"{r.drop_packets:,}", f"{r.drop_rate:,}",
                               f"{r.drop_prefix:,}", f"{r.drop_blocked:,}", f"{r.drop_deny:,}")  # fmt: skip
            tt = Table(title="top sources by drops", title_justify="left")
            for col in ("source", "rule", "pps", "drop pps"):
                tt.add_column(col)
            for s in top.sources:
                tt.add_row(s.address, s.rule, f"{s.pps:,.0f}", f"{s.drop_pps:,.0f}")
            legit = (f"legitimate client: {receiver.received:,} packets received "
                     f"({delivered:.1%} of those the filter saw)")  # fmt: skip
            if live:
                live.update(Group(t, rt, tt, legit))
            elif time.monotonic() - last_print >= 5 or (args.duration and elapsed + 1 >= args.duration):
                dropped = sum(r.packets for r in c.reasons if r.verdict == "drop")
                print(f"[{elapsed:5.0f} s] v{c.active_version}: {c.packets:,} packets, {dropped:,} dropped; {legit}",
                      flush=True)  # fmt: skip
                last_print = time.monotonic()
            prev = c
            stop.wait(1)
    finally:
        if live:
            live.stop()
