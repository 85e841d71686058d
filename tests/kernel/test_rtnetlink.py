"""The agent's own rtnetlink requests (kernel/rtnetlink.py, used by
kernel/attach.py) against iproute2's view of the same link: the program id
and mode it reads are the ones `ip -j link show` reports, attach and
detach change what iproute2 sees, and a missing link gets a clear error."""

from __future__ import annotations

import os
import struct

import pytest

from tidegate.kernel import attach, bpfsys
from tidegate.kernel.errors import InterfaceError, KernelError
from tidegate.lab.veth import VethLab

BPF_PROG_TYPE_XDP = 6
XDP_PASS_PROGRAM = struct.pack("<BBhi", 0xB7, 0, 0, 2) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = XDP_PASS; exit


def iproute2_xdp(interface: str) -> tuple[int | None, str | None]:
    """(program id, mode) as `ip -j link show` reports them."""
    xdp = VethLab.link(None, interface).get("xdp")
    if not xdp:
        return None, None
    mode = {1: "native", 2: "generic"}.get(xdp.get("mode"))
    return xdp.get("prog", {}).get("id"), mode


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_attached_program_and_mode_match_iproute2_and_detach_clears_them(mode):
    tag = f"rn{mode[0]}{os.getpid() % 10000}"
    with VethLab(tag, subnet="10.211.7") as lab:
        ifindex = attach.interface_index(lab.host_if)
        assert ifindex == int(open(f"/sys/class/net/{lab.host_if}/ifindex").read())
        assert attach.attached_program(ifindex) == (None, None) == iproute2_xdp(lab.host_if)
        fd = bpfsys.prog_load(BPF_PROG_TYPE_XDP, XDP_PASS_PROGRAM, b"GPL", b"tg_rtnl_test")
        try:
            attach.set_program(ifindex, lab.host_if, fd, mode)
            prog_id = bpfsys.prog_info(fd).id
            assert attach.attached_program(ifindex) == (prog_id, mode) == iproute2_xdp(lab.host_if)
            with pytest.raises(KernelError, match="busy"):  # no replace asked: the kernel refuses (EBUSY)
                attach.set_program(ifindex, lab.host_if, fd, mode)
            attach.set_program(ifindex, lab.host_if, -1, mode)
            assert attach.attached_program(ifindex) == (None, None) == iproute2_xdp(lab.host_if)
        finally:
            os.close(fd)


@pytest.mark.kernel
def test_a_missing_link_gets_a_clear_error_and_reads_as_nothing_attached():
    with pytest.raises(InterfaceError, match="'tg-no-such-if' does not exist"):
        attach.interface_index("tg-no-such-if")
    gone = 2**31 - 7  # no link has this index
    assert attach.attached_program(gone) == (None, None)
    with pytest.raises(KernelError, match="detaching XDP .* failed: No such device"):
        attach.set_program(gone, "tg-gone", -1, "native")
