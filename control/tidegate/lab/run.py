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
from pathlib import Path

from tidegate.lab.veth import VethLab

LAB_RULES = """\
description: "tidegate lab"
defaults:
  limit: {pps: 100, burst: 200}
  prefix_limit: {ipv4_prefix: 16, ipv6_prefix: 48, pps: 500, burst: 1000}
canaries: ["10.99.0.2"]
rules:
  - name: app
    protocol: udp
    dst_ports: [5555]
    limit: {pps: 200, burst: 400}
    prefix_limit: null
  - name: sink
    protocol: udp
    dst_ports: [9]
    limit: {pps: 50, burst: 100}
    block_seconds: 5
"""

GRPC_PORT = 50151
METRICS_PORT = 9741


def _lab_rules_path(tmp: Path) -> Path:
    repo = Path(__file__).resolve().parents[3] / "examples" / "lab.yaml"
    if repo.exists():
        return repo
    p = tmp / "lab.yaml"
    p.write_text(LAB_RULES)
    return p


class LegitReceiver(threading.Thread):
    def __init__(self, host: str, port: int):
        super().__init__(daemon=True, name="lab-receiver")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((host, port))
        self.sock.settimeout(0.5)
        self.received = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(2048)
                self.received += 1
            except socket.timeout:
                pass
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


def run_lab(args, out) -> int:
    if os.geteuid() != 0:
        print("tidegate lab: needs root (it creates a network namespace and loads an XDP program)", file=sys.stderr)
        return 2
    from tidegate.client import Client, ClientError

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
    exe = shutil.which("tidegate") or str(Path(sys.executable).parent / "tidegate")
    try:
        with out.err.status("creating namespace tg-lab and veth tglabh <-> tglabp ..."):
            lab.create()
        rules = Path(args.rules) if args.rules else _lab_rules_path(tmp)
        state = tmp / "state"
        log_path = tmp / "agent.log"
        with out.err.status("starting the agent (compiling the XDP program) ..."):
            agent = subprocess.Popen(
                [exe, "agent", "--interface", lab.host_if, "--rules", str(rules), "--state-dir", str(state),
                 "--listen", f"127.0.0.1:{GRPC_PORT}", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}",
                 "--pin-name", "lab", "--sample-interval", "1", "--detach-on-exit"],
                stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), start_new_session=True,
            )  # fmt: skip
            os.environ["TIDEGATE_TOKEN_FILE"] = str(state / "tokens")
            client = Client(f"127.0.0.1:{GRPC_PORT}", timeout=5, token_file=str(state / "tokens"))
            deadline = time.monotonic() + 60
            while True:
                if agent.poll() is not None:
                    print(f"tidegate lab: the agent exited:\n{log_path.read_text()}", file=sys.stderr)
                    return 1
                try:
                    client = Client(f"127.0.0.1:{GRPC_PORT}", timeout=5, token_file=str(state / "tokens"))
                    client.call("GetStatus", client.pb.GetStatusRequest())
                    break
                except ClientError:
                    if time.monotonic() > deadline:
                        print("tidegate lab: the agent did not come up in 60 s", file=sys.stderr)
                        return 1
                    time.sleep(0.3)
        receiver = LegitReceiver(lab.host_ip, 5555)
        receiver.start()
        limit = args.duration if args.duration else 24 * 3600
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        sender = [sys.executable, "-m", "tidegate.lab.traffic", "--iface", lab.peer_if, "--dst-mac", lab.host_mac(),
                  "--dst-ip", lab.host_ip, "--time-limit", str(limit)]  # fmt: skip
        legit_count = int(args.legit_pps * limit) + 1
        flood_count = int(args.flood_pps * limit) + 1
        procs.append(lab.popen_in_ns(sender + ["--src", lab.peer_ip, "--dport", "5555", "--count", str(legit_count),
                                               "--pps", str(args.legit_pps)], stdout=subprocess.PIPE, env=env))  # fmt: skip
        procs.append(lab.popen_in_ns(sender + ["--src-net", "198.18.0.0/16", "--sources", "20000", "--dport", "9",
                                               "--count", str(flood_count), "--pps", str(args.flood_pps)],
                                     stdout=subprocess.PIPE, env=env))  # fmt: skip
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
        if agent and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
        try:
            from tidegate.kernel.filter import FilterConfig, KernelFilter

            KernelFilter(FilterConfig(interface=lab.host_if, pin_name="lab")).detach(remove_pins=True)
        except Exception:
            pass
        lab.remove()
        shutil.rmtree(tmp, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
        print("tidegate lab: removed namespace tg-lab, veth tglabh/tglabp, pins and the agent's state")


def _view(client, receiver, args, stop: threading.Event, started: float, out, legit_pps: float) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table

    from tidegate.client import ClientError

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
            expected = max(1, int(min(elapsed, args.duration or elapsed) * legit_pps))
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
            legit = f"legitimate client: {receiver.received:,} packets received ({delivered:.1%} of those sent)"
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
