#!/usr/bin/env python3
"""Packet-path benchmark: tidegate's XDP program next to the floor and its peers.

Every row is an XDP program run by the kernel itself with BPF_PROG_TEST_RUN
(repeat = --repeat per call, default 1,000,000; the kernel reports the mean
ns per run of that call). Each figure is the median of --runs calls (default
5). All rows are loaded at the same time and measured in interleaved rounds
(round r measures every row once, in a shuffled order), so load from other
processes on the machine hits all rows alike; ratios are taken between rows
of the same run only.

Rows
  bare XDP_DROP            `return XDP_DROP;`
  parse+drop (floor)       Ethernet, up to 2 VLAN tags, IPv4/IPv6 source, drop
  parse+drop+ktime         the floor plus one bpf_ktime_get_ns()
  parse+drop+coarse        the floor plus one bpf_ktime_get_coarse_ns()
  parse+drop+jiffies       the floor plus one bpf_jiffies64() (tidegate's
                           bucket clock)
  minimal token bucket     bench/ref/token_bucket.c: per-source bucket in an
                           LRU hash with bpf_ktime_get_ns (the afternoon job);
                           the ratios are taken against this row
  token bucket variants    the same with the coarse clock, and with per-CPU
                           LRU lists (BPF_F_NO_COMMON_LRU): what two one-line
                           changes to the reference would buy; and with
                           tidegate's entry size (24-byte key, 120-byte
                           value): what the size alone costs
  xdp-filter               Debian's xdp-tools program (all features, allow
                           policy, a few filter entries), loaded by
                           `xdp-filter load` on a veth pair this bench makes,
                           fetched by id
  tidegate: ...            bpf/tidegate.c compiled by the kernel layer
                           (KernelFilter) with rule-set variants: defaults
                           only; + prefix limit; + allow/deny lists of 10,000
                           CIDRs each; 50 rules with ports instead of lists;
                           the full set (lists + 50 rules + prefix limits);
                           the full set with a shadow set loaded

Cases
  v4 hot        one IPv4/UDP source, within its rate (every bucket passes)
  v4 hot over   one IPv4/UDP source over its rate (limits 100 pps / burst
                100: the token-bucket rows drop it)
  v6 hot        one IPv6/UDP source, within its rate
  VLAN hot      one 802.1Q-tagged IPv4/UDP source, within its rate
  v4 64k of 1M  65,536 sources in round robin, per-source maps prefilled
                with 1,048,576 other sources first
  v4 64k spread 65,536 sources spread over all of IPv4 (a random-source
                flood: some fall in the allow/deny lists), maps full
  v4 hot, 1M    the hot source again, with the map full (1M entries)
  v4 2M churn   2,097,152 sources round robin through maps of 1,048,576:
                every packet is a source the map no longer holds

Probe rows (bench/ref/lookup_probe.c) price single lookups with tidegate's
layout and alternatives, filled with the entries of the full rule set.

How the cycled case works: BPF_PROG_TEST_RUN repeats one frame, and the
frame's bytes persist between repeats, so bench/ref/source_cycler.c rewrites
the frame's source address (base + n mod 65536) and tail-calls the row's
program. Prefill is the same front end with 1,048,576 sources. Every row of
that case carries the front end's cost; "cycler+bare" measures it.

Also measured: agent-side load time (KernelFilter.load() = BCC compile +
map creation, + apply of a small rule set + native attach to a veth), median
of --load-runs.

Run as root with the project venv or Debian's python3:
  .venv/bin/python bench/packet_path.py            # full run, saves results
  .venv/bin/python bench/packet_path.py --quick    # fewer runs, not saved
While iterating, --cases and --rows measure a subset (never saved), e.g.
  .venv/bin/python bench/packet_path.py --quick --cases v4,cycle --rows tg_full,tg_shadow
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

report.use_repo_package()

REF = report.BENCH_DIR / "ref"
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_XDP_ATTACH_TYPE = 37  # enum bpf_attach_type BPF_XDP, what libbpf gives SEC("xdp")
VERDICT = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}
MAP_SIZE = 1 << 20
XDP_FILTER_PINS = "/sys/fs/bpf/xdp-filter"
BIG = 10**9  # pps and burst that a benchmark run can never exhaust
SMALL = 100  # pps and burst of the "over its rate" case

HOT_V4 = "198.18.0.1"
HOT_V6 = "2001:db8:bbbb::1"
CYCLE_BASE = "198.18.0.0"  # the 64k cycled sources: 198.18.0.0/16
SPREAD_BASE = "1.2.3.4"  # 64k sources spread over all of IPv4 (stride below)
SPREAD_STRIDE = 0x9E3779B1  # odd, 2^32 / golden ratio: consecutive sources far apart
CHURN_SOURCES = 2 * (1 << 20)  # more sources than the maps hold: every packet inserts
PREFILL_BASE = "100.64.0.0"  # the 1M prefill sources: 100.64.0.0/12
# no list entry may cover the bench's own sources
RESERVED = [ipaddress.ip_network(n) for n in ("198.18.0.0/15", "100.64.0.0/10", "2001:db8:bbbb::/48")]


def discard(kf) -> None:
    """Close a KernelFilter and remove its pins, whatever state it is in; a
    pin that stays is reported."""
    try:
        kf.close()
    except Exception:
        pass
    try:
        kf.remove_pins()
    except Exception as e:
        print(f"cleanup: could not remove {kf.config.pin_dir}: {e}", file=sys.stderr)


# --------------------------------------------------------------------------- frames
def frames() -> dict[str, bytes]:
    from scapy.all import IP, UDP, Dot1Q, Ether, IPv6

    eth = dict(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
    pay = b"\x00" * 18
    return {
        "v4": bytes(Ether(**eth) / IP(src=HOT_V4, dst="192.0.2.10") / UDP(sport=40000, dport=443) / pay),
        "v6": bytes(Ether(**eth) / IPv6(src=HOT_V6, dst="2001:db8::10") / UDP(sport=40000, dport=443) / pay),
        "vlan": bytes(Ether(**eth) / Dot1Q(vlan=100) / IP(src=HOT_V4, dst="192.0.2.10")
                      / UDP(sport=40000, dport=443) / pay),
    }


# ------------------------------------------------------------------------ rule sets
def _reserved(net) -> bool:
    return any(net.version == r.version and net.overlaps(r) for r in RESERVED)


def _random_v4(rnd: random.Random, within: list[ipaddress.IPv4Network], plens: list[tuple[int, float]]):
    base = rnd.choice(within)
    plen = rnd.choices([p for p, _ in plens], [w for _, w in plens])[0]
    plen = max(plen, base.prefixlen)
    addr = int(base.network_address) + rnd.randrange(base.num_addresses)
    return ipaddress.ip_network((addr, plen), strict=False)


def _random_v6(rnd: random.Random, within: ipaddress.IPv6Network, plens: list[int]):
    addr = int(within.network_address) + rnd.randrange(within.num_addresses)
    return ipaddress.ip_network((addr, rnd.choice(plens)), strict=False)


def realistic_lists(n_allow: int = 10_000, n_deny: int = 10_000, seed: int = 7):
    """Allow list: partner ranges (private space, one IPv6 block), mostly /24
    and /32. Deny list: shaped like public block lists, spread over all of
    the public IPv4 space, mostly /32 with some /24 and shorter, plus IPv6."""
    rnd = random.Random(seed)
    allow: set = set()
    v4_allow = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12")]
    while len(allow) < n_allow:
        if rnd.random() < 0.9:
            net = _random_v4(rnd, v4_allow, [(16, 0.05), (20, 0.1), (22, 0.15), (24, 0.4), (32, 0.3)])
        else:
            net = _random_v6(rnd, ipaddress.ip_network("2001:db8:a000::/36"), [48, 56, 64])
        allow.add(net)
    deny: set = set()
    public = [ipaddress.ip_network(f"{a}.0.0.0/8") for a in range(1, 224)
              if a not in (10, 100, 127, 172, 192, 198)]
    while len(deny) < n_deny:
        if rnd.random() < 0.9:
            net = _random_v4(rnd, public, [(16, 0.02), (19, 0.03), (22, 0.1), (24, 0.25), (32, 0.6)])
        else:
            net = _random_v6(rnd, ipaddress.ip_network("2a00::/12"), [32, 40, 48, 64, 128])
        if _reserved(net) or net in allow:
            continue
        deny.add(net)
    key = lambda n: (n.version, n)  # noqa: E731
    return tuple(sorted(allow, key=key)), tuple(sorted(deny, key=key))


COMMON_PORTS = [22, 25, 53, 80, 110, 123, 143, 389, 465, 587, 636, 853, 993, 995, 1194, 1883, 2049, 3306, 3389,
                3478, 5060, 5222, 5432, 5672, 6379, 6443, 8080, 8443, 8883, 9092, 9200, 11211, 27017]


def realistic_rules(limit, prefix_limit, any_source_only: bool = False, seed: int = 11):
    """50 rules: TCP and UDP services with 1-4 ports or ranges each, ten of
    them restricted to source CIDRs, a few pass/drop rules, and the rule the
    bench's frames hit (udp/443, 'quic') at index 40. Only 'quic' covers
    udp/443, so every tidegate row sends the frames through the same rule."""
    from tidegate.ruleset.model import Limit, PortRange, PrefixLimit, Rule  # noqa: F401

    rnd = random.Random(seed)
    rules = []
    for i in range(50):
        if i == 40:
            rules.append(Rule("quic", "udp", (PortRange(443, 443),), (), "limit", limit, prefix_limit, 0))
            continue
        proto = "tcp" if i % 2 == 0 else "udp"
        ports = set()
        for _ in range(rnd.randint(1, 4)):
            if rnd.random() < 0.2:
                lo = rnd.randrange(10000, 60000)
                ports.add(PortRange(lo, lo + rnd.choice([9, 99, 255])))
            else:
                p = rnd.choice(COMMON_PORTS + [rnd.randrange(1024, 10000)])
                ports.add(PortRange(p, p))
        ports.discard(PortRange(443, 443))
        sources = ()
        if not any_source_only and i % 5 == 2:
            sources = tuple(sorted({ipaddress.ip_network(f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.0/24")
                                    for _ in range(rnd.randint(5, 20))}))
        action = "limit"
        if i in (7, 23):
            action = "drop"
        elif i in (12, 31):
            action = "pass"
        rlimit = Limit(rnd.choice([100, 500, 1000, 5000]), rnd.choice([200, 1000, 10000])) if action == "limit" else None
        rules.append(Rule(f"svc{i:02d}", proto, tuple(sorted(ports, key=lambda r: r.lo)), sources, action,
                          rlimit, prefix_limit if action == "limit" else None, 10 if i % 7 == 3 else 0))
    return tuple(rules)


def rule_set(variant: str, mode: str, lists):
    """variant: defaults | prefix | lists | rules | rules-any | full; mode: pass | over."""
    from tidegate.ruleset.model import Defaults, Limit, PrefixLimit, RuleSet

    n = BIG if mode == "pass" else SMALL
    limit = Limit(n, n)
    pfx = PrefixLimit(24, 48, Limit(BIG, BIG) if mode == "pass" else Limit(10 * SMALL, 10 * SMALL))
    with_prefix = variant != "defaults"
    defaults = Defaults(limit, 32, 64, pfx if with_prefix else None, 0)
    allow, deny = lists if variant in ("lists", "full") else ((), ())
    rules = ()
    if variant in ("rules", "full"):
        rules = realistic_rules(limit, pfx)
    elif variant == "rules-any":
        rules = realistic_rules(limit, pfx, any_source_only=True)
    return RuleSet(defaults, allow, deny, rules, (), f"bench {variant} {mode}")


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

        kf = KernelFilter(FilterConfig(interface=None, pin_name=f"bench-{self.tag}-{key}", max_sources=MAP_SIZE))
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
            ("probe_lpm24", "probe: LPM trie, tidegate key (slot + 16-byte addr)", 1),
            ("probe_lpm8", "probe: LPM trie, IPv4 key (slot + 4-byte addr)", 2),
            ("probe_lpm4", "probe: LPM trie, IPv4 key, trie per slot", 3),
            ("probe_port_hash", "probe: port table as hash (tidegate)", 4),
            ("probe_port_array", "probe: port table as array", 5),
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
    def run(self, row: Row, frame: bytes, repeat: int, cycle: tuple[str, int] | None = None):
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
        cfg[cfg.Key(0)] = leaf
        return bpfsys.test_run(fn.fd, frame, repeat)

    def measure_case(self, keys: list[str], frame: bytes, cycle=None, warmup_repeat=None) -> dict:
        a = self.args
        rnd = random.Random(hash(tuple(keys)) & 0xFFFF)
        before = {k: self._reasons(self.rows[k]) for k in keys}
        for k in keys:  # warm-up: fill caches, insert the entries this case uses
            self.run(self.rows[k], frame, warmup_repeat or a.repeat, cycle)
        runs = {k: [] for k in keys}
        verdicts = {}
        for _ in range(a.runs):
            order = list(keys)
            rnd.shuffle(order)
            for k in order:
                v, ns = self.run(self.rows[k], frame, a.repeat, cycle)
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
        out = {}
        for k in keys:
            row = self.rows[k]
            t0 = time.monotonic()
            self.run(row, frame, MAP_SIZE + MAP_SIZE // 8, (PREFILL_BASE, MAP_SIZE, 1))
            out[k] = {"entries": self.map_entries(row), "seconds": round(time.monotonic() - t0, 2)}
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


# --------------------------------------------------------------------------- report
CASES = [
    ("v4", "v4 hot", "one IPv4 source, within its rate"),
    ("over", "v4 hot over", "one IPv4 source over its rate (100 pps)"),
    ("v6", "v6 hot", "one IPv6 source, within its rate"),
    ("vlan", "VLAN hot", "one 802.1Q-tagged IPv4 source, within its rate"),
    ("cycle", "v4 64k of 1M", "65,536 sources round robin, maps prefilled with 1M sources (through the cycler)"),
    ("spread", "v4 64k spread", "65,536 sources spread over all of IPv4 (some hit the allow/deny lists), "
     "round robin, maps full"),
    ("hot1m", "v4 hot, 1M", "one IPv4 source, maps holding ~1M sources"),
    ("churn", "v4 2M churn", "2,097,152 sources round robin through maps of 1,048,576 entries: every packet is "
     "a source the map no longer holds (insert + evict)"),
]


def summarize(results: dict) -> tuple[str, list[str]]:
    """Per case: a table of rows with ns and ratios vs the token bucket and the floor."""
    out = []
    cases = results["cases"]
    labels = results["labels"]
    for ckey, cname, cdesc in CASES:
        c = cases.get(ckey)
        if not c:
            continue
        tb = c.get(c["_tb"], {}).get("ns")
        floor = c.get(c["_floor"], {}).get("ns")
        rows = []
        for k, v in c.items():
            if k.startswith("_"):
                continue
            rs = v.get("reasons")
            rs_s = ", ".join(f"{r} {p:.0%}" for r, p in sorted(rs.items(), key=lambda x: -x[1])) if rs else ""
            rows.append([labels[k], report.fmt(v["ns"], 0), f"{min(v['runs'])}-{max(v['runs'])}",
                         report.fmt(report.ratio(v["ns"], tb), 2), report.fmt(report.ratio(v["ns"], floor), 2),
                         v["verdict"] + (f" ({rs_s})" if rs_s else "")])
        out.append(f"### {cname}: {cdesc}\n")
        out.append(report.table(["row", "ns/pkt", "range", "x token bucket", "x floor", "verdict"], rows))
        out.append("")
    return "\n".join(out), []


def cost_breakdown(results: dict) -> str:
    """What each part of tidegate's path costs: differences between rows."""
    pairs = [
        ("clock: bpf_ktime_get_ns", "parse_ktime", "parse"),
        ("clock: bpf_ktime_get_coarse_ns", "parse_coarse", "parse"),
        ("clock: bpf_jiffies64 (tidegate's)", "parse_jiffies", "parse"),
        ("minimal token bucket over the floor", "tb", "parse"),
        ("token bucket: coarse clock instead of ktime", "tb_coarse", "tb"),
        ("token bucket: per-CPU LRU lists", "tb_pcpu", "tb"),
        ("token bucket: tidegate's entry size (24-byte key, 120-byte value)", "tb_big", "tb"),
        ("tidegate defaults-only over the floor", "tg_defaults", "parse"),
        ("per-prefix bucket (prefix limit on)", "tg_prefix", "tg_defaults"),
        ("allow/deny tries, 2x10k CIDRs (trie, or the cached answer)", "tg_lists", "tg_prefix"),
        ("50 rules, any source (port table + rule bit)", "tg_rules_any", "tg_prefix"),
        ("50 rules, 10 with source CIDRs (+ small trie)", "tg_rules", "tg_prefix"),
        ("full set over defaults+prefix", "tg_full", "tg_prefix"),
        ("shadow set loaded (its own buckets; same matching)", "tg_shadow", "tg_full"),
    ]
    rows = []
    for label, a, b in pairs:
        cells = [label]
        for ckey in ("v4", "v6", "cycle", "spread", "hot1m", "churn"):
            c = results["cases"].get(ckey, {})
            if a in c and b in c and c[a]["ns"] is not None and c[b]["ns"] is not None:
                cells.append(f"{c[a]['ns'] - c[b]['ns']:+.0f}")
            else:
                cells.append("n/a")
        rows.append(cells)
    return report.table(["difference", "v4 hot", "v6 hot", "v4 64k of 1M", "v4 64k spread", "v4 hot, 1M",
                         "v4 2M churn"], rows)


