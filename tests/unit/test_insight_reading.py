"""The plain-words reading is built from the figures alone: each verdict,
and the numbers it must state (the veth tests in tests/e2e/test_insight.py
produce the figures from real traffic; the 2-minute trend needs more history
than a test should wait for, so it is checked here)."""

from __future__ import annotations

from tidegate.insight import _reading

BASE = {
    "pps": 1200.0, "traffic_factor_2min": None, "known_source_packet_share": 0.5, "active_sources": 400,
    "new_source_share": 0.1, "interval_seconds": 5.0, "median_source_pps": 3.0, "median_source_pps_before": None,
    "drops_by_rule": {}, "heaviest_source": "198.51.100.1", "heaviest_source_share": 0.05,
    "sources_per_prefix": 1.2, "distinct_prefixes": 330, "top_prefixes_packet_share": 0.1,
    "top_prefixes": [{"prefix": "198.51.100.0/24", "packet_share": 0.04, "sources": 3}],
}  # fmt: skip


def reading(**changes) -> tuple[str, str]:
    return _reading({**BASE, **changes})


def test_surge_being_limited_states_trend_known_share_and_rule():
    verdict, text = reading(pps=7200.0, traffic_factor_2min=6.0, known_source_packet_share=0.94,
                            median_source_pps=3.1, median_source_pps_before=3.0,
                            drops_by_rule={"api": {"sources": 12000, "drop_pps": 2900.0, "drop_share_of_rule": 0.41}})  # fmt: skip
    assert verdict == "surge"
    assert "traffic x6 in 2 min (7,200 pps)" in text and "94% of packets from sources seen before" in text
    assert "median 3.1 pps per source (was 3)" in text
    assert "rule 'api' drops 41% of its packets from 12,000 sources" in text
    assert "looks like a legitimate surge being limited, not an attack" in text and "not a verdict" in text


def test_growth_from_known_sources_without_drops_is_a_surge_too():
    verdict, text = reading(traffic_factor_2min=2.0, known_source_packet_share=0.8)
    assert verdict == "surge" and "being limited" not in text


def test_concentrated_flood_names_its_prefixes():
    verdict, text = reading(new_source_share=0.97, known_source_packet_share=0.02, median_source_pps=0.4,
                            active_sources=12000, distinct_prefixes=64, sources_per_prefix=187.5,
                            top_prefixes_packet_share=0.16,
                            top_prefixes=[{"prefix": f"198.18.{i}.0/24", "packet_share": 0.02, "sources": 190}
                                          for i in range(5)])  # fmt: skip
    assert verdict == "flood"
    assert "concentrated in 64 prefixes (187.5 sources each, top 10 send 16%" in text
    assert "heaviest 198.18.0.0/24, 198.18.1.0/24, 198.18.2.0/24" in text


def test_random_spoofing_is_a_flood_spread_over_the_space():
    verdict, text = reading(new_source_share=0.99, known_source_packet_share=0.0, median_source_pps=0.2,
                            active_sources=50000, distinct_prefixes=49000, sources_per_prefix=1.0)
    assert verdict == "flood" and "spread over 49,000 prefixes (random spoofing" in text


def test_heavy_hitter_is_named_and_wins_over_the_rest():
    verdict, text = reading(heaviest_source="203.0.113.99", heaviest_source_share=0.85, new_source_share=0.9)
    assert verdict == "heavy-hitter" and "203.0.113.99 sends 85% of packets" in text


def test_nothing_clear_says_so():
    verdict, text = reading()
    assert verdict == "normal" and "no clear surge or flood pattern" in text
