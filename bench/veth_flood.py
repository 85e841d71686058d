#!/usr/bin/env python3
"""Flood over veth: tidegate and its peers end to end, bounded in time.

Set-up (all of it created by this bench under unique names and removed at
the end, also on Ctrl-C or failure):

    netns tg-bf<N>                          netns tg-bf<N>-h
    trafgen (CPU 0) ─┐                      ┌─ the filter under test
    legit sender ────┴─ tgbf<N>p ══ veth ══ tgbf<N>h ─ NAPI kthread (CPU 1) ─ UDP sockets

- Both ends live in namespaces of their own (tidegate.lab.veth.VethLab with
  host_in_ns), so no spoofed packet and no rule of this bench ever touches
  the host's interfaces or firewall.
- Generator: Debian's trafgen (netsniff-ng 0.6.8), pinned to CPU 0, sending
  64-byte UDP frames to port 9 from --sources spoofed addresses in
  198.18.0.0/15, round robin, as fast as it can. trafgen 0.6.8 aborts with
  "Flushing TX_RING failed" as soon as the receiver falls behind (the skbs
  queued on the receiving CPU hold its socket's send-buffer memory, and its
  own sysctl tuning is refused inside a namespace), so it runs under an
  LD_PRELOAD shim (bench/trafgen_retry.c, built with gcc at start) that
  gives its packet socket a 16 MiB send buffer and retries EAGAIN/ENOBUFS:
  backpressure instead of an abort. Without gcc, the bench falls back to
  restarting trafgen in bounded bursts and says so in the results.
- Legitimate stream: --legit-pps UDP packets/s to port 7000 from the
  generator namespace's own address (tidegate.lab.traffic, AF_PACKET, CPU 0),
  counted on arrival by a UDP socket in the receiver namespace.
- Receiver: GRO is switched on for the receiving veth and TSO off for the
  sending one, so veth receives every packet through its NAPI poll (by
  default it does so only with native XDP attached), and that NAPI is made
  threaded: one kthread, pinned
  to CPU 1 (--rx-cpu), does all of this row's receive work: native XDP,
  generic XDP, the netfilter hooks, the IP/UDP stack and socket delivery.

Rows: no filter; XDP_DROP-everything (floor; drops legit traffic too);
minimal BCC token bucket (bench/ref/token_bucket.c) native and generic;
tidegate native and generic with a per-source-limit rule set (what the peers
do) and with the realistic full rule set of the packet-path bench (2x10k
CIDR lists, 50 rules, prefix limits); nftables dynamic set with
`limit rate over` (the `meter` idiom) in the netdev ingress hook and in
ip prerouting; iptables hashlimit --hashlimit-mode srcip in raw PREROUTING,
both with Debian's default iptables (iptables-nft, which translates the rule
into an nft meter) and with iptables-legacy (the xt_hashlimit match).
Every filter gets the same per-source limit: --limit pps, burst 2x.

Each row runs two phases: trafgen at a fixed --rate (default 300 kpps, the
same offered load for every row, so CPU per packet compares like with
like: per-packet cost on the receiving CPU falls as batches grow with load)
and then trafgen as fast as it goes (the heaviest flood this host makes,
for legitimate delivery). Figures per phase, medians over --rounds rounds
(rows interleaved per round):
- offered pps (generator's packets that reached the receive side: veth TX
  minus veth and backlog drops), dropped by the filter per second;
- receive CPU ns per packet: the NAPI kthread's run time (exact, from the
  scheduler clock in /proc/<pid>/schedstat) / packets offered. It is our
  receive work only: other engineers' processes and softirqs on the same
  CPU are not in it (they were in a first version that read the CPU's
  softirq time from /proc/stat, and moved the figures by +-30% between
  rounds). The kthread's tick-sampled utime+stime and CPU 1's whole busy
  time are kept in the JSON as cross-checks;
- legitimate delivery %: legit packets counted at the socket / sent.

Run as root with the project venv or Debian's python3:
  .venv/bin/python bench/veth_flood.py            # 3 rounds, 2 x 8 s per row
  .venv/bin/python bench/veth_flood.py --quick    # 1 round, 2 x 3 s, fewer rows
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

report.use_repo_package()

from tidegate.lab.veth import VethLab  # noqa: E402

FLOOD_NET = "198.18.0.0/15"
FLOOD_PORT = 9
LEGIT_PORT = 7000
CLONE_NEWNET = 0x40000000
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

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


# ----------------------------------------------------------------------- filters
class Filters:
    """Set up and tear down each row's filter in the receiver namespace."""

    def __init__(self, lab: VethLab, args, packet_path_module):
        self.lab = lab
        self.args = args
        self.pp = packet_path_module
        self.kfs: dict[str, object] = {}
        self.bcc: dict[str, tuple] = {}
        self.attached_bcc: str | None = None
        self.table = f"tgbench{lab.tag}"
        self.ipt_rule: list[str] | None = None
        self.napi_pid: int | None = None

    # ---- loading (once)
    def load(self, rows: list[str]) -> dict:
        from bcc import BPF

        from tidegate.kernel.filter import FilterConfig, KernelFilter, inline_source

        info = {}
        lim = self.args.limit
        ref = report.BENCH_DIR / "ref"
        if any(r.startswith("xdp_drop") for r in rows):
            b = BPF(text=inline_source(ref / "bare_drop.c").encode())
            self.bcc["drop"] = (b, b.load_func(b"bench_xdp", BPF.XDP))
        if any(r.startswith("tb_") for r in rows):
            b = BPF(text=inline_source(ref / "token_bucket.c").encode(),
                    cflags=[f"-DRATE={lim}", f"-DBURST={2 * lim}", "-DMAX_SOURCES=1048576"])
            self.bcc["tb"] = (b, b.load_func(b"bench_xdp", BPF.XDP))
        for variant in ("simple", "full"):
            if not any(r.startswith(f"tg_{variant}") for r in rows):
                continue
            kf = KernelFilter(FilterConfig(interface=self.lab.host_if, xdp_mode="generic",
                                           pin_name=f"bench-flood-{self.lab.tag}-{variant}"))
            self.kfs[variant] = kf
            with in_netns(self.lab.host_ns):
                lr = kf.load()
                t0 = time.monotonic()
                kf.apply(self.rule_set(variant), 1)
                info[f"tg_{variant}"] = {"compile_s": round(lr.compile_seconds, 2),
                                         "apply_s": round(time.monotonic() - t0, 2)}
        return info

    def rule_set(self, variant: str):
        from tidegate.ruleset.model import Defaults, Limit, PrefixLimit, RuleSet

        lim = Limit(self.args.limit, 2 * self.args.limit)
        if variant == "simple":
            return RuleSet(Defaults(lim, 32, 64, None, 0), (), (), (), (), "flood bench: per-source limit")
        # the packet-path bench's realistic set; the flood (udp/9) and the
        # legit stream (udp/7000) fall to the default rule. The prefix limit
        # is counted but too high to drop anything, so every row enforces
        # the same per-source limit.
        pfx = PrefixLimit(24, 48, Limit(10**7, 10**7))
        allow, deny = self.pp.realistic_lists()
        rules = self.pp.realistic_rules(lim, pfx)
        return RuleSet(Defaults(lim, 32, 64, pfx, 0), allow, deny, rules, (), "flood bench: full")

    # ---- per row
    def setup(self, row: str) -> None:
        lab, lim = self.lab, self.args.limit
        self.napi_pid = None
        if row == "none":
            self.pin_napi()
            return
        if row.startswith(("xdp_drop", "tb_", "tg_")):
            mode = "native" if row.endswith("native") else "generic"
            if row.startswith("tg_"):
                kf = self.kfs[row.split("_")[1]]
                with in_netns(lab.host_ns):
                    kf.clear_sources()
                    kf.config.xdp_mode = mode
                    kf.attach()
            else:
                from bcc import BPF

                key = "drop" if row.startswith("xdp_drop") else "tb"
                b, fn = self.bcc[key]
                if key == "tb":
                    b[b"buckets"].clear()
                with in_netns(lab.host_ns):
                    BPF.attach_xdp(lab.host_if.encode(), fn, XDP_FLAGS_DRV_MODE if mode == "native"
                                   else XDP_FLAGS_SKB_MODE)
                self.attached_bcc = mode
            self.pin_napi()
            return
        if row in ("nft_ingress", "nft_prerouting"):
            rate = f"limit rate over {lim}/second burst {2 * lim} packets"
            sets = (f"set flood {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 60s; }}")
            if row == "nft_ingress":
                conf = (f"table netdev {self.table} {{\n {sets}\n chain in {{\n"
                        f"  type filter hook ingress device \"{lab.host_if}\" priority filter; policy accept;\n"
                        f"  ip protocol udp update @flood {{ ip saddr {rate} }} counter drop\n }}\n}}\n")
            else:
                conf = (f"table ip {self.table} {{\n {sets}\n chain pre {{\n"
                        f"  type filter hook prerouting priority raw; policy accept;\n"
                        f"  iifname \"{lab.host_if}\" ip protocol udp update @flood {{ ip saddr {rate} }} "
                        f"counter drop\n }}\n}}\n")
            sh(["ip", "netns", "exec", lab.host_ns, "nft", "-f", "-"], input=conf)
            self.pin_napi()
            return
        if row.startswith("iptables"):
            self.ipt_rule = ["PREROUTING", "-i", lab.host_if, "-p", "udp", "-m", "hashlimit",
                             "--hashlimit-mode", "srcip", "--hashlimit-above", f"{lim}/sec",
                             "--hashlimit-burst", str(2 * lim), "--hashlimit-name", f"tgb{lab.tag}",
                             "--hashlimit-htable-size", "65536", "--hashlimit-htable-max", "65536", "-j", "DROP"]
            sh(["ip", "netns", "exec", lab.host_ns, IPTABLES[row], "-w", "-t", "raw", "-A", *self.ipt_rule])
            self.pin_napi()
            return
        raise ValueError(row)

    def pin_napi(self) -> None:
        """Find the receiving veth's NAPI kthread (attaching or removing
        native XDP can replace it) and pin it to the rx CPU."""
        for _ in range(50):
            pid = find_napi_thread(self.lab.host_if)
            if pid:
                os.sched_setaffinity(pid, {self.args.rx_cpu})
                self.napi_pid = pid
                return
            time.sleep(0.02)
        raise RuntimeError(f"no NAPI kthread for {self.lab.host_if}")

    def drops(self, row: str) -> int | None:
        """Packets the filter dropped so far (None where it has no counter)."""
        lab = self.lab
        if row.startswith("tg_"):
            kf = self.kfs[row.split("_")[1]]
            return kf.counters().dropped
        if row.startswith("nft"):
            fam = "netdev" if row == "nft_ingress" else "ip"
            out = sh(["ip", "netns", "exec", lab.host_ns, "nft", "-j", "list", "table", fam, self.table]).stdout
            for item in json.loads(out)["nftables"]:
                rule = item.get("rule")
                if rule:
                    for e in rule["expr"]:
                        if "counter" in e:
                            return e["counter"]["packets"]
            return None
        if row.startswith("iptables"):
            out = sh(["ip", "netns", "exec", lab.host_ns, IPTABLES[row], "-w", "-t", "raw", "-L", "PREROUTING",
                      "-vnx"]).stdout
            for line in out.splitlines():
                if "DROP" in line and lab.host_if in line:
                    return int(line.split()[0])
            return None
        return None

    def teardown(self, row: str) -> None:
        lab = self.lab
        if row.startswith("tg_"):
            from bcc import BPF

            kf = self.kfs[row.split("_")[1]]
            with in_netns(lab.host_ns):
                kf.detach(remove_pins=False)
                # KernelFilter.detach() can miss a generic attachment when
                # pyroute2 names the mode ("xdpgeneric"); remove it by mode
                BPF.remove_xdp(lab.host_if.encode(), XDP_FLAGS_DRV_MODE if row.endswith("native")
                               else XDP_FLAGS_SKB_MODE)
        elif row.startswith(("xdp_drop", "tb_")) and self.attached_bcc:
            from bcc import BPF

            with in_netns(lab.host_ns):
                BPF.remove_xdp(lab.host_if.encode(), XDP_FLAGS_DRV_MODE if self.attached_bcc == "native"
                               else XDP_FLAGS_SKB_MODE)
            self.attached_bcc = None
        elif row.startswith("nft"):
            fam = "netdev" if row == "nft_ingress" else "ip"
            sh(["ip", "netns", "exec", lab.host_ns, "nft", "delete", "table", fam, self.table], check=False)
        elif row.startswith("iptables") and self.ipt_rule:
            sh(["ip", "netns", "exec", lab.host_ns, IPTABLES[row], "-w", "-t", "raw", "-D", *self.ipt_rule],
               check=False)
            self.ipt_rule = None

    def close(self) -> None:
        for kf in self.kfs.values():
            try:
                with in_netns(self.lab.host_ns):
                    kf.detach(remove_pins=False)
            except Exception:
                pass
            self.pp.discard(kf)
        self.kfs = {}
        for b, _ in self.bcc.values():
            try:
                b.cleanup()
            except Exception:
                pass
        self.bcc = {}


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


