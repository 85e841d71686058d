"""XDP on an interface, over netlink (pyroute2): which program is
attached and in which mode, attach (native, generic, or auto with a
fallback), replace in one step, and detach."""

from __future__ import annotations

import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tidegate.kernel.errors import InterfaceError, KernelError

log = logging.getLogger("tidegate.kernel.filter")

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# IFLA_XDP_ATTACHED: pyroute2 reports a number or (newer releases) a name
XDP_ATTACHED = {0: None, 1: "native", 2: "generic", 3: "offload", 4: "multi",
                "none": None, "xdp": "native", "drv": "native", "skb": "generic", "hw": "offload", "multi": "multi",
                "xdpdrv": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}  # fmt: skip
XDP_MODES = ("auto", "native", "generic")


def interface_index(interface: str) -> int:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=interface)
    if not idx:
        raise InterfaceError(f"interface {interface!r} does not exist (see `ip link`)")
    return idx[0]


def attached_program(ifindex: int | None) -> tuple[int | None, str | None]:
    """(program id, mode) of the XDP program on the interface, or (None, None)."""
    if ifindex is None:
        return None, None
    try:
        with IPRoute() as ipr:
            link = ipr.get_links(ifindex)[0]
    except NetlinkError:
        return None, None  # the interface is gone (deleted, or recreated with a new index)
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return None, None
    raw = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
    mode = XDP_ATTACHED.get(raw.lower() if isinstance(raw, str) else raw)
    if mode is None and xdp.get_attr("IFLA_XDP_PROG_ID"):
        # an unknown name for the mode: tell it by which prog-id attribute is set
        mode = "multi"
    if mode == "multi":
        mode = "native" if xdp.get_attr("IFLA_XDP_DRV_PROG_ID") else "generic"
    pid = xdp.get_attr("IFLA_XDP_PROG_ID")
    if not pid:
        pid = xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or xdp.get_attr("IFLA_XDP_SKB_PROG_ID")
    return (pid or None), mode


def set_program(ifindex: int, interface: str | None, fd: int, mode: str | None, replace: bool = False) -> None:
    """Attach (fd >= 0) or detach (fd -1) over netlink; with replace the
    kernel swaps the attached program for this one in one step."""
    flags = XDP_FLAGS_SKB_MODE if mode == "generic" else XDP_FLAGS_DRV_MODE
    if not replace and fd >= 0:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})
    except NetlinkError as e:
        what = "attaching" if fd >= 0 else "detaching"
        raise KernelError(f"{what} XDP ({mode}) {'to' if fd >= 0 else 'from'} {interface} failed: "
                          f"{os.strerror(e.code)}") from e  # fmt: skip


def attach_in_mode(ifindex: int, interface: str | None, fd: int, want: str) -> str:
    """Attach in mode `want` (auto: native, else generic); returns the mode in use."""
    if want == "auto":
        try:
            set_program(ifindex, interface, fd, "native")
            return "native"
        except KernelError as e:
            log.warning("native XDP failed, falling back to generic: %s", e)
            set_program(ifindex, interface, fd, "generic")
            return "generic"
    if want not in XDP_MODES:
        raise KernelError(f"xdp mode must be auto, native or generic, not {want!r}")
    set_program(ifindex, interface, fd, want)
    return want
