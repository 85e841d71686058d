"""The flood bench's rig: namespaces, CPU accounting, the receiver's sockets and the generator.

Used by veth_flood.py (read its docstring for the set-up and the method); the
filters under test are in flood_filters.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import report
from tidegate.lab.veth import VethLab

FLOOD_NET = "198.18.0.0/15"
FLOOD_PORT = 9
LEGIT_PORT = 7000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str):
    """Run the calling thread inside network namespace `name` for a while."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        yield
    finally:
        _libc.setns(here, CLONE_NEWNET)
        os.close(here)
        os.close(there)


def sh(argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


# ---------------------------------------------------------------- CPU accounting
def cpu_times(cpu: int) -> dict:
    """Jiffies of one CPU from /proc/stat, converted to ns."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
                d = {n: v[i] * 1_000_000_000 // hz for i, n in enumerate(names)}
                d["busy"] = sum(d[n] for n in names if n not in ("idle", "iowait"))
                return d
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def backlog_drops(cpu: int) -> int:
    with open("/proc/net/softnet_stat") as f:
        lines = f.read().split("\n")
    return int(lines[cpu].split()[1], 16) if cpu < len(lines) and lines[cpu] else 0


def thread_cpu_ns(pid: int | None) -> int:
    """utime + stime of a thread (tick-sampled like /proc/stat, and disjoint
    from the softirq column: a tick that lands in softirq is softirq time)."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0


def thread_runtime_ns(pid: int | None) -> int:
    """Exact run time of a thread (scheduler clock, /proc/<pid>/schedstat)."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


ETHTOOL_STSO = 0x1F
ETHTOOL_SGRO = 0x2C


def set_offload(ifname: str, cmd: int, on: bool) -> None:
    """ethtool -K <if> tso|gro on|off through the legacy ETHTOOL_S* ioctls
    (no ethtool binary needed). Call inside the interface's namespace."""
    import array
    import fcntl
    import struct

    siocethtool = 0x8946
    val = array.array("I", [cmd, 1 if on else 0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), siocethtool, struct.pack("16sP", ifname.encode(), val.buffer_info()[0]))


def find_napi_thread(ifname: str) -> int | None:
    want = f"napi/{ifname}"[:15]
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip().startswith(want):
                    return int(d)
        except OSError:
            continue
    return None


# ------------------------------------------------------------------------ the lab
def prepare_lab(lab: VethLab) -> None:
    """Tune the lab (a VethLab with both ends in namespaces of their own: the
    generator is the peer end, the receiver the host end) for the measurement."""
    # static neighbour: no ARP in the measurement
    sh(["ip", "-n", lab.ns, "neigh", "replace", lab.host_ip, "lladdr", lab.host_mac(), "dev", lab.peer_if])
    # veth receives every packet through its NAPI poll (not only with
    # native XDP) once GRO is on at the receiver and TSO is off at the
    # sender (attaching XDP turns the sender's TSO off by itself); a
    # threaded NAPI is then one kthread doing all of the receive work
    # (XDP, stack, netfilter, socket delivery), pinned to the rx CPU
    with in_netns(lab.ns):
        set_offload(lab.peer_if, ETHTOOL_STSO, False)
    with in_netns(lab.host_ns):
        set_offload(lab.host_if, ETHTOOL_SGRO, True)
    sh(["ip", "netns", "exec", lab.host_ns, "sh", "-c", f"echo 1 > /sys/class/net/{lab.host_if}/threaded"])


def link_stats(ns: str, ifname: str) -> dict:
    s = VethLab.link(ns, ifname, stats=True)["stats64"]
    return {"rx_packets": s["rx"]["packets"], "rx_dropped": s["rx"]["dropped"],
            "tx_packets": s["tx"]["packets"], "tx_dropped": s["tx"]["dropped"]}


# --------------------------------------------------------------------- receivers
class Receiver:
    """UDP sockets in the receiver namespace: the legit stream's counter and a
    never-read sink for the flood's port (so the stack sends no ICMP)."""

    def __init__(self, lab: VethLab):
        with in_netns(lab.host_ns):
            self.legit = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.legit.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.legit.bind(("0.0.0.0", LEGIT_PORT))
            self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sink.bind(("0.0.0.0", FLOOD_PORT))
        self.legit.settimeout(0.2)
        self.legit_src = lab.peer_ip
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                _, (src, _) = self.legit.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            if src == self.legit_src:
                self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.legit.close()
        self.sink.close()




# --------------------------------------------------------------------- generator
class Generator:
    def __init__(self, lab: VethLab, args, workdir: Path):
        self.lab = lab
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.shim = self._build_shim()
        self.cfg = workdir / "flood.cfg"
        self._write_cfg()

    def _build_shim(self) -> Path | None:
        cc = shutil.which("gcc") or shutil.which("cc")
        if not cc:
            return None
        out = self.workdir / "trafgen_retry.so"
        r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out),
                            str(report.BENCH_DIR / "trafgen_retry.c"), "-ldl"], capture_output=True, text=True,
                           timeout=120)
        return out if r.returncode == 0 else None

    def _write_cfg(self) -> None:
        from tidegate.lab.traffic import spoofed_sources, udp_frame

        rx_mac = self.lab.host_mac()
        gen_mac = self.lab.peer_mac()
        rnd = random.Random(5)
        with open(self.cfg, "w") as f:
            for src in spoofed_sources(FLOOD_NET, self.args.sources, seed=3):
                fr = udp_frame(src, self.lab.host_ip, rx_mac, FLOOD_PORT, src_mac=gen_mac,
                               sport=rnd.randrange(1024, 65535))
                f.write("{ " + ", ".join(f"0x{b:02x}" for b in fr) + " }\n")

    def _trafgen(self, seconds: float, rate: int | None) -> subprocess.Popen:
        env = dict(os.environ)
        if self.shim:
            env["LD_PRELOAD"] = str(self.shim)
        argv = ["ip", "netns", "exec", self.lab.ns, "taskset", "-c", str(self.args.gen_cpu),
                "timeout", "-s", "INT", "-k", "5", f"{seconds:.2f}",
                "trafgen", "-o", self.lab.peer_if, "-i", str(self.cfg), "-P", "1", "--no-sock-mem", "-Q",
                # at a fixed rate the count caps the phase at rate x seconds: trafgen
                # catches up after a stall (the shim's retries) by bursting
                "-n", str(int(seconds * (rate or 5_000_000)))] + (["-b", f"{rate}pps"] if rate else [])
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.procs.append(p)
        return p

    def _legit(self, seconds: float) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(report.CONTROL))
        n = int(self.args.legit_pps * seconds)
        argv = ["ip", "netns", "exec", self.lab.ns, "taskset", "-c", str(self.args.gen_cpu),
                sys.executable, "-m", "tidegate.lab.traffic", "--iface", self.lab.peer_if,
                "--dst-mac", self.lab.host_mac(), "--dst-ip", self.lab.host_ip,
                "--dport", str(LEGIT_PORT), "--src", self.lab.peer_ip, "--count", str(n),
                "--pps", str(self.args.legit_pps), "--time-limit", f"{seconds + 2:.1f}"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.procs.append(p)
        return p

    def _collect(self, p: subprocess.Popen, timeout: float) -> tuple[str, str]:
        """Its output once it ends (killed after `timeout`)."""
        try:
            out = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()
        self.procs.remove(p)
        return out

    def run(self, seconds: float, rate: int | None) -> dict:
        """Flood (at `rate` pps, or as fast as trafgen goes) + legit stream
        for `seconds`. Returns what the senders report."""
        legit = self._legit(seconds)
        t_end = time.monotonic() + seconds
        restarts = 0
        aborted = []
        while True:
            left = t_end - time.monotonic()
            if left < 0.2:
                break
            tg = self._trafgen(left, rate)
            out, _ = self._collect(tg, left + 15)
            if "Flushing TX_RING failed" in (out or "") or "failed" in (out or "").lower():
                aborted.append(out.strip().splitlines()[-1] if out.strip() else "?")
                restarts += 1
                if restarts > 1000:
                    break
                continue
            break
        lo, le = self._collect(legit, seconds + 15)
        try:
            sent = json.loads(lo.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"legit sender failed: {le.strip()}")
        return {"legit_sent": sent["sent"], "trafgen_restarts": restarts, "trafgen_aborts": aborted[:3]}

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                    p.wait(timeout=5)
                except Exception:
                    pass
        self.procs = []