# ---------------------------------------------------------------------- measuring
ROWS = {
    "none": "no filter",
    "xdp_drop_native": "XDP_DROP everything, native (floor)",
    "xdp_drop_generic": "XDP_DROP everything, generic (floor)",
    "tb_native": "minimal token bucket, native",
    "tb_generic": "minimal token bucket, generic",
    "tg_simple_native": "tidegate native (per-source limit)",
    "tg_simple_generic": "tidegate generic (per-source limit)",
    "tg_full_native": "tidegate native (full rule set)",
    "tg_full_generic": "tidegate generic (full rule set)",
    "nft_ingress": "nft dynamic set, netdev ingress",
    "nft_prerouting": "nft dynamic set, ip prerouting",
    "iptables": "iptables hashlimit srcip (nft backend)",
    "iptables_legacy": "iptables-legacy hashlimit srcip",
}
# Debian's `iptables` is iptables-nft: it turns a hashlimit rule into an nft
# meter. iptables-legacy runs the xt_hashlimit match itself.
IPTABLES = {"iptables": "iptables", "iptables_legacy": "iptables-legacy"}
QUICK_ROWS = ["none", "tg_simple_native", "tg_simple_generic", "nft_ingress", "nft_prerouting", "iptables_legacy"]


def measure_row(row, lab, filters, gen, recv, args) -> dict:
    """Both phases of one row: the fixed rate, then the generator's maximum."""
    filters.setup(row)
    try:
        return {"fixed": measure_phase(row, lab, filters, gen, recv, args, args.rate),
                "max": measure_phase(row, lab, filters, gen, recv, args, None)}
    finally:
        filters.teardown(row)


