"""The flood bench's filters: each row's filter set up in the receiver namespace and torn down.

Used by veth_flood.py (its docstring lists the rows).
"""

from __future__ import annotations

import json
import os
import time

import report
from flood_rig import find_napi_thread, in_netns, sh
from packet_workload import discard, realistic_lists, realistic_rules
from tidegate.lab.veth import VethLab

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

# Debian's `iptables` is iptables-nft: it turns a hashlimit rule into an nft
# meter. iptables-legacy runs the xt_hashlimit match itself.
IPTABLES = {"iptables": "iptables", "iptables_legacy": "iptables-legacy"}


class Filters:
    """Set up and tear down each row's filter in the receiver namespace."""

    def __init__(self, lab: VethLab, args):
        self.lab = lab
        self.args = args
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
        allow, deny = realistic_lists()
        rules = realistic_rules(lim, pfx)
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
            discard(kf)
        self.kfs = {}
        for b, _ in self.bcc.values():
            try:
                b.cleanup()
            except Exception:
                pass
        self.bcc = {}
