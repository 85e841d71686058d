"""Bounded traffic generation for the lab, tests and benchmarks.

Frames are built once with struct (fast enough for ~0.3 Mpps from Python
over AF_PACKET) and sent from inside a network namespace the caller made:
`python -m tidegate.lab.traffic flood --iface IF --dst-mac MAC --dst-ip IP ...`.
Every run is bounded by a packet count and a time limit.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import time


def _checksum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def udp_frame(src_ip: str, dst_ip: str, dst_mac: str, dport: int, payload: int = 18,
              src_mac: str = "02:00:00:00:00:01", sport: int = 40000) -> bytes:
    """An Ethernet/IPv4/UDP frame with a valid IP checksum (UDP checksum 0)."""
    data = b"\x00" * payload
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
        socket.inet_aton(src_ip), socket.inet_aton(dst_ip),
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + ip + udp


def spoofed_sources(network: str, count: int, seed: int = 1) -> list[str]:
    """count source addresses spread over a network (distinct while it has room)."""
    net = ipaddress.ip_network(network)
    rnd = random.Random(seed)
    size = net.num_addresses
    base = int(net.network_address)
    if count <= size:
        picks = rnd.sample(range(size), count)
    else:
        picks = [rnd.randrange(size) for _ in range(count)]
    return [str(ipaddress.ip_address(base + p)) for p in picks]


def send_frames(iface: str, frames: list[bytes], pps: float = 0.0, time_limit: float = 30.0,
                repeat: int = 1) -> dict:
    """Send frames (cycled `repeat` times) on iface; pps 0 = as fast as possible."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((iface, 0))
    sent = errors = 0
    start = time.monotonic()
    deadline = start + time_limit
    gap = 1.0 / pps if pps > 0 else 0.0
    next_t = start
    try:
        for _ in range(repeat):
            for fr in frames:
                if gap:
                    now = time.monotonic()
                    if now < next_t:
                        time.sleep(next_t - now)
                    next_t += gap
                for attempt in range(200):
                    try:
                        s.send(fr)
                        sent += 1
                        break
                    except OSError:
                        # ENOBUFS/EAGAIN while the queue drains: wait a little
                        time.sleep(0.0001 * (attempt + 1))
                else:
                    errors += 1
                if (sent & 1023) == 0 and time.monotonic() > deadline:
                    raise TimeoutError
    except TimeoutError:
        pass
    finally:
        s.close()
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - start, 3)}


def send_sequential(iface: str, network: str, dst_ip: str, dst_mac: str, dport: int, count: int,
                    pps: float = 0.0, time_limit: float = 60.0, batch: int = 65536) -> dict:
    """`count` packets, each from the next address of `network`: millions
    of distinct spoofed sources, built and sent in bounded batches."""
    net = ipaddress.ip_network(network)
    base = int(net.network_address)
    size = net.num_addresses
    template = udp_frame("0.0.0.0", dst_ip, dst_mac, dport)
    head, ip, tail = template[:14], bytearray(template[14:34]), template[34:]
    sent = errors = 0
    start = time.monotonic()
    deadline = start + time_limit
    i = 0
    while i < count and time.monotonic() < deadline:
        frames = []
        for j in range(i, min(count, i + batch)):
            ip[12:16] = struct.pack("!I", base + (j % size))
            ip[10:12] = b"\0\0"
            ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
            frames.append(head + bytes(ip) + tail)
        r = send_frames(iface, frames, pps, max(0.1, deadline - time.monotonic()))
        sent += r["sent"]
        errors += r["errors"]
        i += len(frames)
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - start, 3)}


def send_pcap(iface: str, path: str, dst_mac: str, time_limit: float = 60.0) -> dict:
    """Send a capture live, paced by its own timestamps (the replay's twin)."""
    from tidegate.lab.replay import read_pcap

    packets = list(read_pcap(path))
    mac = mac_bytes(dst_mac)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((iface, 0))
    sent = late = 0
    t0 = packets[0][0] if packets else 0
    start = time.monotonic()
    try:
        for ts, frame in packets:
            due = start + (ts - t0) / 1e9
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.002:
                late += 1
            if now - start > time_limit:
                break
            for attempt in range(200):
                try:
                    s.send(mac + frame[6:])
                    sent += 1
                    break
                except OSError:
                    time.sleep(0.0001 * (attempt + 1))
    finally:
        s.close()
    return {"sent": sent, "late": late, "seconds": round(time.monotonic() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tidegate.lab.traffic", description=__doc__)
    p.add_argument("--iface", required=True)
    p.add_argument("--dst-mac", required=True)
    p.add_argument("--dst-ip", required=True)
    p.add_argument("--dport", type=int, default=9)
    p.add_argument("--src", help="one source address")
    p.add_argument("--src-net", help="spoof sources spread over this network")
    p.add_argument("--sources", type=int, default=1000, help="distinct spoofed sources")
    p.add_argument("--count", type=int, default=1000, help="packets to send in total")
    p.add_argument("--pps", type=float, default=0.0)
    p.add_argument("--time-limit", type=float, default=30.0)
    p.add_argument("--payload", type=int, default=18)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sequential", action="store_true",
                   help="with --src-net: every packet from the next address (distinct sources, built in batches)")
    p.add_argument("--pcap", help="send this capture's frames at their own relative timestamps "
                   "(destination MAC rewritten to --dst-mac)")
    a = p.parse_args(argv)

    def _stop(signum, frame):  # SIGTERM ends the run early but still reports
        raise TimeoutError

    signal.signal(signal.SIGTERM, _stop)
    if a.pcap:
        json.dump(send_pcap(a.iface, a.pcap, a.dst_mac, a.time_limit), sys.stdout)
        print()
        return 0
    if bool(a.src) == bool(a.src_net):
        p.error("give exactly one of --src or --src-net")
    if a.sequential:
        json.dump(send_sequential(a.iface, a.src_net, a.dst_ip, a.dst_mac, a.dport, a.count, a.pps, a.time_limit),
                  sys.stdout)  # fmt: skip
        print()
        return 0
    srcs = [a.src] if a.src else spoofed_sources(a.src_net, min(a.sources, a.count), a.seed)
    frames = [udp_frame(s, a.dst_ip, a.dst_mac, a.dport, a.payload) for s in srcs]
    repeat, rest = divmod(a.count, len(frames))
    result = {"sent": 0, "errors": 0, "seconds": 0.0}
    if repeat:
        result = send_frames(a.iface, frames, a.pps, a.time_limit, repeat)
    if rest and result["seconds"] < a.time_limit:
        r2 = send_frames(a.iface, frames[:rest], a.pps, a.time_limit - result["seconds"])
        result = {k: result[k] + r2[k] for k in result}
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
