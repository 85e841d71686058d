"""Pure fleet logic: wave plans, selectors, labels, key layout, summed shadow numbers."""

import pytest

from tidegate.fleet.driver import sum_shadow
from tidegate.fleet.keys import FleetError, Keys, matches, parse_labels, parse_waves, plan_waves


@pytest.mark.parametrize("spec,hosts,want", [
    ("1,10%,50%,100%", 40, [1, 4, 20, 40]),
    ("1,3,100%", 5, [1, 3, 5]),
    ("1,3,rest", 5, [1, 3, 5]),
    ("1,10%,50%", 5, [1, 3, 5]),       # the last wave always takes all; 10% of 5 rounds up to 1 and adds nobody
    ("5,100%", 3, [3]),                # clamped, duplicates dropped
    ("100%", 1, [1]),
])  # fmt: skip
def test_waves_are_cumulative(spec, hosts, want):
    assert parse_waves(spec, hosts) == want


@pytest.mark.parametrize("spec", ["0,100%", "x", "1,150%", "10,5", "-1"])
def test_bad_waves_are_refused(spec):
    with pytest.raises(FleetError):
        parse_waves(spec, 20)


def test_plan_is_sorted_and_covers_every_host_once():
    hosts = [f"h{i:02d}" for i in range(17, 0, -1)]
    waves = plan_waves(hosts, "1,10%,50%,100%")
    assert [len(w) for w in waves] == [1, 1, 7, 8]
    assert sum(waves, []) == sorted(hosts)


def test_labels_and_selectors():
    labels = parse_labels(["zone=a", "role=edge"])
    assert matches(labels, {"zone": "a"}) and not matches(labels, {"zone": "b"}) and matches(labels, {})
    with pytest.raises(FleetError):
        parse_labels(["novalue"])


def test_key_layout_and_names():
    k = Keys("edge")
    assert k.desired("h1") == "/tidegate/edge/desired/h1" and k.status("h1") == "/tidegate/edge/status/h1"
    assert k.version("ab") == "/tidegate/edge/versions/ab" and k.rollout("r") == "/tidegate/edge/rollouts/r"
    for bad in ("", "a/b", "../x", "a b"):
        with pytest.raises(FleetError):
            Keys(bad)


def test_shadow_sums_are_fleet_wide_shares():
    sts = {"a": {"shadow_numbers": {"packets": 1000, "would_drop_new": 10, "sources_seen": 10, "sources_would_drop": 1}},
           "b": {"shadow_numbers": {"packets": 3000, "would_drop_new": 390, "sources_seen": 30, "sources_would_drop": 3}},
           "c": {}}  # fmt: skip
    s = sum_shadow(["a", "b", "c"], sts)
    assert s["total"]["packets"] == 4000 and s["total"]["would_drop_new"] == 400
    assert s["total"]["packet_share"] == pytest.approx(0.1) and s["total"]["source_share"] == pytest.approx(0.1)
    assert s["hosts"]["c"]["packets"] == 0
