"""The packet-path bench's rows: every program measured, loaded side by side and run by the kernel.

Used by packet_path.py (its docstring lists the rows and the method).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import report
from packet_workload import (
    BPF_XDP_ATTACH_TYPE,
    MAP_SIZE,
    PREFILL_BASE,
    REF,
    VERDICT,
    XDP_FILTER_PINS,
    XDP_FLAGS_DRV_MODE,
    discard,
    rule_set,
)


# ------------------------------------------------------------------------- programs
@dataclass
class Row:
    key: str
    label: str
    fd: int
    family: str  # ref | xdp-filter | tidegate
    cycler: str | None = None  # which front end can tail-call it ("bcc" or "xdp")
    lru_fd: int | None = None
    kf: object = None
    keep: list = field(default_factory=list)  # objects that own the fd


class Bench:
    def __init__(self, args):
        self.args = args
        self.tag = f"{os.getpid() % 100000}"
        self.veth = (f"tgb{self.tag}a", f"tgb{self.tag}b")
        self.rows: dict[str, Row] = {}
        self.cyclers: dict[str, tuple] = {}  # kind -> (BPF, fn)
        self.kfs = []
        self.xdp_filter_loaded = False
        self.xdp_filter_fd = None
        self.notes: list[str] = []

    # ---------------------------------------------------------------- setup
    def load_ref(self, path: str, cflags=(), attach_type: int = -1):
        from bcc import BPF

        from tidegate.kernel.filter import inline_source

        b = BPF(text=inline_source(REF / path).encode(), cflags=["-Wno-unused-function", *cflags])
        fn = b.load_func(b"bench_xdp", BPF.XDP, attach_type=attach_type)
        return b, fn

    def add_ref(self, key, label, path, cflags=(), lru=False):
        b, fn = self.load_ref(path, cflags)
        self.rows[key] = Row(key, label, fn.fd, "ref", "bcc", b[b"buckets"].map_fd if lru else None, keep=[b, fn])

    def make_veth(self):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=self.veth[0], kind="veth", peer=self.veth[1])
            for name in self.veth:
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")

    def load_xdp_filter(self, lists):
        if os.path.exists(XDP_FILTER_PINS):
            self.notes.append("xdp-filter row skipped: /sys/fs/bpf/xdp-filter exists (another xdp-filter is "
                              "loaded on this host; its maps are shared and this bench will not touch them)")
            return
        r = subprocess.run(["xdp-filter", "load", self.veth[0], "-m", "skb"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            self.notes.append(f"xdp-filter row skipped: xdp-filter load failed: {r.stderr.strip()}")
            return
        self.xdp_filter_loaded = True
        # a few entries so its maps are not empty (its address filter is exact-match hashes, no CIDR)
        deny_hosts = [n.network_address for n in lists[1] if n.version == 4 and n.prefixlen == 32][:32]
        for a in deny_hosts:
            subprocess.run(["xdp-filter", "ip", str(a), "-m", "src"], capture_output=True, timeout=30)
        for p in ("23", "445"):
            subprocess.run(["xdp-filter", "port", p], capture_output=True, timeout=30)
        from pyroute2 import IPRoute

        from tidegate.kernel import bpfsys

        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=self.veth[0])[0])[0]
        xdp = link.get_attr("IFLA_XDP")
        pid = xdp.get_attr("IFLA_XDP_PROG_ID") or xdp.get_attr("IFLA_XDP_SKB_PROG_ID")
        self.xdp_filter_fd = bpfsys.prog_fd_by_id(pid)
        name = bpfsys.prog_info(self.xdp_filter_fd).name.decode()
        self.rows["xdpf"] = Row("xdpf", f"xdp-filter ({name})", self.xdp_filter_fd, "xdp-filter", "xdp")

    def load_tidegate(self, key, label, variant, mode, lists, shadow=False):
        from tidegate.kernel.filter import FilterConfig, KernelFilter

        # one directory per row: a key naming a --against directory that is not a git worktree holds its path
        pin = f"bench-{self.tag}-{key}".replace("/", "_")
        kf = KernelFilter(FilterConfig(interface=None, pin_name=pin, max_sources=MAP_SIZE))
        self.kfs.append(kf)
        lr = kf.load()
        rs = rule_set(variant, mode, lists)
        t0 = time.monotonic()
        kf.apply(rs, 1)
        apply_s = time.monotonic() - t0
        if shadow:
            cand = rule_set(variant, mode, lists)  # same shape, own state entries
            kf.load_shadow(cand, 2)
        lru_fd = kf._tables["tg_state"].map_fd  # read-only use: counting entries
        self.rows[key] = Row(key, label, kf.prog_fd, "tidegate", "bcc", lru_fd, kf)
        return {"compile_s": round(lr.compile_seconds, 3), "apply_s": round(apply_s, 3),
                "cidrs": len(rs.allow) + len(rs.deny) + sum(len(r.sources) for r in rs.rules),
                "rules": len(rs.rules)}

    def load_probes(self, full_rule_set):
        """Single lookups with tidegate's layouts and alternatives, filled with
        the entries the full rule set puts in tidegate's trie and port table."""
        from tidegate.kernel.entries import build_kernel_rule_set
        from tidegate.kernel.layout import addr_halves

        krs = build_kernel_rule_set(full_rule_set)
        v4 = {}
        for (addr, plen), (mask, flags) in krs.cidrs.items():
            if plen >= 96 and (addr >> 32) == 0xFFFF:
                v4[(addr & 0xFFFFFFFF, plen - 96)] = mask | flags
        probes = [
            ("probe_lpm24", "probe: LPM trie, 16-byte key (slot + ::ffff:a.b.c.d)", 1),
            ("probe_lpm8", "probe: LPM trie, IPv4 key (slot + 4-byte addr, tidegate's)", 2),
            ("probe_lpm4", "probe: LPM trie, IPv4 key, trie per slot", 3),
            ("probe_port_hash", "probe: port table as hash", 4),
            ("probe_port_array", "probe: port table as array (tidegate's)", 5),
        ]
        info = {}
        for key, label, n in probes:
            b, fn = self.load_ref("lookup_probe.c", [f"-DPROBE={n}"])
            t = b[b"table"]
            count = 0
            if n == 1:
                for (addr, plen), (mask, flags) in krs.cidrs.items():
                    k = t.Key()
                    k.prefixlen, k.slot = 32 + plen, 1
                    k.hi, k.lo = addr_halves(addr)
                    t[k] = t.Leaf(mask | flags)
                    count += 1
            elif n in (2, 3):
                for (a, plen), val in v4.items():
                    k = t.Key()
                    if n == 2:
                        k.prefixlen, k.slot = 32 + plen, 1
                    else:
                        k.prefixlen = plen
                    k.addr = int.from_bytes(a.to_bytes(4, "big"), "little")  # network order in memory
                    t[k] = t.Leaf(val)
                    count += 1
            elif n == 4:
                for (proto, port), mask in krs.ports.items():
                    k = t.Key()
                    k.slot, k.proto, k.port = 1, proto, port
                    t[k] = t.Leaf(mask)
                    count += 1
            else:
                for (proto, port), mask in krs.ports.items():
                    t[t.Key((1 * 2 + (proto == 17)) * 65536 + port)] = t.Leaf(mask)
                    count += 1
            self.rows[key] = Row(key, label, fn.fd, "ref", "bcc", keep=[b, fn])
            info[key] = {"entries": count}
        return info

    def load_cyclers(self):
        # one front end per expected_attach_type: the kernel only tail-calls
        # between programs that agree on it (BCC loads with none, libxdp with BPF_XDP)
        self.cyclers["bcc"] = self.load_ref("source_cycler.c")
        self.cyclers["xdp"] = self.load_ref("source_cycler.c", attach_type=BPF_XDP_ATTACH_TYPE)
        b, fn = self.load_ref("bare_drop.c", attach_type=BPF_XDP_ATTACH_TYPE)
        self.rows["bare37"] = Row("bare37", "bare XDP_DROP (BPF_XDP attach type)", fn.fd, "ref", "xdp",
                                  keep=[b, fn])

    # ------------------------------------------------------------ measuring
    def run(self, row: Row, frame: bytes, repeat: int, cycle: tuple | None = None, order: int = 1):
        """cycle: (base, count, stride) through the source cycler (bench/ref/source_cycler.c), which
        shows run n source (n * order) mod count."""
        from tidegate.kernel import bpfsys

        if cycle is None:
            return bpfsys.test_run(row.fd, frame, repeat)
        base, count, stride = cycle
        b, fn = self.cyclers[row.cycler]
        prog = b[b"target"]
        prog[ctypes.c_int(0)] = ctypes.c_int(row.fd)
        cfg = b[b"cfg"]
        leaf = cfg.Leaf()
        leaf.base = int(ipaddress.ip_address(base))
        leaf.mask = count - 1
        leaf.n = 0
        leaf.stride = stride
        leaf.order = order
        cfg[cfg.Key(0)] = leaf
        return bpfsys.test_run(fn.fd, frame, repeat)

    def measure_case(self, keys: list[str], frame: bytes, cycle=None, warmup_repeat=None, order=1) -> dict:
        """cycle: (base, count, stride) of a cycled case; order: the order the measured runs walk its
        sources in (the warm-up makes their entries in the order of their addresses)."""
        a = self.args
        rnd = random.Random(hash(tuple(keys)) & 0xFFFF)
        before = {k: self._reasons(self.rows[k]) for k in keys}
        for k in keys:  # warm-up: fill caches, insert the entries this case uses
            self.run(self.rows[k], frame, warmup_repeat or a.repeat, cycle)
        runs = {k: [] for k in keys}
        verdicts = {}
        for _ in range(a.runs):
            shuffled = list(keys)
            rnd.shuffle(shuffled)
            for k in shuffled:
                v, ns = self.run(self.rows[k], frame, a.repeat, cycle, order)
                runs[k].append(ns)
                verdicts[k] = VERDICT.get(v, str(v))
        out = {}
        for k in keys:
            after = self._reasons(self.rows[k])
            reasons = None
            if after is not None:
                delta = {r: after[r] - before[k][r] for r in after if after[r] - before[k][r]}
                total = sum(delta.values()) or 1
                reasons = {r: round(n / total, 4) for r, n in delta.items()}
            out[k] = {"ns": report.median(runs[k]), "runs": runs[k], "verdict": verdicts[k], "reasons": reasons}
        return out

    def _reasons(self, row: Row):
        if row.kf is None:
            return None
        return {r: p for r, (p, _) in row.kf.counters().reasons.items()}

    def map_entries(self, row: Row) -> int | None:
        if row.lru_fd is None:
            return None
        from tidegate.kernel import bpfsys

        info = bpfsys.map_info(row.lru_fd)
        _, _, n = bpfsys.lookup_batch(row.lru_fd, info.key_size, info.value_size, info.max_entries)
        return n

    def prefill(self, keys: list[str], frame: bytes) -> dict:
        """Fill each row's per-source map with about MAP_SIZE sources, a share from every CPU.

        A map with per-CPU LRU lists (tidegate's, the token bucket's per-CPU variant) gives each CPU
        MAP_SIZE / CPUs entries: filled from one CPU it holds at most that share, and how much more
        depended on where the scheduler ran the prefill (524,288 to 818,978 entries of 1,048,576 in
        runs up to 954acb3). A flood that fills the maps comes in on every CPU, so each CPU sends its own
        block of sources, pinned to it."""
        cpus = sorted(os.sched_getaffinity(0))
        share = 1 << ((MAP_SIZE // len(cpus)).bit_length() - 1)  # the cycler's count is a power of two
        base = int(ipaddress.ip_address(PREFILL_BASE))
        out = {}
        try:
            for k in keys:
                row = self.rows[k]
                t0 = time.monotonic()
                for i, cpu in enumerate(cpus):
                    os.sched_setaffinity(0, {cpu})
                    block = str(ipaddress.ip_address(base + i * share))
                    self.run(row, frame, share + share // 8, (block, share, 1))
                out[k] = {"entries": self.map_entries(row), "seconds": round(time.monotonic() - t0, 2)}
        finally:
            os.sched_setaffinity(0, cpus)
        return out

    # ------------------------------------------------------------ load time
    def load_times(self, runs: int) -> dict:
        from tidegate.kernel.filter import FilterConfig, KernelFilter

        res = []
        rs = rule_set("defaults", "pass", ((), ()))
        for i in range(runs):
            kf = KernelFilter(FilterConfig(interface=self.veth[1], xdp_mode="native",
                                           pin_name=f"bench-{self.tag}-load{i}"))
            self.kfs.append(kf)
            t0 = time.monotonic()
            lr = kf.load()
            kf.apply(rs, 1)
            mode = kf.attach()
            total = time.monotonic() - t0
            res.append({"compile_s": lr.compile_seconds, "total_s": total, "mode": mode})
            kf.detach(remove_pins=True)
            kf.close()
            self.kfs.remove(kf)
            from bcc import BPF

            BPF.remove_xdp(self.veth[1].encode(), XDP_FLAGS_DRV_MODE)  # in case detach missed it
        return {"runs": res, "compile_s": report.median([r["compile_s"] for r in res]),
                "total_s": report.median([r["total_s"] for r in res])}

    # -------------------------------------------------------------- cleanup
    def cleanup(self):
        for kf in self.kfs:
            discard(kf)
        self.kfs = []
        if self.xdp_filter_fd is not None:
            os.close(self.xdp_filter_fd)
            self.xdp_filter_fd = None
        if self.xdp_filter_loaded:
            subprocess.run(["xdp-filter", "unload", self.veth[0]], capture_output=True, timeout=60)
            self.xdp_filter_loaded = False
            # the pin directory did not exist before this bench loaded xdp-filter
            if os.path.isdir(XDP_FILTER_PINS):
                shutil.rmtree(XDP_FILTER_PINS, ignore_errors=True)
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.veth[0])
                if idx:
                    ipr.link("del", index=idx[0])
        except Exception as e:
            print(f"cleanup: could not delete {self.veth[0]}: {e}", file=sys.stderr)