# Reference figures quoted in issue 7 (measured on another machine like this one)
ISSUE7_REFERENCE = [
    ("bare drop", "v4", "bare", None, 23),
    ("parse+drop", "v4", "parse", None, 24),
    ("bpf_ktime_get_ns alone (over the floor)", "v4", "parse_ktime", "parse", 30),
    ("minimal token bucket, one source", "v4", "tb", None, 80),
    ("minimal token bucket, 64k cycling in 1M", "cycle", "tb", None, 380),
    ("xdp-filter (low end of 62-109)", "v4", "xdpf", None, 62),
]


def reference_table(results: dict) -> str:
    rows = []
    for label, ckey, a, b, ref in ISSUE7_REFERENCE:
        c = results["cases"].get(ckey, {})
        if a not in c:
            rows.append([label, ref, "n/a", "n/a"])
            continue
        v = c[a]["ns"] - (c[b]["ns"] if b else 0)
        rows.append([label, ref, report.fmt(float(v), 0), report.fmt(report.ratio(v, ref), 2)])
    return report.table(["figure", "issue 7 reference, ns", "measured here, ns", "here / reference"], rows)


# issue 15's packet-path rows: (case, row, target ratio to the minimal token bucket)
TARGETS = [("v4", "tg_full", 1.0), ("cycle", "tg_full", 1.0), ("spread", "tg_full", 1.0),
           ("v4", "tg_shadow", 1.3), ("cycle", "tg_shadow", 1.3), ("spread", "tg_shadow", 1.3),
           ("v6", "tg_full", 1.0), ("vlan", "tg_full", 1.0)]  # fmt: skip


