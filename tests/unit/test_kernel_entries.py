"""Every field a rule-set slot gets from the kernel layer's compilation,
against values worked out independently (ipaddress for masks and
containment, the README for limits): masks, address halves, buckets, rule
parameters and flags, the per-protocol and per-port rule masks, the trie
entries and their inheritance, and the matching used by the estimate."""

from __future__ import annotations

import ipaddress
import math
import random

import pytest

from fixtures import rule_set
from tidegate.kernel import entries as ke
from tidegate.kernel import layout as kl
from tidegate.ruleset.model import Limit, PrefixLimit
from tidegate.ruleset.parse import parse_rule_set

G = 1_000_000_000


def halves(packed: bytes) -> kl.Mask:
    return kl.Mask(int.from_bytes(packed[:8], "little"), int.from_bytes(packed[8:], "little"))


def unified(net) -> ipaddress.IPv6Network:
    """A network in the 128-bit space the kernel layer uses: IPv4 as ::ffff:a.b.c.d."""
    if net.version == 6:
        return net
    return ipaddress.IPv6Network((int(ipaddress.IPv6Address(f"::ffff:{net.network_address}")), 96 + net.prefixlen))


def test_masks_and_address_halves():
    for plen in range(129):
        assert kl.mask_halves(plen) == halves(ipaddress.IPv6Network(("::", plen)).netmask.packed), plen
    rnd = random.Random(3)
    for _ in range(200):
        a = ipaddress.IPv6Address(rnd.getrandbits(128))
        assert kl.addr_halves(int(a)) == tuple(halves(a.packed).__dict__.values())
        assert kl.halves_to_address(*kl.addr_halves(int(a))) == a
    v4 = ipaddress.IPv4Address("198.51.100.7")
    assert kl.halves_to_address(*kl.addr_halves(int(ipaddress.IPv6Address(f"::ffff:{v4}")))) == v4
    assert kl.halves_to_address(*kl.addr_halves(int(ipaddress.IPv6Address("::ffff:0.0.0.0")))) == (
        ipaddress.IPv4Address("0.0.0.0"))


def test_network_keys_and_containment():
    rnd = random.Random(5)
    nets = [ipaddress.ip_network(n) for n in ("0.0.0.0/0", "::/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32",
                                              "::ffff:0:0/96", "2001:db8::/32", "2001:db8:1::/48", "::/1")]  # fmt: skip
    for _ in range(150):
        if rnd.random() < 0.5:
            nets.append(ipaddress.IPv4Network((rnd.getrandbits(32), rnd.randint(0, 32)), strict=False))
        else:
            nets.append(ipaddress.IPv6Network((rnd.getrandbits(128), rnd.randint(0, 128)), strict=False))
    for n in nets:
        u = unified(n)
        assert kl.network_key(n) == (int(u.network_address), u.prefixlen)
    for a in nets:
        for b in nets:
            ua, ub = unified(a), unified(b)
            assert ke._contains(kl.network_key(a), kl.network_key(b)) == ub.subnet_of(ua), (a, b)