def _snapshot(row, lab, filters, recv, args) -> dict:
    return {
        "cpu": cpu_times(args.rx_cpu), "cpu_gen": cpu_times(args.gen_cpu),
        "backlog": backlog_drops(args.rx_cpu), "napi": thread_runtime_ns(filters.napi_pid),
        "napi_ticks": thread_cpu_ns(filters.napi_pid), "napi_pid": find_napi_thread(lab.host_if),
        "gen": link_stats(lab.ns, lab.peer_if), "drops": filters.drops(row), "legit": recv.count,
        "t": time.monotonic(),
    }


def measure_phase(row, lab, filters, gen, recv, args, rate) -> dict:
    # CPU 1's softirq rate with no traffic of ours: other work on the host
    s0, t0 = cpu_times(args.rx_cpu), time.monotonic()
    time.sleep(args.idle)
    s1, t1 = cpu_times(args.rx_cpu), time.monotonic()
    idle_softirq_rate = (s1["softirq"] - s0["softirq"]) / (t1 - t0)
    idle_busy_rate = (s1["busy"] - s0["busy"]) / (t1 - t0)

    before = _snapshot(row, lab, filters, recv, args)
    sent = gen.run(args.seconds, rate)
    time.sleep(0.5)  # let queues drain
    after = _snapshot(row, lab, filters, recv, args)

    wall = after["t"] - before["t"]
    secs = args.seconds
    gen_tx = after["gen"]["tx_packets"] - before["gen"]["tx_packets"]
    veth_drop = after["gen"]["tx_dropped"] - before["gen"]["tx_dropped"]
    backlog = after["backlog"] - before["backlog"]
    offered = gen_tx - veth_drop - backlog
    softirq = after["cpu"]["softirq"] - before["cpu"]["softirq"]
    napi = after["napi"] - before["napi"]
    napi_ticks = after["napi_ticks"] - before["napi_ticks"]
    same_thread = before["napi_pid"] == after["napi_pid"] == filters.napi_pid
    rx_cpu_ns = napi if same_thread else None
    busy = after["cpu"]["busy"] - before["cpu"]["busy"] - idle_busy_rate * wall
    drops = None
    if before["drops"] is not None and after["drops"] is not None:
        drops = after["drops"] - before["drops"]
    elif row.startswith("xdp_drop"):
        drops = offered
    legit_got = after["legit"] - before["legit"]
    return {
        "rate": rate,
        "generator_pps": gen_tx / secs,
        "offered_pps": offered / secs,
        "veth_drops": veth_drop, "backlog_drops": backlog,
        "filter_drops_per_s": drops / secs if drops is not None else None,
        "rx_cpu_ns_per_pkt": rx_cpu_ns / offered if offered > 0 and rx_cpu_ns is not None else None,
        # cross-checks: the same thread's tick-sampled utime+stime, and CPU 1 as a whole
        "rx_thread_ticks_ns_per_pkt": napi_ticks / offered if offered > 0 else None,
        "rx_cpu_busy_ns_per_pkt": busy / offered if offered > 0 else None,
        "rx_cpu_util": napi / (wall * 1e9),
        "napi_thread_ns": napi, "napi_thread_tick_ns": napi_ticks, "cpu_softirq_ns": softirq,
        "idle_softirq_ns_per_s": idle_softirq_rate, "idle_busy_ns_per_s": idle_busy_rate,
        "gen_cpu_softirq_ns": after["cpu_gen"]["softirq"] - before["cpu_gen"]["softirq"],
        "legit_sent": sent["legit_sent"], "legit_received": legit_got,
        "legit_pct": 100.0 * legit_got / sent["legit_sent"] if sent["legit_sent"] else None,
        "trafgen_restarts": sent["trafgen_restarts"], "trafgen_aborts": sent["trafgen_aborts"],
        "wall_s": wall,
    }


