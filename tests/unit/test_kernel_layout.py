"""The rule-set -> kernel entries translation, checked without a kernel.

A reference matcher written the slow, obvious way (scan rules in order)
must agree, for many addresses, with what the program would decide on the
bytes the kernel layer writes into its maps, decoded here independently."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from fixtures import rule_set
from tidegate.kernel import entries as ke
from tidegate.kernel import filter as kernel
from tidegate.kernel import layout as kl
from tidegate.observation import metrics
from tidegate.ruleset.parse import parse_rule_set
from tidegate.safety import guard as safety

RULES = rule_set("layout")


SLOT = 1


def kernel_entries(krs: ke.KernelRuleSet) -> dict:
    """What the program's maps will hold for one slot, decoded from the raw
    bytes the kernel layer writes (bpf/layout.h: tg_cidr4_key, tg_cidr6_key,
    tg_cidr_val, TG_PORT_IDX) with nothing but struct and ipaddress: no
    helper of the module under test interprets them."""
    v4, v6 = ke.kernel_trie_entries(krs, SLOT)
    tries = {4: [], 6: []}
    for fam, entries in ((4, v4), (6, v6)):
        for key, val in entries.items():
            plen, slot = struct.unpack_from("<II", key)
            assert slot == SLOT
            raw = key[8:]
            net = (ipaddress.IPv4Network if fam == 4 else ipaddress.IPv6Network)((raw, plen - 32))
            mask, flags, _ = struct.unpack("<QII", val)
            tries[fam].append((net, mask, flags))
    ports = {}
    for idx, mask in ke.kernel_port_entries(krs).items():
        ports[(17 if idx >> 16 else 6, idx & 0xFFFF)] = mask
    return {"tries": tries, "ports": ports}


def lookup(krs: ke.KernelRuleSet, entries: dict, addr: str, proto: int, port: int | None):
    """What the XDP program does (bpf/rules.h tg_classify) on those entries:
    the longest prefix of the packet's own family, the allow and deny flags,
    the rule masks of source and (protocol, port), the lowest bit."""
    a = ipaddress.ip_address(addr)
    best = None
    for net, mask, flags in entries["tries"][a.version]:
        if a in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, mask, flags)
    src_mask = krs.any_src_mask
    if best:
        if best[2] & 1:  # TG_CF_ALLOW
            return "allow"
        if best[2] & 2:  # TG_CF_DENY
            return "deny"
        src_mask |= best[1]
    port_mask = krs.proto_mask[proto]
    if port is not None and entries["ports"].get((proto, port)):
        port_mask = entries["ports"][(proto, port)]
    m = src_mask & port_mask
    if not m:
        return "default"
    return krs.rule_names[next(i for i in range(64) if m >> i & 1)]


def reference(rs, addr: str, proto: int, port: int | None):
    """The rule set's meaning, written the obvious way."""
    a = ipaddress.ip_address(addr)
    if any(a in n for n in rs.allow if n.version == a.version):
        return "allow"
    if any(a in n for n in rs.deny if n.version == a.version):
        return "deny"
    names = {"tcp": {6}, "udp": {17}, "icmp": {1}, "icmpv6": {58}, "any": set(range(256))}
    for rule in rs.rules:
        if rule.sources and not any(a in n for n in rule.sources if n.version == a.version):
            continue
        if proto not in names[rule.protocol]:
            continue
        if rule.dst_ports:
            if proto not in (6, 17) or port is None or not any(p.lo <= port <= p.hi for p in rule.dst_ports):
                continue
        return rule.name
    return "default"


def test_precomputed_masks_agree_with_reference():
    rs = parse_rule_set(RULES, "t")
    krs = ke.build_kernel_rule_set(rs)
    entries = kernel_entries(krs)
    rnd = random.Random(7)
    addrs = [
        "10.1.2.3", "10.1.5.9", "192.0.2.1", "198.51.100.9", "198.51.7.7", "203.0.113.1",
        "2001:db8:1::1", "2001:db8:2::5", "2001:db8:3::1", "8.8.8.8", "::ffff:198.51.100.9", "::ffff:10.1.2.3",
        "198.51.100.0", "198.51.100.255", "198.51.101.0", "198.50.255.255", "10.1.5.0", "10.1.4.255",
    ] + [str(ipaddress.IPv4Address(rnd.getrandbits(32))) for _ in range(200)] + [
        str(ipaddress.IPv6Address(rnd.getrandbits(128))) for _ in range(50)]  # fmt: skip
    for addr in addrs:
        for proto, port in ((17, 53), (17, 61), (6, 53), (6, 80), (1, None), (58, None), (47, None)):
            assert lookup(krs, entries, addr, proto, port) == reference(rs, addr, proto, port), (addr, proto, port)


