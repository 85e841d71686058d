"""From an insight reading to a candidate rule-set change, with its what-if.

`tidegate insight --propose` asks the agent for one change that answers the
reading, written as a whole rule set ready for `tidegate apply --shadow`:

- a spoofed or botnet flood spread over the space: a /0 aggregate limit
  (a prefix limit over the whole space) on the rule the flood hits;
- a flood concentrated in a few prefixes: a deny entry for each, or a
  prefix limit on the rule when known sources share those prefixes;
- heavy hitters: a per-source limit on their rule, at twice the rate of the
  fastest other source there;
- a surge, a flash crowd or normal traffic: no change, and why.

The what-if reuses safety.estimate on the traffic the agent saw (the
sampler's window), split by the reading's notion of known: the share of
the flood's passing packets the change would drop, and the share of known
sources' packets and of known sources it would newly drop. A /0 or prefix
limit is one bucket the flood and the known clients share, so for those
the split comes from the bucket (everyone on it loses the same share)
rather than from two separate estimates. Nothing is applied here.
"""

from __future__ import annotations

import ipaddress

import numpy as np
import yaml

from tidegate.safety import estimate as safety
from tidegate.ruleset.model import RuleSet, limit_dict, prefix_dict
from tidegate.ruleset.parse import parse_rule_set
from tidegate.observation.window import SourceRates, address_halves, network_index, source_keys

AGGREGATE_HEADROOM = 2.0  # the /0 limit lets through this many times the known clients' rate on the rule
MIN_AGGREGATE_PPS = 100


def _subset(r: SourceRates, mask: np.ndarray) -> SourceRates:
    return r.take(np.flatnonzero(mask))


def _explicit(rs: RuleSet) -> dict:
    """The rule set as data with every rule's limits spelled out, so that a
    change to the defaults touches only the traffic no rule matches."""
    d = rs.to_dict()
    for rd, r in zip(d["rules"], rs.rules):
        if r.action == "limit":
            rd["limit"] = limit_dict(r.limit) if r.limit else rd.get("limit")
            rd["prefix_limit"] = prefix_dict(r.prefix_limit) if r.prefix_limit else None
    return d


def _rule_entry(d: dict, name: str) -> dict | None:
    """The rule's entry in the data form, or the defaults for "default"."""
    if name == "default":
        return d["defaults"]
    return next((r for r in d["rules"] if r["name"] == name), None)


def _pps_of_rule(rates: SourceRates, known: np.ndarray, name: str) -> tuple[float, float]:
    """(known clients' pps, all pps) on a rule over the window."""
    on = np.array([r == name for r in rates.rules], bool)
    span = max(rates.seconds, 1e-9)
    return float(rates.packets[on & known].sum() / span), float(rates.packets[on].sum() / span)