def aggregate(runs: list[dict]) -> dict:
    """Median of every numeric figure over the rounds."""
    agg = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        agg[k] = report.median(vals) if vals else None
    return agg


def summarize(results: dict, phase: str) -> str:
    rows = []
    agg = {k: v[phase] for k, v in results["rows"].items()}
    nfts = [agg[k]["rx_cpu_ns_per_pkt"] for k in ("nft_ingress", "nft_prerouting")
            if k in agg and agg[k]["rx_cpu_ns_per_pkt"] is not None]
    nft_best = min(nfts) if nfts else None
    none = agg.get("none", {}).get("rx_cpu_ns_per_pkt")
    for key, label in ROWS.items():
        a = agg.get(key)
        if not a:
            continue
        drops = a["filter_drops_per_s"]
        rows.append([
            label, report.fmt(a["offered_pps"] / 1e3, 0), report.fmt(drops / 1e3 if drops is not None else None, 0),
            report.fmt(a["rx_cpu_ns_per_pkt"], 0), report.fmt(report.ratio(a["rx_cpu_ns_per_pkt"], nft_best), 2),
            report.fmt(report.ratio(a["rx_cpu_ns_per_pkt"], none), 2),
            report.fmt(a["rx_cpu_util"] * 100 if a["rx_cpu_util"] is not None else None, 0),
            report.fmt(a["legit_pct"], 1),
        ])
    return report.table(["row", "offered kpps", "filter drops k/s", "rx CPU ns/pkt", "x best nft", "x no filter",
                         "rx CPU %", "legit %"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="flood time per row and phase (default 8)")
    p.add_argument("--rate", type=int, default=300_000,
                   help="flood rate of the fixed-load phase in pps (default 300000); the second phase runs "
                        "trafgen as fast as it goes")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all rows; medians reported (default 3)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--sources", type=int, default=1024, help="spoofed flood sources (default 1024)")
    p.add_argument("--limit", type=int, default=100, help="per-source limit in pps for every filter, burst 2x")
    p.add_argument("--legit-pps", type=int, default=50, help="legitimate stream rate (default 50)")
    p.add_argument("--gen-cpu", type=int, default=0)
    p.add_argument("--rx-cpu", type=int, default=1)
    p.add_argument("--idle", type=float, default=1.0, help="idle seconds before each row (softirq baseline)")
    p.add_argument("--quick", action="store_true", help="1 round x 3 s, 6 rows, results not saved unless --save")
    p.add_argument("--save", action="store_true")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--name", default="veth_flood")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, min(args.seconds, 3.0)
        if args.rows == ",".join(ROWS):
            args.rows = ",".join(QUICK_ROWS)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows: {bad}")
    if args.gen_cpu == args.rx_cpu or max(args.gen_cpu, args.rx_cpu) >= (os.cpu_count() or 1):
        p.error("--gen-cpu and --rx-cpu must be two different CPUs of this machine")
    report.require_root()
    report.require_bcc()
    for tool in ("trafgen", "nft", "iptables", "taskset", "ip"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (Debian: netsniff-ng, nftables, iptables, util-linux, iproute2)")

    import packet_path

    tag = str(os.getpid() % 10000)
    lab = VethLab(f"bf{tag}", subnet=f"192.168.{200 + int(tag) % 50}", host_in_ns=True)
    workdir = Path(tempfile.mkdtemp(prefix="tg-flood-"))
    method = (f"veth pair between two namespaces made by the bench; trafgen on CPU {args.gen_cpu} floods 64-byte "
              f"UDP frames from {args.sources} spoofed sources in {FLOOD_NET} as fast as it can, plus "
              f"{args.legit_pps} pps of legitimate UDP from one address; all receive work in the veth's threaded NAPI "
              f"kthread on CPU {args.rx_cpu} (GRO on, so every row goes through NAPI). Every filter limits each source to {args.limit} pps, burst "
              f"{2 * args.limit}. Each row runs two phases of {args.seconds:g} s: trafgen at {args.rate:,} pps (same load for every row), then "
              f"trafgen as fast as it goes; {args.rounds} round(s), rows interleaved, medians. "
              "rx CPU ns/pkt = NAPI kthread run time (schedstat) / packets offered to the receiver.")
    head = report.header_lines("Flood over veth: tidegate vs nftables, iptables and references", method)
    print("\n".join(head), flush=True)

    results = {"bench": "veth_flood", "machine": report.machine(), "git": report.git_commit(), "method": method,
               "args": vars(args), "runs": {r: [] for r in rows}, "rows": {}, "notes": []}
    gen = filters = recv = None

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        lab.create()
        prepare_lab(lab)
        gen = Generator(lab, args, workdir)
        if gen.shim is None:
            results["notes"].append("gcc missing or the shim did not build: trafgen restarted after each abort")
        else:
            results["notes"].append("trafgen ran under bench/trafgen_retry.c (16 MiB send buffer, EAGAIN/ENOBUFS "
                                    "retried) so it applies backpressure instead of aborting")
        recv = Receiver(lab)
        filters = Filters(lab, args, packet_path)
        print("loading filters ...", flush=True)
        results["setup"] = filters.load(rows)
        for rnd in range(args.rounds):
            for row in rows:
                print(f"round {rnd + 1}/{args.rounds}: {ROWS[row]} ...", flush=True)
                m = measure_row(row, lab, filters, gen, recv, args)
                results["runs"][row].append(m)
                for phase, x in m.items():
                    print(f"   {phase:5s}: offered {x['offered_pps'] / 1e3:.0f} kpps, rx CPU "
                          f"{report.fmt(x['rx_cpu_ns_per_pkt'], 0)} ns/pkt, drops "
                          f"{report.fmt((x['filter_drops_per_s'] or 0) / 1e3, 0)} k/s, legit "
                          f"{report.fmt(x['legit_pct'], 1)}%", flush=True)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if gen:
            gen.kill()
        if recv:
            recv.close()
        if filters:
            filters.close()
        lab.remove()
        shutil.rmtree(workdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)

    for row, runs in results["runs"].items():
        if runs:
            results["rows"][row] = {ph: aggregate([r[ph] for r in runs]) for ph in ("fixed", "max")}
    text = "\n".join(head + [
        f"### Fixed offered load: trafgen at {args.rate:,} pps (CPU per packet comparable across rows)\n",
        summarize(results, "fixed"), "",
        "### Generator's maximum rate (legitimate delivery under the heaviest flood this host makes)\n",
        summarize(results, "max"), ""] + [f"Note: {n}" for n in results["notes"]])
    print(text[len("\n".join(head)):])
    if not args.no_save and (not args.quick or args.save):
        jp, mp = report.save(args.name + ("-quick" if args.quick else ""), results, text)
        print(f"saved {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
