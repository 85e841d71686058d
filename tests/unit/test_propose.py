"""From a reading to a candidate rule set (pure part of propose.py; the
what-if through a real agent is in tests/e2e/test_insight.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import yaml

from fixtures import rule_set
from tidegate.safety.propose import candidate, known_split, spared
from tidegate.ruleset.parse import parse_rule_set
from tidegate.observation.reading import KnownSources
from tidegate.observation.window import SourceRates, address_halves, source_keys

RULES = rule_set("propose")


def rates(rows):
    """rows: (address, rule, packets over a 10 s window)."""
    n = len(rows)
    pk = np.array([r[2] for r in rows], float)
    return SourceRates([r[0] for r in rows], [r[1] for r in rows], np.zeros(n, np.uint32), pk / 10, np.zeros(n),
                       10.0, pk, np.zeros(n), np.full(n, 10.0))  # fmt: skip


RS = parse_rule_set(RULES)
CLIENTS = [(f"81.2.0.{i}", "api", 100) for i in range(1, 21)]


def test_a_spread_flood_on_the_default_gets_a_slash0_aggregate_limit_and_nothing_else_changes():
    r = rates(CLIENTS + [(f"{i}.1.2.3", "default", 5) for i in range(1, 200)] + [("81.2.0.1", "default", 300)])
    known = np.array([a.startswith("81.2.") for a in r.addresses])
    data, why = candidate(RS, {"verdict": "flood", "new_packets_by_rule": {"default": 1.0}}, r, known)
    assert why["action"] == "aggregate-limit" and why["rule"] == "default"
    new = parse_rule_set(yaml.safe_dump(data))
    pl = new.defaults.prefix_limit
    assert (pl.ipv4_prefix, pl.ipv6_prefix) == (0, 0)
    assert pl.limit.pps == 100  # 2 x the known 30 pps on the default, at least 100
    # the rules that inherited the old default prefix limit keep it
    assert new.rule("api").prefix_limit == RS.rule("api").prefix_limit
    assert new.rule("sink").prefix_limit == RS.rule("sink").prefix_limit
    assert new.rule("api").limit == RS.rule("api").limit


def test_a_concentrated_flood_is_denied_unless_known_sources_share_its_prefix():
    reading = {"verdict": "flood", "new_packets_by_rule": {"sink": 1.0}, "dense_prefix_packet_share": 0.9,
               "top_16_packet_share": 0.95, "top_16s": [{"prefix": "198.18.0.0/16", "packet_share": 0.95}],
               "top_prefixes": []}  # fmt: skip
    flood = [(f"198.18.{i // 250}.{i % 250}", "sink", 3) for i in range(1000)]
    r = rates(CLIENTS + flood)
    known = np.array([a.startswith("81.2.") for a in r.addresses])
    data, why = candidate(RS, reading, r, known)
    assert why["action"] == "deny" and data["deny"] == ["198.18.0.0/16"]
    # one known client inside the prefix: a prefix limit instead of a deny
    r2 = rates(CLIENTS + flood + [("198.18.200.1", "sink", 50)])
    known2 = np.array([a.startswith("81.2.") or a == "198.18.200.1" for a in r2.addresses])
    data2, why2 = candidate(RS, reading, r2, known2)
    assert why2["action"] == "prefix-limit" and "deny" not in data2
    assert parse_rule_set(yaml.safe_dump(data2)).rule("sink").prefix_limit.ipv4_prefix == 16


def test_a_heavy_hitter_gets_a_per_source_limit_at_twice_the_fastest_other_source():
    r = rates(CLIENTS + [("203.0.113.99", "api", 50000)])
    known = np.ones(len(r.addresses), bool)
    data, why = candidate(RS, {"verdict": "heavy-hitter", "heavy_hitters": [{"source": "203.0.113.99"}]}, r, known)
    assert why["action"] == "per-source-limit" and why["rule"] == "api" and why["pps"] == 20
    assert parse_rule_set(yaml.safe_dump(data)).rule("api").limit.pps == 20


def test_a_surge_proposes_nothing_and_says_why():
    r = rates(CLIENTS)
    data, why = candidate(RS, {"verdict": "surge"}, r, np.ones(len(CLIENTS), bool))
    assert data is None and why["action"] == "none" and "legitimate" in why["reason"]


def test_an_aggregate_limit_shared_with_known_clients_costs_them_their_share():
    from tidegate.safety.propose import shared_bucket_loss

    # 20 known clients at 10 pps on 'sink' and a 10x bigger flood there: a
    # 400 pps bucket for 2,200 pps drops 82% of everyone's packets
    r = rates([(f"81.2.0.{i}", "sink", 100) for i in range(1, 21)]
              + [(f"{i}.1.2.3", "sink", 100) for i in range(1, 201)] + CLIENTS)  # fmt: skip
    lost = shared_bucket_loss(r, "sink", 400, None)
    known = np.array([a.startswith("81.2.") for a in r.addresses])
    on_sink = np.array([x == "sink" for x in r.rules])
    assert np.allclose(lost[on_sink] / r.packets[on_sink], 1 - 400 / 2200)
    assert not lost[~on_sink].any()  # 'api' has its own buckets
    assert lost[known].sum() > 0
    # per prefix: only the bucket over the limit loses packets
    lost16 = shared_bucket_loss(r, "sink", 400, ["81.2.0.0/16", "1.0.0.0/8"])
    assert not lost16[[a.startswith("81.2.") for a in r.addresses]].any()


def test_the_heavy_hitters_a_change_aims_at_are_not_known_clients_to_spare():
    # a hitter that has sent for longer than the baseline window is known by
    # age; the blast radius and the guard of a change aimed at it must not
    # count it among the clients it has to spare (it alone would be the loss)
    r = rates(CLIENTS + [("203.0.113.99", "api", 50000)])
    seen = KnownSources()
    seen.update(*address_halves(r.addresses), now=0.0)
    agent = SimpleNamespace(sampler=SimpleNamespace(window_rates=lambda seconds, kind: r),
                            options=SimpleNamespace(estimate_window=300.0), insight=SimpleNamespace(known=seen))
    hitters = [{"source": "203.0.113.99", "packet_share": 0.96}]
    reading = {"verdict": "heavy-hitter", "heavy_hitters": hitters, "known_before": 5.0}
    _, known = known_split(agent, reading)
    assert known.tolist() == [True] * len(CLIENTS) + [False]
    spare, is_spared = spared(agent, reading)
    assert "203.0.113.99" not in spare.addresses and len(spare.addresses) == len(CLIENTS)
    assert is_spared(source_keys(*address_halves(r.addresses))).tolist() == known.tolist()
    # in a flood reading the heaviest sources listed are no target: known stays known by age
    _, known_in_flood = known_split(agent, {**reading, "verdict": "flood"})
    assert known_in_flood.all()