def test_bucket_parameters():
    assert ke.bucket_params(100, 10, None, None) == ke.BucketParams(100, 10 * G, 10**8, 0, 0, 0)
    assert ke.bucket_params(3, 1, None, None).fill_ns == math.ceil(G / 3) == 333_333_334
    # bits to bytes, rounded down; the byte burst defaults to one second of the byte rate
    assert ke.bucket_params(100, 10, 8000, None) == ke.BucketParams(100, 10 * G, 10**8, 1000, 1000 * G, G)
    assert ke.bucket_params(100, 10, 8007, None).brate == 1000
    b = ke.bucket_params(100, 10, 80_000, 5000)
    assert (b.brate, b.bburst, b.bfill_ns) == (10_000, 5000 * G, math.ceil(5000 * G / 10_000))
    b = ke.bucket_params(100, 10, 12, None)  # less than a byte a second still refills
    assert (b.brate, b.bburst, b.bfill_ns) == (1, G, G)
    b = ke.bucket_params(100, 10, 24_000, None)
    assert (b.brate, b.bburst, b.bfill_ns) == (3000, 3000 * G, G)
    b = ke.bucket_params(7, 3, 10**12, 10**10)  # the byte burst is capped so burst * UNIT fits in 64 bits
    assert b.bburst == ke.MAX_BYTE_BURST * G < 2**64 and b.bfill_ns == math.ceil(ke.MAX_BYTE_BURST * G / (10**12 // 8))


def test_rule_parameters():
    limit = Limit(100, 200)
    assert ke.rule_params("r", "drop", limit, None, 5) == ke.RuleParams("r", kl.ACT_DROP)
    assert ke.rule_params("r", "pass", limit, None, 5) == ke.RuleParams("r", kl.ACT_PASS)
    assert ke.rule_params("r", "limit", None, None, 5) == ke.RuleParams("r", kl.ACT_PASS)
    p = ke.rule_params("web", "limit", limit, None, 10)
    assert p == ke.RuleParams("web", kl.ACT_LIMIT, kl.RF_PKT, 10 * G, ke.bucket_params(100, 200, None, None))
    p = ke.rule_params("web", "limit", Limit(100, 200, 8000, 1000), None, 0)
    assert (p.flags, p.block_ns, p.src.brate) == (kl.RF_PKT | kl.RF_BYTES, 0, 1000)
    pl = PrefixLimit(24, 48, Limit(50, 60, 16_000, None))
    p = ke.rule_params("web", "limit", limit, pl, 1)
    assert p.flags == kl.RF_PKT | kl.RF_PREFIX | kl.RF_PFX_BYTES and p.block_ns == G
    assert p.pfx == ke.bucket_params(50, 60, 16_000, None)
    assert p.pfx4 == halves(ipaddress.IPv6Network(("::", 96 + 24)).netmask.packed)
    assert p.pfx6 == halves(ipaddress.IPv6Network(("::", 48)).netmask.packed)
    p = ke.rule_params("web", "limit", limit, PrefixLimit(0, 0, Limit(5, 5)), 0)
    assert p.flags == kl.RF_PKT | kl.RF_PREFIX
    assert p.pfx4 == halves(ipaddress.IPv6Network(("::", 96)).netmask.packed) and p.pfx6 == kl.Mask(0, 0)
    assert ke.rule_params("web", "limit", limit, None, 0).pfx4 == kl.Mask(0, 0) == ke.RuleParams("x").pfx6


def test_any_source():
    n = ipaddress.ip_network
    assert ke._is_any_source(()) is True
    assert ke._is_any_source((n("0.0.0.0/0"), n("::/0"))) is True
    assert ke._is_any_source((n("0.0.0.0/0"), n("::/0"), n("10.0.0.0/8"))) is True
    assert ke._is_any_source((n("0.0.0.0/0"),)) is False
    assert ke._is_any_source((n("::/0"), n("10.0.0.0/8"))) is False
    assert ke._is_any_source((n("0.0.0.0/1"), n("::/0"))) is False


RULES = rule_set("entries")


def test_a_rule_set_compiles_to_exactly_these_entries():
    rs = parse_rule_set(RULES, "t")
    krs = ke._build_kernel_rule_set(rs)
    dns, web, ping, six, all_ = (1 << i for i in range(5))
    assert krs.rule_names == {0: "dns", 1: "web", 2: "ping", 3: "six", 4: "all", 64: "default", 65: "deny-list",
                              66: "allow-list", 67: "ipv6-ext"}  # fmt: skip
    assert krs.flags == kl.SET_HAS_TRIE | kl.SET_HAS_PORTS
    assert krs.any_src_mask == ping | six | all_
    assert krs.key4 == kl.mask_halves(96 + 24) and krs.key6 == kl.mask_halves(56)
    expected_proto = [all_] * 256
    expected_proto[1] |= ping
    expected_proto[58] |= six
    assert krs.proto_mask == expected_proto
    assert krs.ports == {(17, 53): dns | web | all_, (17, 60): dns | all_, (17, 61): dns | all_,
                         (6, 53): web | all_}  # fmt: skip
    key = lambda s: kl.network_key(ipaddress.ip_network(s))  # noqa: E731
    assert krs.cidrs == {
        key("10.1.0.0/16"): (web, kl.CF_ALLOW),  # allowed, and a source of web
        key("10.9.0.0/16"): (dns, kl.CF_DENY),  # denied, and a source of dns
        key("192.0.2.0/24"): (0, kl.CF_DENY),
        key("198.51.100.0/24"): (dns | web, 0),  # the sources of two rules
    }
    pfx = PrefixLimit(16, 40, Limit(900, 950))
    assert krs.rules == {
        0: ke.rule_params("dns", "limit", Limit(10, 20), pfx, 0),
        1: ke.rule_params("web", "limit", Limit(1000, 2000), pfx, 0),
        2: ke.rule_params("ping", "limit", Limit(1000, 2000), pfx, 0),
        3: ke.RuleParams("six", kl.ACT_DROP),
        4: ke.RuleParams("all", kl.ACT_PASS),
        64: ke.RuleParams("default", kl.ACT_LIMIT, kl.RF_PKT | kl.RF_PREFIX, 7 * G, ke.bucket_params(1000, 2000, None, None),
                          ke.bucket_params(900, 950, None, None), kl.mask_halves(96 + 16), kl.mask_halves(40)),
        65: ke.RuleParams("deny-list", kl.ACT_DROP),
        66: ke.RuleParams("allow-list", kl.ACT_PASS),
        67: ke.RuleParams("ipv6-ext", kl.ACT_DROP),  # defaults.ipv6_unparsed_extensions: drop
    }  # fmt: skip
    assert krs.rules[0].flags == kl.RF_PKT | kl.RF_PREFIX


def test_sets_without_lists_or_ports_have_no_trie_or_port_flags():
    krs = ke._build_kernel_rule_set(parse_rule_set("defaults: {limit: {pps: 1, burst: 1}}\nrules: []\n", "t"))
    assert (krs.flags, krs.cidrs, krs.ports, krs.any_src_mask) == (0, {}, {}, 0)
    krs = ke._build_kernel_rule_set(parse_rule_set("deny: ['192.0.2.0/24']\nrules: []\n", "t"))
    assert krs.flags == kl.SET_HAS_TRIE
    krs = ke._build_kernel_rule_set(parse_rule_set("rules: [{name: a, protocol: tcp, dst_ports: [1], action: drop}]",
                                                   "t"))  # fmt: skip
    assert krs.flags == kl.SET_HAS_PORTS and krs.rules[64] == ke.RuleParams("default", kl.ACT_PASS)


def test_inheritance_and_the_ipv4_barrier():
    key = lambda s: kl.network_key(ipaddress.ip_network(s))  # noqa: E731
    barrier = (0xFFFF << 32, 96)
    # an IPv6 prefix over the IPv4 part of the space gets a barrier entry: IPv4 entries do not inherit from it
    krs = ke._build_kernel_rule_set(parse_rule_set("deny: ['::/0']\nallow: ['10.0.0.0/8']\nrules: []\n", "t"))
    assert krs.cidrs == {key("::/0"): (0, kl.CF_DENY), barrier: (0, 0), key("10.0.0.0/8"): (0, kl.CF_ALLOW)}
    # without one, no barrier; and nested IPv4 entries inherit everything above them
    text = """rules:
  - {name: a, sources: ['10.0.0.0/8'], action: drop}
  - {name: b, sources: ['10.1.0.0/16'], action: drop}
  - {name: c, sources: ['10.1.2.0/24', '2001:db8::/32'], action: drop}
"""
    krs = ke._build_kernel_rule_set(parse_rule_set(text, "t"))
    assert krs.cidrs == {key("10.0.0.0/8"): (1, 0), key("10.1.0.0/16"): (3, 0), key("10.1.2.0/24"): (7, 0),
                         key("2001:db8::/32"): (4, 0)}  # fmt: skip
    # ::ffff:0:0/96 itself is the IPv4 part: IPv4 entries inside it inherit from it
    text = "deny: ['10.0.0.0/8']\nrules: [{name: a, sources: ['::ffff:0:0/96'], action: drop}]\n"
    krs = ke._build_kernel_rule_set(parse_rule_set(text, "t"))
    assert krs.cidrs == {barrier: (1, 0), key("10.0.0.0/8"): (1, kl.CF_DENY)}
    # an IPv6 prefix that only contains the barrier's part of the space: kept out of IPv4 too
    text = "rules: [{name: a, sources: ['::/64'], action: drop}, {name: b, sources: ['10.0.0.0/8'], action: drop}]\n"
    krs = ke._build_kernel_rule_set(parse_rule_set(text, "t"))
    assert krs.cidrs[key("10.0.0.0/8")] == (2, 0) and krs.cidrs[barrier] == (0, 0)
    # an IPv6 prefix shorter than /96 that sorts before the IPv4 part without containing it: no barrier
    text = "rules: [{name: a, sources: ['::100:0:0/88'], action: drop}, {name: b, sources: ['10.0.0.0/8'], action: drop}]"
    krs = ke._build_kernel_rule_set(parse_rule_set(text + "\n", "t"))
    assert krs.cidrs == {key("::100:0:0/88"): (1, 0), key("10.0.0.0/8"): (2, 0)}
    # an entry at the very last address of a prefix is inside it, and one just past it is not
    text = """rules:
  - {name: a, sources: ['10.0.0.0/8'], action: drop}
  - {name: b, sources: ['10.255.255.255/32', '11.0.0.0/32', '10.255.255.254/31'], action: drop}
"""
    krs = ke._build_kernel_rule_set(parse_rule_set(text, "t"))
    assert krs.cidrs == {key("10.0.0.0/8"): (1, 0), key("10.255.255.254/31"): (3, 0), key("10.255.255.255/32"): (3, 0),
                         key("11.0.0.0/32"): (2, 0)}  # fmt: skip


def test_trie_and_port_entries_as_bytes():
    rs = parse_rule_set(RULES + "canaries: ['192.0.2.7']\n", "t")
    krs = ke._build_kernel_rule_set(rs)
    v4, v6 = ke.kernel_trie_entries(krs, 2)
    assert len(v4) == len(krs.cidrs) and v6 == {}
    k = (32 + 24).to_bytes(4, "little") + (2).to_bytes(4, "little") + bytes([192, 0, 2, 0])
    assert v4[k] == (0).to_bytes(8, "little") + kl.CF_DENY.to_bytes(4, "little") + bytes(4)
    krs = ke._build_kernel_rule_set(parse_rule_set("deny: ['::/0', '2001:db8::/32']\nrules: []\n", "t"))
    v4, v6 = ke.kernel_trie_entries(krs, 1)
    assert v4 == {}, "the barrier alone (no rule, no flag) is not written"
    k = (32 + 32).to_bytes(4, "little") + (1).to_bytes(4, "little") + ipaddress.IPv6Address("2001:db8::").packed
    assert v6[k] == bytes(8) + kl.CF_DENY.to_bytes(4, "little") + bytes(4) and len(v6) == 2
    krs = ke._build_kernel_rule_set(parse_rule_set("rules: [{name: a, sources: ['::/0'], action: drop}]\n", "t"))
    v4, v6 = ke.kernel_trie_entries(krs, 0)
    assert v4 == {} and len(v6) == 1
    # prefixes of /96 and longer outside ::ffff:0:0/96 are IPv6 entries
    krs = ke._build_kernel_rule_set(parse_rule_set("deny: ['2001:db8::/112', '::/96']\nrules: []\n", "t"))
    v4, v6 = ke.kernel_trie_entries(krs, 0)
    assert v4 == {} and len(v6) == 2
    krs = ke._build_kernel_rule_set(parse_rule_set(
        "rules: [{name: a, sources: ['::ffff:0:0/96'], action: drop}]\n", "t"))  # fmt: skip
    v4, _ = ke.kernel_trie_entries(krs, 0)
    assert v4 == {(32).to_bytes(4, "little") + bytes(8): (1).to_bytes(8, "little") + bytes(8)}, "barrier with a rule"
    krs = ke._build_kernel_rule_set(parse_rule_set(RULES, "t"))
    assert ke.kernel_port_entries(krs) == {(1 << 16) | 53: 0b10011, (1 << 16) | 60: 0b10001,
                                           (1 << 16) | 61: 0b10001, 53: 0b10010}  # fmt: skip


def test_the_kernel_layer_refuses_more_rules_than_a_slot_holds():
    import dataclasses

    rs = parse_rule_set(RULES, "t")
    many = dataclasses.replace(rs, rules=tuple(dataclasses.replace(rs.rules[0], name=f"r{i}") for i in range(65)))
    with pytest.raises(ValueError, match="^65 rules, the kernel holds at most 64$"):
        ke._build_kernel_rule_set(many)
    # 64 is fine, and the 64th rule's bit (the top one of the mask) is written
    text = "rules:\n" + "".join(f"  - {{name: r{i}, sources: ['10.{i}.0.0/16'], action: drop}}\n" for i in range(64))
    krs = ke._build_kernel_rule_set(parse_rule_set(text, "t"))
    v4, _ = ke.kernel_trie_entries(krs, 0)
    assert (1 << 63).to_bytes(8, "little") + bytes(8) in v4.values()


def test_trie_family():
    assert ke.trie_family(0xFFFF << 32, 96) == 4
    assert ke.trie_family((0xFFFF << 32) | 0x0A000000, 104) == 4
    assert ke.trie_family(0xFFFF << 32, 95) == 6
    assert ke.trie_family(0, 0) == 6 and ke.trie_family(0x0A000000, 104) == 6, "::10.0.0.0 is not IPv4"


def test_same_matching_means_every_field_of_matching():
    base = ke._build_kernel_rule_set(parse_rule_set(RULES, "t"))
    assert ke.same_matching(base, ke._build_kernel_rule_set(parse_rule_set(RULES.replace("pps: 10,", "pps: 5,"), "t")))
    import dataclasses

    for field, value in (("flags", 0), ("any_src_mask", 0), ("proto_mask", [0] * 256), ("ports", {}), ("cidrs", {})):
        other = dataclasses.replace(base, **{field: value})
        assert not ke.same_matching(base, other), field
        assert not ke.same_matching(other, base), field


SHADOW_ACTIVE = rule_set("shadow-active")  # dns (0), web (1) and the default (64), all with the prefix limit
EVERYWHERE = kl.LINK_STATE4 | kl.LINK_PFX4 | kl.LINK_STATE6 | kl.LINK_PFX6


def _links(shadow_text: str, active_slot: int = 1) -> dict[int, int]:
    build = ke._build_kernel_rule_set
    return ke.shadow_links(build(parse_rule_set(SHADOW_ACTIVE, "a")), build(parse_rule_set(shadow_text, "s")),
                           active_slot)  # fmt: skip


def test_shadow_links_say_where_each_rule_keeps_its_state():
    """bpf/layout.h TG_LINK_*: what the program once worked out per packet from
    both rules and both sets' key masks, decided per rule when the slots link."""
    tight = SHADOW_ACTIVE.replace("pps: 100, burst: 100}", "pps: 10, burst: 10}")
    assert _links(tight) == {0: 2 | EVERYWHERE, 1: 2 | EVERYWHERE, 64: 2 | EVERYWHERE}, "the usual candidate"
    assert _links(tight, 0) == {0: 1 | EVERYWHERE, 1: 1 | EVERYWHERE, 64: 1 | EVERYWHERE}, "the active slot + 1"
    # a byte bucket on the shadow's dns rule: its source state keeps entries of its own
    dns_bytes = tight.replace("pps: 10, burst: 10}", "pps: 10, burst: 10, bps: 8000, burst_bytes: 1500}", 1)
    assert 0 not in _links(dns_bytes) and _links(dns_bytes)[1] == 2 | EVERYWHERE
    # a pass rule in the shadow keeps no state at all
    dns_pass = tight.replace("    limit: {pps: 10, burst: 10}", "    action: pass", 1)
    assert 0 not in _links(dns_pass) and _links(dns_pass)[64] == 2 | EVERYWHERE
    # prefixes keyed by /16 in IPv4: the IPv4 prefix bucket keeps entries of its own, nothing else changes
    wide = tight.replace("ipv4_prefix: 24, ipv6_prefix: 48", "ipv4_prefix: 16, ipv6_prefix: 48")
    assert _links(wide)[64] == 2 | kl.LINK_STATE4 | kl.LINK_STATE6 | kl.LINK_PFX6
    # sources keyed by /24 in IPv4: the IPv4 state and prefix keep entries of their own
    by24 = tight.replace("defaults:\n", "defaults:\n  ipv4_prefix: 24\n", 1)
    assert by24 != tight and _links(by24)[64] == 2 | kl.LINK_STATE6 | kl.LINK_PFX6
    # the shadow's prefix limit counting bytes: sources here, prefixes apart
    pfx_bytes = tight.replace("pps: 5000, burst: 5000}", "pps: 5000, burst: 5000, bps: 800000, burst_bytes: 90000}")
    assert pfx_bytes != tight and _links(pfx_bytes)[64] == 2 | kl.LINK_STATE4 | kl.LINK_STATE6


@pytest.mark.parametrize("proto, port", [(None, None), (17, 53), (17, 60), (6, 53), (1, None), (58, None), (6, 80)])
def test_the_estimates_classifier_matches_like_the_program(proto, port):
    rs = parse_rule_set(RULES.replace('deny: ["192.0.2.0/24", "10.9.0.0/16"]',
                                      'deny: ["192.0.2.0/24", "10.9.0.0/16", "::/0"]\nallow: ["10.1.0.0/16", '
                                      '"2001:db8::/112"]').replace('allow: ["10.1.0.0/16"]\n', ""), "t")  # fmt: skip
    cls = ke.Classifier(ke._build_kernel_rule_set(rs))
    rnd = random.Random(proto or 0)
    addrs = ["10.1.2.3", "10.9.1.1", "192.0.2.9", "198.51.100.5", "203.0.113.1", "2001:db8::1", "::ffff:10.1.2.3",
             "2001:db8::1:1", "2001:db9::1"]
    addrs += [str(ipaddress.IPv4Address(rnd.getrandbits(32))) for _ in range(100)]
    names = {"tcp": {6}, "udp": {17}, "icmp": {1}, "icmpv6": {58}, "any": set(range(256))}
    p = 0 if proto is None else proto
    for addr in addrs:
        a = ipaddress.ip_address(addr)
        if any(a in n for n in rs.allow if n.version == a.version):
            want = kl.RULE_ALLOWLIST
        elif any(a in n for n in rs.deny if n.version == a.version):
            want = kl.RULE_DENYLIST
        else:
            want = kl.RULE_DEFAULT
            for i, r in enumerate(rs.rules):
                if r.sources and not any(a in n for n in r.sources if n.version == a.version):
                    continue
                if p not in names[r.protocol]:
                    continue
                if r.dst_ports and (port is None or not any(x.lo <= port <= x.hi for x in r.dst_ports)):
                    continue
                want = i
                break
        assert cls.classify(addr, proto, port) == want, (addr, proto, port)


@pytest.mark.parametrize("seed", range(40))
def test_a_list_none_of_whose_entries_contains_another_skips_the_walk_with_the_same_entries(seed, monkeypatch):
    """The array form of large disjoint IPv4 lists (kernel/trie4.py) gives
    what the walk gives; a list with one containing entry or an IPv6 one is
    walked; rule sources among them still give the same entries."""
    rnd = random.Random(seed)
    nets = [f"10.{i // 256}.{i % 256}.0/24" for i in rnd.sample(range(5000), 80)]
    odd = rnd.choice([[], ["10.0.0.0/8"], ["10.0.0.0/23"], ["10.1.2.128/25"], ["2001:db8::/32"], ["::/0"],
                      ["0.0.0.0/0"], ["10.0.0.0/32"]])  # fmt: skip
    allow = [n for n in nets[:60] if n not in odd] + odd
    deny = nets[60:70]
    src = nets[70:] if seed % 2 else []
    text = (f"allow: {allow}\ndeny: {deny}\nrules:\n  - name: a\n    limit: {{pps: 1}}\n"
            + (f"    sources: {src}\n" if src else ""))  # fmt: skip
    rs = parse_rule_set(text)
    built = ke._build_kernel_rule_set(rs)
    fast = built.cidrs
    monkeypatch.setattr(ke, "ARRAY_MIN", 10**9)
    walked = ke._build_kernel_rule_set(rs).cidrs
    assert fast == walked and list(fast) == list(walked)
    listed = [ipaddress.ip_network(n) for n in allow + deny + src]
    disjoint = all(n.version == 4 for n in listed) and not any(
        a != b and a.version == b.version and a.subnet_of(b) for a in listed for b in listed)  # fmt: skip
    assert (built.v4 is not None) == disjoint