def test_ipv6_default_route_does_not_cover_ipv4():
    rs = parse_rule_set(RULES, "t")
    krs = ke.build_kernel_rule_set(rs)
    entries = kernel_entries(krs)
    # deny ::/0 denies every IPv6 source, v4-mapped ones on the wire included, but no IPv4 one
    assert lookup(krs, entries, "2001:db8:9::1", 17, 53) == "deny"
    assert lookup(krs, entries, "::ffff:203.0.113.1", 17, 53) == "deny"
    assert lookup(krs, entries, "203.0.113.1", 17, 53) == "default"
    assert lookup(krs, entries, "203.0.113.1", 6, 53) == "c"
    denied4 = [n for n in rs.deny if n.version == 4]
    assert all(any(net.subnet_of(d) for d in denied4) for net, _, flags in entries["tries"][4] if flags & 2)


def test_masks_and_buckets():
    assert kl.mask_halves(128) == kl.Mask(2**64 - 1, 2**64 - 1)
    assert kl.mask_halves(0) == kl.Mask(0, 0)
    # /120 in IPv4 terms is /24: the last byte is cleared
    m = kl.mask_halves(96 + 24)
    assert m.hi == 2**64 - 1 and m.lo == 0x00FFFFFFFFFFFFFF
    b = ke.bucket_params(pps=100, burst=10, bps=8000, burst_bytes=None)
    assert b.rate == 100 and b.burst == 10 * kl.UNIT and b.fill_ns == 100_000_000
    assert b.brate == 1000 and b.bburst == 1000 * kl.UNIT


@pytest.mark.parametrize("n", [1, 64])
def test_rule_bits(n):
    rules = "\n".join(
        f"  - name: r{i}\n    protocol: udp\n    dst_ports: [{1000 + i}]\n    limit: {{pps: 1, burst: 1}}" for i in range(n)
    )
    rs = parse_rule_set(f"rules:\n{rules}\n", "t")
    krs = ke.build_kernel_rule_set(rs)
    assert krs.ports[(17, 1000 + n - 1)] == 1 << (n - 1)
    assert krs.flags == kl.SET_HAS_PORTS


# ---------------------------------- one copy of the contract (test_layout_contract.py ties it to layout.h)
def test_other_modules_use_the_layouts_drop_reasons():
    assert set(kl.DROP_REASONS) == {"deny", "rate", "prefix", "blocked", "ipv6-ext-drop"}
    assert safety.DROP_REASONS is kl.DROP_REASONS and metrics.DROP_REASONS is kl.DROP_REASONS
    c = kernel.Counters({r: (i + 1, 0) for i, r in enumerate(kl.REASONS)}, {}, {}, 0, 0)
    assert c.dropped == sum(kl.REASONS.index(r) + 1 for r in kl.DROP_REASONS)


@pytest.mark.parametrize("policy, action, flag", [(None, kl.ACT_DROP, 0), ("drop", kl.ACT_DROP, 0),
                                                  ("pass", kl.ACT_PASS, 0),
                                                  ("default", kl.ACT_PASS, kl.SET_EXT_DEFAULT)])  # fmt: skip
def test_the_ipv6_extension_policy_reaches_the_kernel_entries(policy, action, flag):
    text = "defaults:\n  limit: {pps: 10, burst: 10}\n" + (f"  ipv6_unparsed_extensions: {policy}\n" if policy else "")
    krs = ke.build_kernel_rule_set(parse_rule_set(text + "rules: []\n"))
    assert krs.rules[kl.RULE_EXTHDR].action == action and krs.flags & kl.SET_EXT_DEFAULT == flag
    assert krs.rule_names[kl.RULE_EXTHDR] == "ipv6-ext"
