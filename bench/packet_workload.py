"""The packet-path bench's workload: the frames, the sources of each case and the rule sets.

Used by packet_path.py (its docstring describes the cases and the rows) and by
the flood bench's filters (flood_filters.py: the realistic lists and rules).
"""

from __future__ import annotations

import ipaddress
import random
import sys

import report

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
# The order the 64k cycled sources come back in after the warm-up made their entries (in address
# order): run n shows source (n * VISIT_ORDER) mod 65536, a fixed permutation, so consecutive packets do
# not find their entries next to each other in memory. Why: packet_path.py's docstring.
VISIT_ORDER = 40503  # odd: a bijection on 0..mask; consecutive packets 40503 entries apart
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


def entry_pads() -> tuple[int, int]:
    """KEY_PAD and VAL_PAD, in 8-byte words, that give bench/ref/token_bucket.c's entries the size of
    tidegate's state entries (kernel/layout.py's tg_state_key and tg_src), so the row "token bucket,
    tidegate's entry size" follows the layout as it changes (it kept a 120-byte value after tg_src
    grew to 184 bytes). The reference's own key and value are 16 bytes each."""
    import ctypes

    from tidegate.kernel import layout

    key, value = ctypes.sizeof(layout.tg_state_key), ctypes.sizeof(layout.tg_src)
    if key % 8 or value % 8 or min(key, value) < 16:
        raise ValueError(f"state key {key} / value {value} bytes: not padding of 8-byte words over 16")
    return (key - 16) // 8, (value - 16) // 8


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
