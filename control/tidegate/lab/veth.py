"""A veth pair with one end in a network namespace: tidegate's test bed.

Used by `tidegate lab`, the kernel and end-to-end tests and the benchmarks.
Everything is created under names derived from one tag and removed by
those names, so a crashed run can be cleaned up with `VethLab(tag).remove()`.
Traffic only ever goes to the addresses configured here.

By default the host end stays in the caller's namespace (where the agent
attaches); with `host_in_ns=True` it gets a namespace of its own too, so
nothing a benchmark sets up there (firewall rules, sysfs knobs) touches the
machine's own interfaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns

# where the `tidegate` package lives, for the sender run by a bare Python inside the namespace
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


@dataclass
class VethLab:
    """host_if (in the caller's namespace, or in host_ns) <-> peer_if (inside
    netns `ns`), <subnet>.1/24 and <subnet>.2/24."""

    tag: str
    subnet: str = "10.200.1"
    host_in_ns: bool = False

    def __post_init__(self):
        # the names follow from the tag (interface names are cut to the kernel's 15 characters);
        # the host end is in the caller's namespace unless host_in_ns
        self.ns = f"tg-{self.tag}"
        self.host_ns = f"tg-{self.tag}-h" if self.host_in_ns else None
        self.host_if, self.peer_if = f"tg{self.tag}h"[:15], f"tg{self.tag}p"[:15]
        self.host_ip, self.peer_ip = f"{self.subnet}.1", f"{self.subnet}.2"

    def create(self) -> "VethLab":
        self.remove()
        for ns in filter(None, (self.ns, self.host_ns)):
            netns.create(ns)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_if, kind="veth", peer=self.peer_if)
                ipr.link("set", index=ipr.link_lookup(ifname=self.peer_if)[0], net_ns_fd=self.ns)
                if self.host_ns:
                    ipr.link("set", index=ipr.link_lookup(ifname=self.host_if)[0], net_ns_fd=self.host_ns)
            self._configure(self.host_ns, self.host_if, self.host_ip)
            self._configure(self.ns, self.peer_if, self.peer_ip)
        except Exception:
            self.remove()
            raise
        return self

    @staticmethod
    def _configure(ns: str | None, ifname: str, address: str) -> None:
        # iproute2, not pyroute2's NetNS: that forks a child into the namespace,
        # which a caller's own SIGTERM handler (a benchmark's clean-up) can break
        ip = ["ip", *(["-n", ns] if ns else [])]
        run = [[*ip, "addr", "add", f"{address}/24", "dev", ifname], [*ip, "link", "set", ifname, "up"]]
        if ns:
            run.append([*ip, "link", "set", "lo", "up"])
        for argv in run:
            subprocess.run(argv, check=True, capture_output=True)
        # IPv6 neighbour discovery would add frames nobody asked for
        sysctl = ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"]
        subprocess.run(["ip", "netns", "exec", ns, *sysctl] if ns else sysctl, check=False, capture_output=True)

    def host_mac(self) -> str:
        if self.host_ns:
            return self.link(self.host_ns, self.host_if)["address"]
        with open(f"/sys/class/net/{self.host_if}/address") as f:
            return f.read().strip()

    def peer_mac(self) -> str:
        return self.link(self.ns, self.peer_if)["address"]

    @staticmethod
    def link(ns: str | None, ifname: str, stats: bool = False) -> dict:
        """What `ip -j [-s] [-n NS] link show IF` says about an interface (NS None: this namespace's)."""
        argv = ["ip", "-j", *(["-s"] if stats else []), *(["-n", ns] if ns else []), "link", "show", ifname]
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)[0]

    def run_in_ns(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], **kw)

    def popen_in_ns(self, argv: list[str], end_with_parent: bool = False, **kw) -> subprocess.Popen:
        """argv run inside the namespace. end_with_parent: it gets SIGTERM when this process dies, even
        by SIGKILL (setpriv sets PR_SET_PDEATHSIG, kept across the exec of ip and of argv): no
        preexec_fn, so Python starts it with vfork and runs nothing in the child, where a process with
        gRPC threads forked for a preexec_fn could abort (the lab's flood sender died with SIGABRT)."""
        prefix = ["setpriv", "--pdeathsig", "TERM"] if end_with_parent else []
        return subprocess.Popen([*prefix, "ip", "netns", "exec", self.ns, *argv], **kw)

    def sender_argv(self, *args: str) -> list[str]:
        """tidegate.lab.traffic aimed at the host end, to run inside the namespace (see sender)."""
        return [sys.executable, "-m", "tidegate.lab.traffic", "--iface", self.peer_if, "--dst-mac", self.host_mac(),
                "--dst-ip", self.host_ip, *args]  # fmt: skip

    def sender(self, *args: str, end_with_parent: bool = False, **popen_kw) -> subprocess.Popen:
        """Start the bounded traffic sender inside the namespace; `args` are its options."""
        env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
        return self.popen_in_ns(self.sender_argv(*args), end_with_parent, env=env, **popen_kw)

    def remove(self) -> None:
        """Delete the veth pair and the namespaces by name; missing is fine."""
        if not self.host_ns:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.host_if)
                if idx:
                    ipr.link("del", index=idx[0])
        existing = netns.listnetns()
        for ns in filter(None, (self.ns, self.host_ns)):
            if ns in existing:
                netns.remove(ns)

    def __enter__(self) -> "VethLab":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()