def candidate(rs: RuleSet, reading: dict, rates: SourceRates, known: np.ndarray) -> tuple[dict | None, dict]:
    """(the candidate rule set as data or None, what it changes and why)."""
    v = reading.get("verdict")
    d = _explicit(rs)
    if v in ("flood", "mixed"):
        by_rule = reading.get("new_packets_by_rule") or {}
        rule = max(by_rule, key=by_rule.get) if by_rule else "default"
        entry = _rule_entry(d, rule)
        if entry is None or (entry is not d["defaults"] and entry.get("action", "limit") != "limit"):
            return None, {"action": "none", "rule": rule,
                          "reason": f"the flood hits rule {rule!r}, which does not limit: change it by hand"}
        dense = reading.get("dense_prefix_packet_share", 0) >= 0.5
        if dense:
            top = reading["top_16s"] if reading.get("top_16_packet_share", 0) >= 0.5 else reading["top_prefixes"]
            nets = [ipaddress.ip_network(p["prefix"]) for p in top if p["packet_share"] >= 0.05]
            addrs = [ipaddress.ip_address(a) for a, k in zip(rates.addresses, known) if k]
            shared = [n for n in nets if any(a in n for a in addrs)]
            if not shared:
                d["deny"] = sorted(set(d.get("deny", [])) | {str(n) for n in nets})
                return d, {"action": "deny", "rule": rule, "prefixes": [str(n) for n in nets],
                           "reason": f"the flood is concentrated in {', '.join(map(str, nets))}, where no known "
                                     "source sends: deny them"}  # fmt: skip
            bits = nets[0].prefixlen
            kp, _ = _pps_of_rule(rates, known, rule)
            pps = max(MIN_AGGREGATE_PPS, int(AGGREGATE_HEADROOM * kp))
            entry["prefix_limit"] = {"ipv4_prefix": bits, "ipv6_prefix": 48, "pps": pps, "burst": 2 * pps}
            return d, {"action": "prefix-limit", "rule": rule, "prefixes": [str(n) for n in nets],
                       "reason": f"the flood is concentrated in /{bits} prefixes that known sources share too: "
                                 f"a /{bits} prefix limit of {pps} pps on rule {rule!r}"}  # fmt: skip
        kp, _ = _pps_of_rule(rates, known, rule)
        pps = max(MIN_AGGREGATE_PPS, int(AGGREGATE_HEADROOM * kp))
        entry["prefix_limit"] = {"ipv4_prefix": 0, "ipv6_prefix": 0, "pps": pps, "burst": 2 * pps}
        return d, {"action": "aggregate-limit", "rule": rule, "pps": pps,
                   "reason": f"the flood is spread over the space on rule {rule!r}: a /0 aggregate limit of "
                             f"{pps} pps ({AGGREGATE_HEADROOM:g}x the known clients' {kp:,.0f} pps there)"}  # fmt: skip
    if v == "heavy-hitter":
        hitters = {h["source"] for h in reading.get("heavy_hitters", [])}
        is_hit = np.array([a in hitters for a in rates.addresses], bool)
        if not is_hit.any():
            return None, {"action": "none", "reason": "the heavy hitters are no longer in the window"}
        rule = rates.rules[int(np.flatnonzero(is_hit)[np.argmax(rates.pps[is_hit])])]
        entry = _rule_entry(d, rule)
        on = np.array([r == rule for r in rates.rules], bool) & ~is_hit
        others = float(rates.pps[on].max()) if on.any() else 0.0
        pps = max(10, int(np.ceil(2 * others)))
        if entry is None or (entry is not d["defaults"] and entry.get("action", "limit") != "limit"):
            return None, {"action": "none", "rule": rule, "reason": f"rule {rule!r} does not limit: change it by hand"}
        entry["limit"] = {"pps": pps, "burst": 2 * pps}
        return d, {"action": "per-source-limit", "rule": rule, "pps": pps, "sources": sorted(hitters),
                   "reason": f"a per-source limit of {pps} pps on rule {rule!r}: twice the fastest other source "
                             f"there ({others:,.1f} pps), far below the heavy hitters"}  # fmt: skip
    why = {
        "surge": "a surge of known clients is legitimate traffic: limiting it drops the clients you serve",
        "flash-crowd": "a flash crowd of new clients at human rates is legitimate: raise capacity, do not block",
        "normal": "traffic looks like its own baseline: nothing to mitigate",
        "quiet": "there is no traffic to mitigate",
        "learning": "the agent has no baseline yet: read again in a minute",
    }.get(v, "the reading shows no pattern a rule change would answer safely")
    return None, {"action": "none", "reason": why}


def _limit_pps(data: dict, rule: str) -> int:
    entry = _rule_entry(data, rule)
    return int(entry["prefix_limit"]["pps"])


def shared_bucket_loss(rates: SourceRates, rule: str, pps: float, prefixes: list[str] | None) -> np.ndarray:
    """Packets each source would lose to a limit its packets share: one bucket
    per prefix in `prefixes` (or one over the whole space) for the sources on
    `rule`; a full bucket drops the same share of everyone's packets."""
    on = np.array([r == rule for r in rates.rules], bool)
    groups = np.full(len(rates.addresses), -1)
    if prefixes:
        groups[on] = network_index(*address_halves(rates.addresses), prefixes)[on]
    else:
        groups[on] = 0
    lost = np.zeros(len(groups))
    span = max(rates.seconds, 1e-9)
    for g in np.unique(groups[groups >= 0]).tolist():
        m = groups == g
        rate = float(rates.packets[m].sum() / span)
        if rate > pps:
            lost[m] = rates.packets[m] * (1 - pps / rate)
    return lost


