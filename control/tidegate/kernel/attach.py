"""XDP on an interface, over rtnetlink (rtnetlink.py): which program is
attached and in which mode, attach (native, generic, or auto with a
fallback), replace in one step, and detach."""

from __future__ import annotations

import logging
import socket

from tidegate.kernel import rtnetlink
from tidegate.kernel.errors import InterfaceError, KernelError

log = logging.getLogger("tidegate.kernel.filter")

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# IFLA_XDP_ATTACHED (XDP_ATTACHED_* in <linux/if_link.h>)
XDP_ATTACHED = {0: None, 1: "native", 2: "generic", 3: "offload", 4: "multi"}
XDP_MODES = ("auto", "native", "generic")


def interface_index(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except (OSError, ValueError):
        raise InterfaceError(f"interface {interface!r} does not exist (see `ip link`)") from None


def attached_program(ifindex: int | None) -> tuple[int | None, str | None]:
    """(program id, mode) of the XDP program on the interface, or (None, None)."""
    if ifindex is None:
        return None, None
    try:
        xdp = rtnetlink.link_xdp(ifindex)
    except rtnetlink.NetlinkError:
        return None, None
    if not xdp:
        return None, None  # no such link (deleted, or recreated with a new index), or no XDP attributes
    raw = xdp.get(rtnetlink.XDP_ATTACHED, b"\0")[0]
    mode = XDP_ATTACHED.get(raw, "multi" if rtnetlink.u32(xdp.get(rtnetlink.XDP_PROG_ID)) else None)
    if mode == "multi":
        mode = "native" if rtnetlink.u32(xdp.get(rtnetlink.XDP_DRV_PROG_ID)) else "generic"
    pid = rtnetlink.u32(xdp.get(rtnetlink.XDP_PROG_ID))
    if not pid:
        pid = rtnetlink.u32(xdp.get(rtnetlink.XDP_DRV_PROG_ID)) or rtnetlink.u32(xdp.get(rtnetlink.XDP_SKB_PROG_ID))
    return (pid or None), mode


def set_program(ifindex: int, interface: str | None, fd: int, mode: str | None, replace: bool = False) -> None:
    """Attach (fd >= 0) or detach (fd -1) over netlink; with replace the
    kernel swaps the attached program for this one in one step."""
    flags = XDP_FLAGS_SKB_MODE if mode == "generic" else XDP_FLAGS_DRV_MODE
    if not replace and fd >= 0:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    try:
        rtnetlink.set_link_xdp(ifindex, fd, flags)
    except rtnetlink.NetlinkError as e:
        what = "attaching" if fd >= 0 else "detaching"
        raise KernelError(f"{what} XDP ({mode}) {'to' if fd >= 0 else 'from'} {interface} failed: "
                          f"{e.strerror}") from e  # fmt: skip


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
