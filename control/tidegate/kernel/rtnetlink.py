"""The two rtnetlink requests XDP needs, spoken directly on a NETLINK_ROUTE
socket: read one link's XDP attributes (RTM_GETLINK) and set its XDP
program (RTM_SETLINK with IFLA_XDP). The agent needs nothing else from
netlink; a general netlink library costs most of its start-up imports and
leaves objects in reference cycles at every query.

Messages: nlmsghdr, ifinfomsg, then attributes (length, type, payload padded
to 4 bytes), as in <linux/netlink.h> and <linux/rtnetlink.h>."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_SETLINK = 19
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
IFLA_XDP = 43
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3

# IFLA_XDP_* (nested in IFLA_XDP)
XDP_FD, XDP_ATTACHED, XDP_FLAGS, XDP_PROG_ID, XDP_DRV_PROG_ID, XDP_SKB_PROG_ID = 1, 2, 3, 4, 5, 6

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), device type, index, flags, change mask
_NLATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")
_sequence = itertools.count(1)


class NetlinkError(OSError):
    """The kernel refused the request (errno in .errno)."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def attribute(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def attributes(data: bytes) -> dict[int, bytes]:
    """Type (flags masked off) -> payload, one level."""
    out, pos = {}, 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size:
            break
        out[kind & NLA_TYPE_MASK] = data[pos + _NLATTR.size : pos + length]
        pos += _align(length)
    return out


def _request(kind: int, flags: int, ifindex: int, attrs: bytes) -> list[tuple[int, bytes]]:
    """Send one request, return the replies (type, body) up to the ACK or the
    answer; an error reply raises NetlinkError."""
    seq = next(_sequence)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0) + attrs
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.sendto(msg, (0, 0))
        replies: list[tuple[int, bytes]] = []
        while True:
            data = s.recv(65536)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, mseq, _port = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, "malformed netlink reply")
                part = data[pos + _NLMSGHDR.size : pos + length]
                pos += _align(length)
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (code,) = _ERRNO.unpack_from(part)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return replies  # the ACK
                if mtype == NLMSG_DONE:
                    return replies
                replies.append((mtype, part))
                if not flags & NLM_F_ACK:
                    return replies  # a plain GET answers with one message


def link_xdp(ifindex: int) -> dict[int, bytes] | None:
    """The IFLA_XDP attributes of the link (IFLA_XDP_* -> payload), {} when
    the link reports none, None when there is no such link."""
    mask = attribute(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
    try:
        replies = _request(RTM_GETLINK, 0, ifindex, mask)
    except NetlinkError as e:
        if e.errno == errno.ENODEV:
            return None
        raise
    for mtype, body in replies:
        if mtype == RTM_NEWLINK:
            xdp = attributes(body[_IFINFOMSG.size :]).get(IFLA_XDP)
            return {} if xdp is None else attributes(xdp)
    return None


def u32(payload: bytes | None) -> int:
    return struct.unpack_from("=I", payload)[0] if payload and len(payload) >= 4 else 0


def set_link_xdp(ifindex: int, fd: int, flags: int) -> None:
    """Attach program fd (or detach with fd -1) with IFLA_XDP_FLAGS."""
    nested = attribute(XDP_FD, struct.pack("=i", fd)) + attribute(XDP_FLAGS, struct.pack("=I", flags))
    _request(RTM_SETLINK, NLM_F_ACK, ifindex, attribute(IFLA_XDP | NLA_F_NESTED, nested))