def _targets(reading: dict) -> np.ndarray:
    """Source keys of the heavy hitters a heavy-hitter reading's change aims
    at: however long they have been sending, they are not clients to spare."""
    aimed = reading.get("verdict") == "heavy-hitter"
    hitters = [h["source"] for h in reading.get("heavy_hitters", [])] if aimed else []
    return source_keys(*address_halves(hitters))


def known_split(agent, reading: dict) -> tuple[SourceRates, np.ndarray]:
    """The sampler's estimate window, and which of its sources the reading
    counts as known (bar the heavy hitters the change aims at)."""
    rates = agent.sampler.window_rates(agent.options.estimate_window, kind=0)
    keys = source_keys(*address_halves(rates.addresses))
    before = reading.get("known_before", -np.inf)
    # a class of folded sources (observation/fold.py) is never known: its address is its prefix's
    known = (agent.insight.known.first_seen_keys(keys) <= before) & ~np.isin(keys, _targets(reading))
    return rates, known & ~rates.folded


def spared(agent, reading: dict) -> tuple[SourceRates, object]:
    """What a mitigation of this reading must spare: the known sources' rates
    (for the blast-radius check) and a source keys -> mask predicate (for the guard)."""
    rates, known = known_split(agent, reading)
    before, targets = reading.get("known_before", -np.inf), _targets(reading)
    return _subset(rates, known), lambda keys: ((agent.insight.known.first_seen_keys(keys) <= before)
                                                & ~np.isin(keys, targets))  # fmt: skip


def propose(agent, reading: dict) -> dict:
    """The proposal for a reading: the change, its what-if, the rule set as YAML."""
    st = agent.kf.state()
    if st.active is None or "verdict" not in reading:
        return {"action": "none", "reason": "no active rule set or no reading yet"}
    rs = agent.rule_set_of(st.active.version)
    rates, known = known_split(agent, reading)
    data, out = candidate(rs, reading, rates, known)
    out["verdict"] = reading["verdict"]
    out["based_on_version"] = st.active.version
    if data is None:
        return out
    text = yaml.safe_dump(data, sort_keys=False)
    cand = parse_rule_set(text, "proposal")
    whole = safety.estimate(agent, cand)
    flood = safety.estimate(agent, cand, _subset(rates, ~known))
    kn = safety.estimate(agent, cand, _subset(rates, known))
    problems = safety.check(agent, cand, whole)
    flood_share, known_pk, known_src = flood.packet_share, kn.packet_share, kn.source_share
    if out["action"] in ("aggregate-limit", "prefix-limit"):
        # a shared bucket: the flood's packets use up what the known clients'
        # would have passed, so the two halves cannot be estimated apart
        lost = shared_bucket_loss(rates, out["rule"], out.get("pps") or _limit_pps(data, out["rule"]),
                                  out.get("prefixes"))  # fmt: skip
        pk = rates.packets
        flood_share = float(lost[~known].sum() / max(1.0, pk[~known].sum()))
        known_pk = float(lost[known].sum() / max(1.0, pk[known].sum()))
        known_src = float(np.count_nonzero(known & (lost > 0.01 * pk)) / max(1, known.sum()))
    out["what_if"] = {
        "window_seconds": round(whole.window_seconds, 1),
        "flood_sources": int(rates.sources[~known].sum()),
        "flood_packet_share_dropped": round(flood_share, 4),
        "known_sources": int(rates.sources[known].sum()),
        "folded_sources": whole.folded_sources,
        "known_packet_share_dropped": round(known_pk, 4),
        "known_source_share_dropped": round(known_src, 4),
        "within_budget": whole.within_budget and not problems,
        "summary": "; ".join(problems) if problems else whole.summary,
    }
    out["rule_set"] = text
    return out