def targets_table(results: dict) -> str:
    """Issue 15's packet-path rows (and issue 7's): tidegate / minimal token bucket, same run."""
    rows = []
    listed = set()
    for ckey, k, target in TARGETS:
        listed.add((ckey, k))
        rows.append(_target_row(results, ckey, k, target))
    for ckey, _, _ in CASES:
        for k in ("tg_full", "tg_shadow", "tg_defaults", "tg_full_over", "tg_shadow_over", "tg_defaults_over"):
            if (ckey, k) not in listed:
                rows.append(_target_row(results, ckey, k, 1.3 if "shadow" in k else 1.0))
    return report.table(["case", "row", "x minimal token bucket", "target"], [r for r in rows if r])


def _target_row(results: dict, ckey: str, k: str, target: float) -> list | None:
    c = results["cases"].get(ckey, {})
    tbk = c.get("_tb")
    if not tbk or tbk not in c or k not in c:
        return None
    r = report.ratio(c[k]["ns"], c[tbk]["ns"])
    cname = next(n for key, n, _ in CASES if key == ckey)
    ok = r is not None and r <= target
    return [cname, results["labels"][k], report.fmt(r, 2), f"meets (<= {target})" if ok else f"MISSES (<= {target})"]


def pieces_table(results: dict) -> str:
    rows = []
    for k in ("probe_lpm24", "probe_lpm8", "probe_lpm4", "probe_port_hash", "probe_port_array"):
        cells = [results["labels"].get(k, k)]
        for ckey in ("v4", "cycle", "spread"):
            c = results["cases"].get(ckey, {})
            if k in c and "parse" in c:
                cells.append(f"{c[k]['ns'] - c['parse']['ns']:+.0f}")
            else:
                cells.append("n/a")
        rows.append(cells)
    return report.table(["one lookup, ns over the floor", "v4 hot", "v4 64k of 1M", "v4 64k spread"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1_000_000, help="BPF_PROG_TEST_RUN repeat per call (default 1e6)")
    p.add_argument("--runs", type=int, default=5, help="calls per row and case; the median is reported (default 5)")
    p.add_argument("--load-runs", type=int, default=5, help="agent load-time samples (default 5)")
    p.add_argument("--quick", action="store_true", help="3 runs, 2 load samples, results not saved unless --save")
    p.add_argument("--save", action="store_true", help="with --quick: save anyway (as <name>-quick)")
    p.add_argument("--name", default="packet_path", help="results file name under bench/results/")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--cases", help="comma-separated case keys to measure (v4,over,v6,vlan,cycle,spread,hot1m,churn); "
                   "a subset is never saved")
    p.add_argument("--rows", help="comma-separated tidegate row keys to load (tg_defaults,tg_full,tg_shadow,...); "
                   "a subset is never saved")
    args = p.parse_args(argv)
    if args.cases or args.rows:
        args.no_save = True
    want_case = set(args.cases.split(",")) if args.cases else None
    if args.quick:
        args.runs = min(args.runs, 3)
        args.load_runs = min(args.load_runs, 2)
    if args.repeat < 1:
        p.error("--repeat must be positive")
    report.require_root()
    report.require_bcc()

    method = (f"BPF_PROG_TEST_RUN, repeat {args.repeat:,} per call, median of {args.runs} calls per row, all rows "
              "loaded together and measured in shuffled interleaved rounds; 64-byte UDP frames (68 with VLAN, 84 "
              "IPv6). Cycled case: bench/ref/source_cycler.c rewrites the source per run and tail-calls the row.")
    head = report.header_lines("Packet path: tidegate vs the floor and its peers", method)
    print("\n".join(head), flush=True)

    bench = Bench(args)
    interrupted = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    results: dict = {"bench": "packet_path", "machine": report.machine(), "git": report.git_commit(),
                     "method": method, "repeat": args.repeat, "runs": args.runs, "cases": {}, "labels": {},
                     "setup": {}}
    try:
        fr = frames()
        t0 = time.monotonic()
        lists = realistic_lists()
        results["setup"]["lists_s"] = round(time.monotonic() - t0, 2)
        bench.make_veth()
        print("loading reference programs ...", flush=True)
        bench.add_ref("bare", "bare XDP_DROP", "bare_drop.c")
        bench.add_ref("parse", "parse+drop (floor)", "parse_drop.c")
        bench.add_ref("parse_ktime", "parse+drop + bpf_ktime_get_ns", "parse_drop.c", ["-DCLOCK=1"])
        bench.add_ref("parse_coarse", "parse+drop + bpf_ktime_get_coarse_ns", "parse_drop.c", ["-DCLOCK=2"])
        bench.add_ref("parse_jiffies", "parse+drop + bpf_jiffies64", "parse_drop.c", ["-DCLOCK=3"])
        bench.add_ref("tb", "minimal token bucket", "token_bucket.c", [f"-DRATE={BIG}", f"-DBURST={BIG}",
                                                                        f"-DMAX_SOURCES={MAP_SIZE}"], lru=True)
        bench.add_ref("tb_coarse", "token bucket, coarse clock (variant)", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}", "-DCOARSE_CLOCK=1"], lru=True)
        bench.add_ref("tb_pcpu", "token bucket, per-CPU LRU lists (variant)", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}", "-DLRU_FLAGS=2"], lru=True)
        bench.add_ref("tb_big", "token bucket, tidegate's entry size (variant)", "token_bucket.c",
                      [f"-DRATE={BIG}", f"-DBURST={BIG}", f"-DMAX_SOURCES={MAP_SIZE}", "-DKEY_PAD=1", "-DVAL_PAD=13"],
                      lru=True)
        bench.add_ref("tb_over", "minimal token bucket (100 pps)", "token_bucket.c",
                      [f"-DRATE={SMALL}", f"-DBURST={SMALL}", f"-DMAX_SOURCES={MAP_SIZE}"], lru=True)
        bench.load_cyclers()
        bench.load_xdp_filter(lists)
        tg = [
            ("tg_defaults", "tidegate: defaults only", "defaults", "pass", False),
            ("tg_prefix", "tidegate: defaults + prefix limit", "prefix", "pass", False),
            ("tg_lists", "tidegate: + allow/deny 2x10k CIDRs", "lists", "pass", False),
            ("tg_rules_any", "tidegate: + 50 rules (ports, any source)", "rules-any", "pass", False),
            ("tg_rules", "tidegate: + 50 rules (ports, 10 with CIDRs)", "rules", "pass", False),
            ("tg_full", "tidegate: full (lists + 50 rules + prefix)", "full", "pass", False),
            ("tg_shadow", "tidegate: full + shadow set", "full", "pass", True),
            ("tg_defaults_over", "tidegate: defaults only (100 pps)", "defaults", "over", False),
            ("tg_full_over", "tidegate: full (100 pps)", "full", "over", False),
            ("tg_shadow_over", "tidegate: full + shadow (100 pps)", "full", "over", True),
        ]
        if args.rows:
            tg = [t for t in tg if t[0] in args.rows.split(",")]
        for key, label, variant, mode, shadow in tg:
            print(f"loading {label} ...", flush=True)
            results["setup"][key] = bench.load_tidegate(key, label, variant, mode, lists, shadow)
        print("loading lookup probes ...", flush=True)
        results["setup"]["probes"] = bench.load_probes(rule_set("full", "pass", lists))
        results["labels"] = {k: r.label for k, r in bench.rows.items()}
        probes = [k for k in bench.rows if k.startswith("probe_")]

        common = ["bare", "parse", "parse_ktime", "parse_coarse", "parse_jiffies"] + (["xdpf"] if "xdpf" in bench.rows else [])
        pass_tg = [k for k, _, _, m, _ in tg if m == "pass"]
        over_tg = [k for k, _, _, m, _ in tg if m == "over"]
        tbs = ["tb", "tb_coarse", "tb_pcpu", "tb_big"]
        for ckey, frame, keys in (("v4", fr["v4"], common + tbs + pass_tg + probes),
                                  ("over", fr["v4"], common + ["tb_over"] + over_tg),
                                  ("v6", fr["v6"], common + tbs + pass_tg),
                                  ("vlan", fr["vlan"], common + tbs + pass_tg)):
            if want_case is not None and ckey not in want_case:
                continue
            print(f"case {ckey}: {len(keys)} rows x {args.runs} runs ...", flush=True)
            c = bench.measure_case(keys, frame)
            c["_tb"] = "tb_over" if ckey == "over" else "tb"
            c["_floor"] = "parse"
            results["cases"][ckey] = c

        lru_rows = tbs + pass_tg
        cyc_keys = ["bare", "parse"] + (["xdpf", "bare37"] if "xdpf" in bench.rows else []) + lru_rows

        def wanted(ckey):
            return want_case is None or ckey in want_case

        if want_case is None or want_case & {"cycle", "spread", "hot1m"}:
            print(f"prefilling {len(lru_rows)} maps with {MAP_SIZE:,} sources ...", flush=True)
            results["prefill"] = bench.prefill(lru_rows, fr["v4"])
        for ckey, cycle in (("cycle", (CYCLE_BASE, 65536, 1)), ("spread", (SPREAD_BASE, 65536, SPREAD_STRIDE))):
            if not wanted(ckey):
                continue
            keys = cyc_keys + probes
            print(f"case {ckey}: {len(keys)} rows x {args.runs} runs ...", flush=True)
            c = bench.measure_case(keys, fr["v4"], cycle=cycle, warmup_repeat=2 * 65536)
            c["_tb"], c["_floor"] = "tb", "parse"
            results["cases"][ckey] = c
        if wanted("hot1m"):
            results["entries_after_cycle"] = {k: bench.map_entries(bench.rows[k]) for k in lru_rows}
            print("case hot1m ...", flush=True)
            c = bench.measure_case(common + lru_rows, fr["v4"])
            c["_tb"], c["_floor"] = "tb", "parse"
            results["cases"]["hot1m"] = c
        if wanted("churn"):
            print(f"case churn: {len(cyc_keys)} rows x {args.runs} runs ...", flush=True)
            c = bench.measure_case(cyc_keys, fr["v4"], cycle=(PREFILL_BASE, CHURN_SOURCES, 1),
                                   warmup_repeat=MAP_SIZE)
            c["_tb"], c["_floor"] = "tb", "parse"
            results["cases"]["churn"] = c

        if args.load_runs and want_case is None and not args.rows:
            print(f"agent load time x {args.load_runs} ...", flush=True)
            results["load_time"] = bench.load_times(args.load_runs)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        bench.cleanup()
        return 130
    finally:
        bench.cleanup()
        for s, h in old.items():
            signal.signal(s, h)

    results["notes"] = bench.notes
    body, _ = summarize(results)
    md = head + ["### Targets: tidegate / minimal token bucket (issue 15's packet-path rows first)\n",
                 targets_table(results), "",
                 "### Against the reference figures quoted in issue 7 (another machine)\n",
                 reference_table(results), "", body, "### Where tidegate's time goes (ns differences between rows, same run)\n",
                 cost_breakdown(results), "",
                 "### Single lookups: tidegate's layouts and alternatives (same entries as the full set)\n",
                 pieces_table(results), ""]
    if "prefill" in results:
        md += ["Per-source map entries after the 1M prefill: " + ", ".join(
            f"{results['labels'][k]} {v['entries']:,}" for k, v in results["prefill"].items()
            if v["entries"] is not None) + ".", ""]
    md += [f"Cycled-case front end (cycler + bare drop minus bare drop): "
           f"{report.fmt(_cyc_cost(results), 1)} ns per packet, carried by every row of that case.", ""]
    if "load_time" in results:
        lt = results["load_time"]
        md += [f"Agent load time (KernelFilter.load + apply + native attach on veth), median of "
               f"{len(lt['runs'])}: {lt['total_s']:.2f} s, of which BCC compile + load {lt['compile_s']:.2f} s.", ""]
    md += _issue2_lines(results)
    for n in bench.notes:
        md.append(f"Note: {n}")
    text = "\n".join(md)
    print(text[len("\n".join(head)):])
    if not args.no_save and (not args.quick or args.save):
        name = args.name + ("-quick" if args.quick else "")
        jp, mp = report.save(name, results, text)
        print(f"saved {jp} and {mp}")
    return 0


def _cyc_cost(results):
    c = results["cases"].get("cycle", {})
    if "bare" in c and "bare" in results["cases"].get("v4", {}):
        return c["bare"]["ns"] - results["cases"]["v4"]["bare"]["ns"]
    return None


def _issue2_lines(results) -> list[str]:
    c1, cm = results["cases"].get("v4", {}), results["cases"].get("hot1m", {})
    if "tg_full" not in c1 or "tg_full" not in cm:
        return []
    rows = []
    for k in ("parse", "tb", "tg_defaults", "tg_full", "tg_shadow"):
        if k in c1 and k in cm:
            rows.append([results["labels"][k], report.fmt(c1[k]["ns"], 0), report.fmt(cm[k]["ns"], 0),
                         report.fmt(report.ratio(c1[k]["ns"], c1["parse"]["ns"]), 2),
                         report.fmt(report.ratio(cm[k]["ns"], cm["parse"]["ns"]), 2)])
    return ["### Issue 2 figures: one hot source with 1 and with ~1M sources in the map\n",
            report.table(["row", "ns, 1 source", "ns, 1M sources", "x floor (1)", "x floor (1M)"], rows), ""]


if __name__ == "__main__":
    sys.exit(main())
