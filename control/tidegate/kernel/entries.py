"""Turn a validated RuleSet into the entries of one kernel rule-set slot.

Pure Python: no kernel, no BCC, so it is unit-tested without root. The
kernel layer (slots.py) copies these entries into the maps described in
bpf/layout.h.

Matching is precomputed here so the packet path does at most one trie and
one hash lookup, whatever the number of rules:

- Every CIDR of the allow list, the deny list and the rules' sources
  becomes one trie entry carrying the allow/deny flags and the bit mask of
  rules whose sources contain it. Prefixes that contain an address form a
  chain, so the longest match already carries everything above it.
- Every (protocol, port) of the rules becomes a hash entry with the mask of
  rules that accept it; protocols without a listed port use a per-protocol
  mask. The first matching rule is the lowest bit of (source & port) masks.

Addresses live in one 128-bit space: IPv6 as is, IPv4 as ::ffff:a.b.c.d.
A barrier entry at ::ffff:0:0/96 stops IPv6 prefixes such as ::/0 from
covering IPv4 sources.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import struct
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from tidegate.kernel.layout import (
    ACT_DROP,
    ACT_LIMIT,
    ACT_PASS,
    CF_ALLOW,
    CF_DENY,
    LINK_PFX4,
    LINK_PFX6,
    LINK_STATE4,
    LINK_STATE6,
    MAX_RULES,
    PSEUDO_RULES,
    RF_BYTES,
    RF_PFX_BYTES,
    RF_PKT,
    RF_PREFIX,
    RULE_ALLOWLIST,
    RULE_DEFAULT,
    RULE_DENYLIST,
    RULE_EXTHDR,
    SET_EXT_DEFAULT,
    SET_HAS_PORTS,
    SET_HAS_TRIE,
    UNIT,
    V4_MAPPED,
    Mask,
    mask_halves,
    network_key,
)
from tidegate.kernel.trie4 import ARRAY_MIN, Trie4, V4Entries, codes_of_keys, v4_entries

# The byte bucket's burst is capped so that burst * UNIT fits in 64 bits
# with room for one refill; 4 GB of burst is far beyond any real use.
MAX_BYTE_BURST = 4_000_000_000

PROTO_NUMBERS = {"tcp": (6,), "udp": (17,), "icmp": (1,), "icmpv6": (58,), "any": tuple(range(256))}
PORT_PROTOS = {"tcp": (6,), "udp": (17,), "any": (6, 17)}

_BARRIER = (V4_MAPPED, 96)
# raw trie entries, as bpf/layout.h lays out tg_cidr4_key, tg_cidr6_key and tg_cidr_val (struct.pack is
# several times faster than filling ctypes structs; tests/unit/test_layout_contract.py checks they agree)
CIDR_VAL = struct.Struct("<QII")
CIDR_KEY_HEAD = struct.Struct("<II")  # prefixlen, slot; the address follows in network order
_ADDR4 = struct.Struct(">I")


@dataclass(frozen=True)
class BucketParams:
    rate: int = 0
    burst: int = 0
    fill_ns: int = 0
    brate: int = 0
    bburst: int = 0
    bfill_ns: int = 0


@dataclass(frozen=True)
class RuleParams:
    name: str
    action: int = ACT_PASS
    flags: int = 0
    block_ns: int = 0
    src: BucketParams = BucketParams()
    pfx: BucketParams = BucketParams()
    pfx4: Mask = Mask(0, 0)
    pfx6: Mask = Mask(0, 0)


@dataclass
class KernelRuleSet:
    """Everything one slot needs. rule_names[i] names rule index i."""

    flags: int
    any_src_mask: int
    proto_mask: list[int]
    key4: Mask
    key6: Mask
    rules: dict[int, RuleParams]
    cidrs: dict[tuple[int, int], tuple[int, int]] | None  # (addr128, prefixlen128) -> (rule_mask, flags)
    ports: dict[tuple[int, int], int]  # (ip proto, port) -> rule_mask
    rule_names: dict[int, str] = field(default_factory=dict)
    # the same trie entries as arrays, when they are all IPv4 and none contains another (trie4.py):
    # `cidrs` is then made from them when first read (None given)
    v4: V4Entries | None = None


def _cidrs(krs: KernelRuleSet) -> dict[tuple[int, int], tuple[int, int]]:
    if krs._cidrs is None and krs.v4 is not None:
        krs._cidrs = krs.v4.as_dict()
    return krs._cidrs


def _set_cidrs(krs: KernelRuleSet, cidrs) -> None:
    krs._cidrs = cidrs


# a property over the dataclass field (set after the class is made, so the field keeps no default)
KernelRuleSet.cidrs = property(_cidrs, _set_cidrs)


def cidr_entries(krs: KernelRuleSet) -> dict[tuple[int, int], tuple[int, int]]:
    """krs.cidrs, without keeping it on krs when it is made from the arrays:
    the filter keeps each slot's kernel rule set, and the dict of 100,000
    entries is ~20 MB (for a reader that needs it once: a comparison, the
    estimate's classifier)."""
    return krs.v4.as_dict() if krs._cidrs is None and krs.v4 is not None else krs.cidrs


def same_cidrs(a: KernelRuleSet, b: KernelRuleSet) -> bool:
    """a.cidrs == b.cidrs, on the arrays when both have them."""
    if a.v4 is not None and b.v4 is not None:
        return a.v4.same(b.v4)
    return cidr_entries(a) == cidr_entries(b)


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    oa, op = outer
    ia, ip_ = inner
    if op > ip_:
        return False
    if op == 0:
        return True
    shift = 128 - op
    return (oa >> shift) == (ia >> shift)


def bucket_params(pps: int, burst: int, bps: int | None, burst_bytes: int | None) -> BucketParams:
    burst_units = burst * UNIT
    fill = math.ceil(burst_units / pps)
    brate = bburst = bfill = 0
    if bps:
        brate = max(1, bps // 8)
        bb = burst_bytes if burst_bytes else max(1, bps // 8)
        bburst = min(bb, MAX_BYTE_BURST) * UNIT
        bfill = math.ceil(bburst / brate)
    return BucketParams(pps, burst_units, fill, brate, bburst, bfill)


def _limit_params(limit) -> BucketParams:
    return bucket_params(limit.pps, limit.burst, getattr(limit, "bps", None), getattr(limit, "burst_bytes", None))


def rule_params(name: str, action: str, limit, prefix_limit, block_seconds: int) -> RuleParams:
    if action == "drop":
        return RuleParams(name, ACT_DROP)
    if action == "pass" or limit is None:
        return RuleParams(name, ACT_PASS)
    flags = RF_PKT
    src = _limit_params(limit)
    if src.brate:
        flags |= RF_BYTES
    pfx = BucketParams()
    pfx4 = pfx6 = Mask(0, 0)
    if prefix_limit is not None:
        flags |= RF_PREFIX
        pfx = _limit_params(prefix_limit.limit)
        if pfx.brate:
            flags |= RF_PFX_BYTES
        pfx4 = mask_halves(96 + prefix_limit.ipv4_prefix)
        pfx6 = mask_halves(prefix_limit.ipv6_prefix)
    return RuleParams(name, ACT_LIMIT, flags, block_seconds * 1_000_000_000, src, pfx, pfx4, pfx6)


def _is_any_source(sources) -> bool:
    """No sources listed, or both families' /0: match without a trie entry."""
    if not sources:
        return True
    families = {n.version for n in sources if n.prefixlen == 0}
    return families == {4, 6}


# The agent builds the same rule set's entries twice in a row (the
# blast-radius estimate, then the kernel write): the last few results are
# kept by identity (hashing a 10,000-CIDR RuleSet would cost more than it
# saves), each for as long as its rule set lives elsewhere. A weak reference:
# the cache must not keep a rule set alive by itself (a 100,000-CIDR one was
# about 30 MB; bench/agent_process.py, "after the applies of new
# 100,000-CIDR sets").
_RECENT: list[tuple[weakref.ref, KernelRuleSet]] = []


def build_kernel_rule_set(rule_set) -> KernelRuleSet:
    """The kernel entries of a rule set. The result may be shared between
    callers: treat it as read-only."""
    _RECENT[:] = [(ref, krs) for ref, krs in _RECENT if ref() is not None]
    for ref, krs in _RECENT:
        if ref() is rule_set:
            return krs
    krs = _build_kernel_rule_set(rule_set)
    _RECENT.insert(0, (weakref.ref(rule_set), krs))
    del _RECENT[4:]
    return krs


def _build_kernel_rule_set(rule_set) -> KernelRuleSet:
    rules = list(rule_set.rules)
    if len(rules) > MAX_RULES:
        raise ValueError(f"{len(rules)} rules, the kernel holds at most {MAX_RULES}")

    any_src_mask = 0
    for i, rule in enumerate(rules):
        if _is_any_source(rule.sources):
            any_src_mask |= 1 << i
    v4 = _v4_entries(rule_set, rules, any_src_mask)
    cidrs = None if v4 is not None else _walked(rule_set, rules, any_src_mask)

    proto_mask = [0] * 256
    ports: dict[tuple[int, int], int] = {}
    for i, rule in enumerate(rules):
        bit = 1 << i
        if rule.dst_ports:
            for proto in PORT_PROTOS[rule.protocol]:
                for pr in rule.dst_ports:
                    for port in range(pr.lo, pr.hi + 1):
                        ports[(proto, port)] = ports.get((proto, port), 0) | bit
        else:
            for proto in PROTO_NUMBERS[rule.protocol]:
                proto_mask[proto] |= bit
    for (proto, port), m in ports.items():
        ports[(proto, port)] = m | proto_mask[proto]

    params: dict[int, RuleParams] = {}
    names: dict[int, str] = {}
    for i, rule in enumerate(rules):
        params[i] = rule_params(rule.name, rule.action, rule.limit, rule.prefix_limit, rule.block_seconds)
        names[i] = rule.name
    d = rule_set.defaults
    params[RULE_DEFAULT] = rule_params(PSEUDO_RULES[RULE_DEFAULT], "limit", d.limit, d.prefix_limit, d.block_seconds)
    params[RULE_DENYLIST] = RuleParams(PSEUDO_RULES[RULE_DENYLIST], ACT_DROP)
    params[RULE_ALLOWLIST] = RuleParams(PSEUDO_RULES[RULE_ALLOWLIST], ACT_PASS)
    # defaults.ipv6_unparsed_extensions: pass or drop by this pseudo-rule, or "default": the default rule
    ext = d.ipv6_unparsed_extensions
    params[RULE_EXTHDR] = RuleParams(PSEUDO_RULES[RULE_EXTHDR], ACT_DROP if ext == "drop" else ACT_PASS)
    names.update(PSEUDO_RULES)

    flags = (SET_HAS_TRIE if cidrs or v4 is not None else 0) | (SET_HAS_PORTS if ports else 0)
    flags |= SET_EXT_DEFAULT if ext == "default" else 0
    return KernelRuleSet(
        flags=flags,
        any_src_mask=any_src_mask,
        proto_mask=proto_mask,
        key4=mask_halves(96 + d.ipv4_prefix),
        key6=mask_halves(d.ipv6_prefix),
        rules=params,
        cidrs=cidrs,
        ports=ports,
        rule_names=names,
        v4=v4,
    )


def _walked(rule_set, rules: list, any_src_mask: int) -> dict[tuple[int, int], tuple[int, int]]:
    """The trie entries, each with the masks and flags of the entries containing it (_inherit)."""
    flags: dict[tuple[int, int], int] = dict.fromkeys(_keys(rule_set.allow), CF_ALLOW)
    for key in _keys(rule_set.deny):
        flags[key] = flags.get(key, 0) | CF_DENY
    masks: dict[tuple[int, int], int] = {}  # key -> the rules listing it among their sources
    for i, rule in enumerate(rules):
        if not any_src_mask >> i & 1:
            for key in _keys(rule.sources):
                masks[key] = masks.get(key, 0) | (1 << i)
    return _inherit(flags, masks)


def _v4_entries(rule_set, rules: list, any_src_mask: int) -> V4Entries | None:
    """The trie entries as arrays (trie4.py) when there are ARRAY_MIN or
    more, all IPv4, and none contains another; else None."""
    lists = [(rule_set.allow, 0, CF_ALLOW), (rule_set.deny, 0, CF_DENY)]
    lists += [(r.sources, 1 << i, 0) for i, r in enumerate(rules) if not any_src_mask >> i & 1]
    lists = [x for x in lists if x[0]]
    if sum(len(nets) for nets, _, _ in lists) < ARRAY_MIN:
        return None
    coded = []
    for nets, mask, flag in lists:
        codes = getattr(nets, "v4_codes", None)
        if codes is None:
            codes = codes_of_keys(_keys(nets))
            if codes is None:  # an IPv6 network
                return None
        coded.append((codes, mask, flag))
    return v4_entries(coded)


def _keys(nets) -> list[tuple[int, int]]:
    """(addr128, prefixlen128) of each network: the parser's keys when it made the tuple."""
    keys = getattr(nets, "unified_keys", None)
    return keys if keys is not None else [network_key(n) for n in nets]


def _inherit(flags: dict[tuple[int, int], int], masks: dict[tuple[int, int], int]
             ) -> dict[tuple[int, int], tuple[int, int]]:  # fmt: skip
    """Every entry (a key in flags or masks) with the masks and flags of all
    entries containing it.

    Sorted by (address, prefix length), an entry's containing entries are
    exactly the stack of still-open prefixes before it: O(n log n), and
    O(n) for a list already in order. An open prefix contains a later entry
    while the entry's address is within its last address."""
    if not flags and not masks:
        return {}
    keys = sorted([*flags, *(k for k in masks if k not in flags)])  # lists come mostly in order: cheap
    # the prefixes that contain the barrier sort before it (with IPv4-only lists there are none to look at)
    at = bisect.bisect_left(keys, _BARRIER)
    if (at == len(keys) or keys[at] != _BARRIER) and any(k[1] < 96 and _contains(k, _BARRIER) for k in keys[:at]):
        keys.insert(at, _BARRIER)
    out: dict[tuple[int, int], tuple[int, int]] = {}
    stack: list[tuple[int, int, int, int]] = []  # (last address, prefix length, mask, flags) of open prefixes
    fget, mget = flags.get, masks.get
    for key in keys:
        addr, plen = key
        while stack and addr > stack[-1][0]:
            stack.pop()
        mask, flag = mget(key, 0), fget(key, 0)
        # IPv4 space never inherits from IPv6 prefixes above the barrier
        if stack and not (key == _BARRIER or (stack[-1][1] < 96 and _contains(_BARRIER, key))):
            mask |= stack[-1][2]
            flag |= stack[-1][3]
        stack.append((addr | ((1 << (128 - plen)) - 1), plen, mask, flag))
        out[key] = (mask, flag)
    return out


def same_matching(a: KernelRuleSet, b: KernelRuleSet) -> bool:
    """True if every packet gets the same rule index (or list verdict) from
    both: the shadow set may then reuse the active set's classification."""
    return (a.flags == b.flags and a.any_src_mask == b.any_src_mask and a.proto_mask == b.proto_mask
            and a.ports == b.ports and same_cidrs(a, b))  # fmt: skip


def _keeps_state(rp: RuleParams | None) -> bool:
    """A rule whose packets are charged to a per-source state entry (bpf/classify.h tg_has_state)."""
    return rp is not None and rp.action == ACT_LIMIT and bool(rp.flags & RF_PKT)


def shadow_links(active: KernelRuleSet, shadow: KernelRuleSet, active_slot: int) -> dict[int, int]:
    """Each shadow rule's link to the active slot (bpf/layout.h TG_LINK_*),
    for a shadow set that matches like the active one (same_matching): per
    family, whether the rule keeps its per-source state in the active set's
    entry for the source (both rules keep per-source state, the shadow's no
    byte bucket, both sets key sources alike), and its prefix bucket in the
    active set's entry for the prefix (both limit prefixes keyed alike, the
    shadow's counts no bytes). Rule indexes that keep nothing there link to
    nothing (0)."""
    links = {}
    for idx, rc in shadow.rules.items():
        arc = active.rules.get(idx)
        if not (_keeps_state(rc) and _keeps_state(arc) and not rc.flags & RF_BYTES):
            continue
        pfx_both = bool(arc.flags & RF_PREFIX and rc.flags & RF_PREFIX and not rc.flags & RF_PFX_BYTES)
        link = 0
        for sources_alike, prefixes_alike, state_bit, pfx_bit in (
                (active.key4 == shadow.key4, arc.pfx4 == rc.pfx4, LINK_STATE4, LINK_PFX4),
                (active.key6 == shadow.key6, arc.pfx6 == rc.pfx6, LINK_STATE6, LINK_PFX6)):  # fmt: skip
            if sources_alike:
                link |= state_bit | (pfx_bit if pfx_both and prefixes_alike else 0)
        if link:
            links[idx] = link | (active_slot + 1)
    return links


def trie_family(addr128: int, prefixlen128: int) -> int:
    """Which of the program's two tries holds an entry: 4 for the IPv4
    (::ffff:0:0/96) part of the unified space, 6 for the rest."""
    return 4 if prefixlen128 >= 96 and (addr128 >> 32) == 0xFFFF else 6


def kernel_trie_entries(krs: KernelRuleSet, slot: int) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """The raw (key, value) bytes of one slot's IPv4 and IPv6 trie entries,
    as bpf/layout.h lays out tg_cidr4_key, tg_cidr6_key and tg_cidr_val."""
    if krs.v4 is not None:
        return dict(Trie4.of(krs.v4, slot)), {}
    v4: dict[bytes, bytes] = {}
    v6: dict[bytes, bytes] = {}
    vals: dict[tuple[int, int], bytes] = {}  # a set has few distinct values: each packed once
    heads4 = [CIDR_KEY_HEAD.pack(32 + plen, slot) for plen in range(33)]
    addr4 = _ADDR4.pack
    for key, mf in krs.cidrs.items():
        val = vals.get(mf)
        if val is None:
            val = vals[mf] = CIDR_VAL.pack(mf[0], mf[1], 0)
        addr, plen = key
        if plen >= 96 and (addr >> 32) == 0xFFFF:  # trie_family 4
            if key == _BARRIER and not (mf[0] or mf[1]):
                continue  # only separates the families in the unified space
            v4[heads4[plen - 96] + addr4(addr & 0xFFFFFFFF)] = val
        else:
            v6[CIDR_KEY_HEAD.pack(32 + plen, slot) + addr.to_bytes(16, "big")] = val
    return v4, v6


def slot_trie_entries(krs: KernelRuleSet, slot: int) -> tuple[Mapping[bytes, bytes], dict[bytes, bytes]]:
    """kernel_trie_entries, the IPv4 ones as a Trie4 when the rule set has them as arrays."""
    if krs.v4 is not None:
        return Trie4.of(krs.v4, slot), {}
    return kernel_trie_entries(krs, slot)


def kernel_port_entries(krs: KernelRuleSet) -> dict[int, int]:
    """One slot's port-table entries: index within the slot's range
    (is_udp << 16 | port, bpf/layout.h TG_PORT_IDX) -> rule mask."""
    return {((proto == 17) << 16 | port): mask for (proto, port), mask in krs.ports.items()}


class Classifier:
    """The program's matching, in Python, over a KernelRuleSet: used by the
    blast-radius estimate and canary checks. Longest-prefix match by one
    dict per family and prefix length (at most 129 lookups)."""

    def __init__(self, krs: KernelRuleSet):
        self.krs = krs
        self._by_len: dict[int, dict[int, dict[int, tuple[int, int]]]] = {4: {}, 6: {}}
        for (addr, plen), val in cidr_entries(krs).items():  # at each estimate: not kept on krs
            fam = self._by_len[trie_family(addr, plen)]
            fam.setdefault(plen, {})[addr >> (128 - plen) if plen else 0] = val
        self._lens = {f: sorted(d, reverse=True) for f, d in self._by_len.items()}

    def classify(self, address: str, proto: int | None = None, port: int | None = None) -> int:
        """Rule index (RULE_DENYLIST / RULE_ALLOWLIST for the lists)."""
        a = ipaddress.ip_address(address)
        key = (V4_MAPPED | int(a)) if a.version == 4 else int(a)
        by_len = self._by_len[a.version]
        src_mask = self.krs.any_src_mask
        for plen in self._lens[a.version]:
            val = by_len[plen].get(key >> (128 - plen) if plen else 0)
            if val is not None:
                mask, flags = val
                if flags & CF_ALLOW:
                    return RULE_ALLOWLIST
                if flags & CF_DENY:
                    return RULE_DENYLIST
                src_mask |= mask
                break
        p = 0 if proto is None else proto
        port_mask = self.krs.proto_mask[p]
        if port is not None and (p, port) in self.krs.ports:
            port_mask = self.krs.ports[(p, port)]
        m = src_mask & port_mask
        return (m & -m).bit_length() - 1 if m else RULE_DEFAULT
