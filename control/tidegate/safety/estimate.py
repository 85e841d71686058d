"""Safe change: the blast-radius estimate and the check that refuses an
apply (the guard that rolls back by itself is guard.py).

The estimate asks "what would this rule set drop that the active one
passes?" of the traffic the agent actually saw: per-source rates from the
sampler's recent window (default 5 min), each source classified by the
candidate set the way the XDP program would (kernel.entries.Classifier) and
given the candidate's steady-state rate (token buckets pass at most `pps`
in the long run; bursts are ignored, so the estimate errs towards
refusing). Prefix limits are applied to the sum of a prefix's sources.
The traffic's protocol and port are taken from the active rule that
matched it (a representative of its protocol and first port); traffic on
the default rule is classified without a port.

Sources the sampler folded (observation/fold.py: older intervals of a
window over its row budget keep per-prefix sums of the sources that sent
under 1 pps, the lowest limit a rule can be given) are counted as classes:
a class is classified by its prefix's network address, its per-source rate
is its fastest source's (under any per-source limit, unless the fold ran
out of room), its packets count in its prefix's sum, and its sources are
source-intervals. The estimate says how many sources and what share of
packets rest on classes (`folded_sources`, `folded_packet_share`, the
summary).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import asdict, dataclass, field

from tidegate.kernel.entries import Classifier, build_kernel_rule_set
from tidegate.kernel.layout import ACT_DROP, ACT_PASS, RULE_ALLOWLIST, RULE_DEFAULT, RULE_DENYLIST

log = logging.getLogger("tidegate.safety.estimate")

PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "any": None}


@dataclass
class RuleEstimate:
    rule: str
    sources_newly_dropped: int = 0
    newly_dropped_pps: float = 0.0


@dataclass
class Estimate:
    window_seconds: float = 0.0
    sources_seen: int = 0
    sources_newly_dropped: int = 0
    packets_per_second: float = 0.0
    newly_dropped_pps: float = 0.0
    packet_share: float = 0.0
    source_share: float = 0.0
    within_budget: bool = True
    packet_budget: float = 0.01
    source_budget: float = 0.05
    rules: list[RuleEstimate] = field(default_factory=list)
    top_affected: list[dict] = field(default_factory=list)
    summary: str = ""
    folded_sources: int = 0  # sources counted as classes, judged by their prefix (observation/fold.py)
    folded_packet_share: float = 0.0  # their share of the window's packets

    def to_dict(self) -> dict:
        return asdict(self)


def _representative(rule) -> tuple[int | None, int | None]:
    if rule is None:
        return None, None
    proto = PROTO.get(rule.protocol)
    if proto is None and rule.dst_ports:
        proto = 6
    port = rule.dst_ports[0].lo if rule.dst_ports else None
    return proto, port


def _mask_key(address: str, v4: int, v6: int) -> str:
    a = ipaddress.ip_address(address)
    return str(ipaddress.ip_network(f"{a}/{v4 if a.version == 4 else v6}", strict=False))


def estimate(agent, candidate, rates=None) -> Estimate:
    """`rates`: per-source rates to estimate against (a subset of the
    sampler's window, e.g. only known sources); the whole window if None."""
    opts = agent.options
    est = Estimate(packet_budget=opts.packet_budget, source_budget=opts.source_budget)
    st = agent.kf.state()
    if st.active is None:
        est.summary = "no active rule set: nothing to compare against"
        return est
    active = agent.rule_set_of(st.active.version)
    # every epoch in the window: an apply a moment ago must not blind the check
    if rates is None:
        rates = agent.sampler.window_rates(opts.estimate_window, kind=0)
    est.window_seconds = rates.seconds
    if not len(rates.addresses):
        est.summary = "no per-source traffic observed in the window yet: nothing to estimate"
        return est
    krs = build_kernel_rule_set(candidate)
    cls = Classifier(krs)
    d = candidate.defaults

    # Work in packets over the window, not summed per-source rates: a
    # sparse source (one packet in the window) has no meaningful rate, but
    # its packets count exactly. Per source: P packets, of which the active
    # set passed P - D; the candidate passes a fraction f of them, from its
    # per-source limit against the source's rate (P / seen) and then its
    # prefix limit against the prefix's total rate.
    # A class of folded sources is keyed apart (by its network): its rate
    # against a per-source limit is its fastest source's, not its sum's.
    per_key: dict[str, list] = {}
    for addr, name, pk, dr, seen, net, n, peak in zip(rates.addresses, rates.rules, rates.packets, rates.drops,
                                                      rates.seen, rates.networks, rates.sources, rates.peak_pps):
        rule = active.rule(name)
        proto, port = _representative(rule)
        cidx = cls.classify(addr, proto, port)
        ckey = _mask_key(addr, d.ipv4_prefix, d.ipv6_prefix)
        row = per_key.setdefault(f"{net or ckey}|{cidx}", [ckey, cidx, 0.0, 0.0, 0, 0.0, net, 0.0])
        row[2] += float(pk)
        row[3] += float(pk - dr)
        row[4] += int(n)
        row[5] = max(row[5], float(seen))
        row[7] = max(row[7], float(peak))

    prefix_groups: dict[str, list] = {}
    frac: dict[str, float] = {}
    for k, (ckey, cidx, packets, passing, _n, seen, net, peak) in per_key.items():
        params = krs.rules.get(cidx)
        rate = peak if net else (packets / seen if seen else 0.0)
        if cidx == RULE_DENYLIST or (params and params.action == ACT_DROP):
            f = 0.0
        elif cidx == RULE_ALLOWLIST or params is None or params.action == ACT_PASS or not params.src.rate:
            f = 1.0
        else:
            f = min(1.0, float(params.src.rate) / rate) if rate else 1.0
        frac[k] = f
        if params and params.pfx.rate:
            crule = candidate.rule(krs.rule_names.get(cidx, "")) if cidx < 64 else None
            pfx = crule.prefix_limit if crule else d.prefix_limit
            if pfx:
                a = ipaddress.ip_network(ckey).network_address
                pk_ = _mask_key(str(a), pfx.ipv4_prefix, pfx.ipv6_prefix)
                prefix_groups.setdefault(f"{pk_}|{cidx}", [float(params.pfx.rate), []])[1].append(k)
    for _, (limit, keys) in prefix_groups.items():
        seen = max(per_key[k][5] for k in keys)
        total_rate = sum(per_key[k][2] * frac[k] for k in keys) / seen if seen else 0.0
        if total_rate > limit:
            for k in keys:
                frac[k] *= limit / total_rate

    by_rule: dict[str, RuleEstimate] = {}
    affected = []
    passing_total = 0.0
    lost_total = 0.0
    newly: dict[str, float] = {}
    span = max(rates.seconds, 1e-9)
    for k, (ckey, cidx, packets, passing, n, seen, net, _peak) in per_key.items():
        passing_total += passing
        lost = max(0.0, passing - packets * frac[k])
        if lost > max(0.01 * passing, 0.5):
            name = krs.rule_names.get(cidx, f"rule{cidx}")
            newly[k] = lost
            lost_total += lost
            re = by_rule.setdefault(name, RuleEstimate(name))
            re.sources_newly_dropped += n
            re.newly_dropped_pps += lost / span
            affected.append({"address": net or ckey, "rule": name, "pps": packets / seen if seen else 0.0,
                             "drop_pps": lost / seen if seen else 0.0})  # fmt: skip
    est.sources_seen = int(rates.sources.sum())
    est.sources_newly_dropped = sum(per_key[k][4] for k in newly)
    folded = rates.folded
    est.folded_sources = int(rates.sources[folded].sum())
    est.folded_packet_share = float(rates.packets[folded].sum() / max(1.0, float(rates.packets.sum())))
    est.packets_per_second = passing_total / span
    est.newly_dropped_pps = lost_total / span
    est.packet_share = lost_total / passing_total if passing_total else 0.0
    est.source_share = est.sources_newly_dropped / est.sources_seen if est.sources_seen else 0.0
    est.within_budget = est.packet_share <= est.packet_budget and est.source_share <= est.source_budget
    est.rules = sorted(by_rule.values(), key=lambda r: -r.newly_dropped_pps)
    est.top_affected = sorted(affected, key=lambda a: -a["drop_pps"])[:10]
    # (every entry of the window counts at least one source: an empty window returned above)
    est.summary = (
        f"would newly drop {est.packet_share:.1%} of passing packets ({est.newly_dropped_pps:.0f} of "
        f"{est.packets_per_second:.0f} pps) and {est.source_share:.1%} of sources ({est.sources_newly_dropped} of "
        f"{est.sources_seen}) seen over the last {est.window_seconds:.0f} s"
    )
    if est.folded_sources:
        est.summary += (f"; {est.folded_sources} of these sources ({est.folded_packet_share:.1%} of packets) "
                        "sent under 1 pps in intervals the sampler folded: counted by prefix as classes")
    return est


def check(agent, candidate, est: Estimate | None) -> list[str]:
    """Problems that refuse an apply unless forced."""
    problems = []
    if est is not None and not agent.options.no_blast_check and not est.within_budget:
        problems.append(
            f"{est.summary} (budget: {est.packet_budget:.1%} of packets, {est.source_budget:.1%} of sources)"
        )
    if candidate.canaries:
        cls = Classifier(build_kernel_rule_set(candidate))
        krs = cls.krs
        for net in candidate.canaries:
            idx = cls.classify(str(net.network_address))
            params = krs.rules.get(idx)
            if idx == RULE_DENYLIST:
                problems.append(f"canary {net} is on the deny list")
            elif params is not None and params.action == ACT_DROP:
                problems.append(f"canary {net} matches rule {krs.rule_names.get(idx)!r} with action drop")
    return problems


