"""Crafted frames for kernel tests, built with scapy so they read like packets."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.utils import wrpcap

DST4 = "10.0.0.1"
DST6 = "2001:db8::1"
# fixed addresses: scapy would otherwise look the MAC up (ARP, neighbour solicitation) on the host's network
ETH = {"dst": "02:00:00:00:00:01", "src": "02:00:00:00:00:02"}


def _l3(src: str):
    return IPv6(src=src, dst=DST6) if ":" in src else IP(src=src, dst=DST4)


def udp(src: str, dport: int = 53, payload: int = 10, vlans: int = 0) -> bytes:
    return _frame(_l3(src) / UDP(sport=40000, dport=dport) / (b"x" * payload), vlans)


def tcp(src: str, dport: int = 80, payload: int = 0, vlans: int = 0) -> bytes:
    return _frame(_l3(src) / TCP(sport=40000, dport=dport, flags="S") / (b"x" * payload), vlans)


def icmp(src: str) -> bytes:
    return bytes(Ether(**ETH) / IP(src=src, dst=DST4) / ICMP())


def arp() -> bytes:
    return bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.2", pdst="10.0.0.1"))


def fragment4(src: str, dport: int = 53, first: bool = True) -> bytes:
    ip = IP(src=src, dst=DST4, flags="MF", frag=0 if first else 100)
    return bytes(Ether(**ETH) / ip / UDP(sport=40000, dport=dport) / (b"x" * 16))


def ipv6_ext_chain(src: str, n: int, dport: int = 53) -> bytes:
    pkt = IPv6(src=src, dst=DST6)
    for i in range(n):
        pkt = pkt / (IPv6ExtHdrHopByHop() if i == 0 else IPv6ExtHdrDestOpt())
    return bytes(Ether(**ETH) / pkt / UDP(sport=40000, dport=dport) / b"x")


def ipv6_ext_tcp(src: str, n: int, dport: int = 22, mixed: bool = False, payload: int = 0) -> bytes:
    """TCP behind n IPv6 extension headers: destination options, or (mixed)
    hop-by-hop first, then routing (no segments left), atomic fragment,
    authentication (AH) and destination options in turn: every header a
    receiving stack walks through to the TCP header."""
    from scapy.layers.inet6 import IPv6ExtHdrRouting
    from scapy.layers.ipsec import AH

    kinds = [("hbh" if i == 0 else ("rt", "frag", "ah", "dst")[(i - 1) % 4]) if mixed else "dst" for i in range(n)]
    numbers = {"hbh": 0, "rt": 43, "frag": 44, "ah": 51, "dst": 60}
    pkt = IPv6(src=src, dst=DST6)
    for i, kind in enumerate(kinds):
        following = numbers[kinds[i + 1]] if i + 1 < n else 6
        pkt = pkt / {"hbh": IPv6ExtHdrHopByHop, "dst": IPv6ExtHdrDestOpt,
                     "rt": lambda: IPv6ExtHdrRouting(segleft=0),
                     "frag": lambda: IPv6ExtHdrFragment(offset=0, m=0),
                     # scapy fills in neither the next header nor the length of AH: 24 bytes = (4 + 2) * 4
                     "ah": lambda: AH(nh=following, payloadlen=4, spi=1, seq=1, icv=b"\0" * 12)}[kind]()  # fmt: skip
    return bytes(Ether(**ETH) / pkt / TCP(sport=40000, dport=dport, flags="S") / (b"x" * payload))


def ipv6_fragment(src: str, dport: int = 53, offset: int = 0) -> bytes:
    pkt = IPv6(src=src, dst=DST6) / IPv6ExtHdrFragment(offset=offset, m=1) / UDP(sport=1, dport=dport) / b"x"
    return bytes(Ether(**ETH) / pkt)


def _frame(l3, vlans: int) -> bytes:
    if vlans == 0:
        return bytes(Ether(**ETH) / l3)
    if vlans == 1:
        return bytes(Ether(**ETH) / Dot1Q(vlan=10) / l3)
    if vlans == 2:
        return bytes(Ether(type=0x88A8, **ETH) / Dot1AD(vlan=20) / Dot1Q(vlan=10) / l3)
    tags = Ether(type=0x88A8, **ETH)
    for _ in range(vlans - 1):
        tags = tags / Dot1AD(vlan=30)
    return bytes(tags / Dot1Q(vlan=10) / l3)


def write_capture(path, schedule, dst_ip: str = "192.0.2.200") -> int:
    """A pcap of 60-byte UDP frames: schedule = [(seconds, source, dport)],
    stamped from a fixed epoch so replay buckets follow those times."""
    pkts = []
    for t, src, dport in sorted(schedule):
        p = Ether(dst="02:00:00:00:00:02") / IP(src=src, dst=dst_ip) / UDP(sport=1000, dport=dport) / (b"x" * 18)
        p.time = 1_700_000_000 + t
        pkts.append(p)
    wrpcap(str(path), pkts)
    return len(pkts)


def random_ipv6_chain(rnd, src: str) -> bytes:
    """An IPv6 frame behind 0-2 VLAN tags with a random chain of 0-11
    extension headers (hop-by-hop, destination options, routing, fragments
    first or not, AH of several lengths) before TCP, UDP or ICMPv6; a third
    of them cut short at a random length, some with bytes past the fixed
    header overwritten at random."""
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6ExtHdrRouting
    from scapy.layers.ipsec import AH

    numbers = {"hbh": 0, "dst": 60, "rt": 43, "frag": 44, "ah": 51}
    kinds = [rnd.choice(list(numbers)) for _ in range(rnd.randint(0, 11))]
    l4, l4_number = rnd.choice([(TCP(dport=22), 6), (TCP(dport=443), 6), (UDP(dport=53), 17), (UDP(dport=99), 17),
                                (ICMPv6EchoRequest(), 58)])  # fmt: skip
    pkt = IPv6(src=src, dst=DST6)
    for i, kind in enumerate(kinds):
        nh = numbers[kinds[i + 1]] if i + 1 < len(kinds) else l4_number
        if kind == "ah":
            units = rnd.choice([1, 4, 6])
            pkt = pkt / AH(nh=nh, payloadlen=units, spi=1, seq=1, icv=b"\0" * max(0, (units + 2) * 4 - 12))
        else:
            pkt = pkt / {"hbh": lambda: IPv6ExtHdrHopByHop(nh=nh), "dst": lambda: IPv6ExtHdrDestOpt(nh=nh),
                         "rt": lambda: IPv6ExtHdrRouting(nh=nh, segleft=0),
                         "frag": lambda: IPv6ExtHdrFragment(nh=nh, offset=rnd.choice([0, 0, 1, 185]),
                                                            m=rnd.randint(0, 1))}[kind]()  # fmt: skip
    frame = bytearray(_frame(pkt / l4 / (b"x" * rnd.randint(0, 20)), rnd.randint(0, 2)))
    cut = rnd.random()
    if cut < 0.3:
        frame = frame[: rnd.randint(14, len(frame))]
    elif cut < 0.45:
        for _ in range(rnd.randint(1, 3)):
            frame[rnd.randint(min(62, len(frame) - 1), len(frame) - 1)] = rnd.randint(0, 255)
    return bytes(frame)
