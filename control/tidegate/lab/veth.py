"""A veth pair with one end in a network namespace: tidegate's test bed.

Used by `tidegate lab`, the kernel and end-to-end tests and the benchmarks.
Everything is created under names derived from one tag and removed by
those names, so a crashed run can be cleaned up with `VethLab(tag).remove()`.
Traffic only ever goes to the addresses configured here.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass
class VethLab:
    """host_if <-> peer_if (inside netns `ns`), 10.<net>.<sub>.1/24 and .2/24."""

    tag: str
    subnet: str = "10.200.1"

    @property
    def ns(self) -> str:
        return f"tg-{self.tag}"

    @property
    def host_if(self) -> str:
        return f"tg{self.tag}h"[:15]

    @property
    def peer_if(self) -> str:
        return f"tg{self.tag}p"[:15]

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def peer_ip(self) -> str:
        return f"{self.subnet}.2"

    def create(self) -> "VethLab":
        from pyroute2 import IPRoute, NetNS, netns

        self.remove()
        netns.create(self.ns)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_if, kind="veth", peer=self.peer_if)
                peer = ipr.link_lookup(ifname=self.peer_if)[0]
                ipr.link("set", index=peer, net_ns_fd=self.ns)
                host = ipr.link_lookup(ifname=self.host_if)[0]
                ipr.addr("add", index=host, address=self.host_ip, prefixlen=24)
                ipr.link("set", index=host, state="up")
            with NetNS(self.ns) as nsr:
                idx = nsr.link_lookup(ifname=self.peer_if)[0]
                nsr.addr("add", index=idx, address=self.peer_ip, prefixlen=24)
                nsr.link("set", index=idx, state="up")
                lo = nsr.link_lookup(ifname="lo")[0]
                nsr.link("set", index=lo, state="up")
            # IPv6 neighbour discovery would add frames nobody asked for
            for cmd in (
                ["sysctl", "-qw", f"net.ipv6.conf.{self.host_if}.disable_ipv6=1"],
                ["ip", "netns", "exec", self.ns, "sysctl", "-qw", f"net.ipv6.conf.{self.peer_if}.disable_ipv6=1"],
            ):
                subprocess.run(cmd, check=False, capture_output=True)
        except Exception:
            self.remove()
            raise
        return self

    def host_mac(self) -> str:
        with open(f"/sys/class/net/{self.host_if}/address") as f:
            return f.read().strip()

    def run_in_ns(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], **kw)

    def popen_in_ns(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)

    def remove(self) -> None:
        """Delete the veth pair and the namespace by name; missing is fine."""
        from pyroute2 import IPRoute, netns

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.host_if)
            if idx:
                ipr.link("del", index=idx[0])
        if self.ns in netns.listnetns():
            netns.remove(self.ns)

    def __enter__(self) -> "VethLab":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()


def unique_tag(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid() % 100000}"
