"""The insight reading from synthesized sampler intervals (pure logic: the
veth tests in tests/e2e/test_insight.py read real traffic).

What the issue found wrong: "new" was measured per sample interval, so a
spoofed flood whose sources repeat read normal after its first second.
These tests hold the figures to the window and the baseline instead."""

from __future__ import annotations

import numpy as np
import pytest

from tidegate.observation import shapes
from tidegate.observation.reading import Reader
from tidegate.observation.shapes import Group, Shape, baseline_reader, interval, v4_halves

_BASELINES: dict = {}


def read_shape(shape: Shape, age: float, interval_s: float = 5.0) -> dict:
    """shapes.read_shape, with the background before the shape computed once."""
    key = (age, shape.seconds, interval_s)
    if key not in _BASELINES:
        _BASELINES[key] = baseline_reader(age, shape.seconds, interval_s, 7)
    return shapes.read_shape(shape, age, interval_s, 7, start=_BASELINES[key])

FLOOD = Shape("spoofed flood, pool of 100k", "flood", [Group("new", 20000, 100000, ["whole"])])
CROWD = Shape("flash crowd", "flash-crowd", [Group("new", 300, 600)])
QUIET = Shape("quiet", "normal", [])


@pytest.mark.parametrize("interval_s", [1.0, 5.0])
def test_a_repeating_spoofed_flood_reads_flood_whatever_the_sample_interval(interval_s):
    d = read_shape(FLOOD, 120, interval_s)
    assert d["verdict"] == "flood", d["reading"]
    # the figures come from the window, not the interval: most sources are new
    # although each repeats several times in it
    assert d["new_source_share"] >= 0.95 and d["known_source_packet_share"] <= 0.1
    assert d["packets_per_source"] >= 2
    assert d["impossible_source_share"] >= 0.08  # 0/8, 127/8 and 224/3 are 1/8 of the space
    assert "space no client sends from" in d["reading"]


def test_figures_agree_between_sample_intervals():
    a, b = read_shape(CROWD, 120, 1.0), read_shape(CROWD, 120, 5.0)
    assert a["verdict"] == b["verdict"] == "flash-crowd"
    assert abs(a["new_sources"] - b["new_sources"]) <= 30  # ~600 either way
    assert abs(a["known_source_packet_share"] - b["known_source_packet_share"]) <= 0.05
    assert abs(a["pps"] - b["pps"]) / b["pps"] <= 0.05


def test_a_flood_longer_than_the_baseline_window_keeps_its_sources_new():
    # 5 minutes of flood against a 2-minute baseline window: its sources were
    # first seen within the episode, so they never become known
    long = Shape(FLOOD.name, "flood", [Group("new", 5000, 100000, ["whole"])], seconds=300)
    d = read_shape(long, 600, 5.0)
    assert d["verdict"] == "flood", d["reading"]
    assert d["known_source_packet_share"] <= 0.1


def test_the_reading_states_its_figures_and_a_confidence():
    d = read_shape(FLOOD, 3600, 5.0)
    assert 0 < d["confidence"] <= 1
    for text in (f"{d['pps']:,.0f} pps", f"its baseline of {d['baseline_pps']:,.0f}",
                 "of packets from known sources", f"{d['sources']:,} sources in 30 s",
                 f"confidence {d['confidence']:.0%}", "a hint, not a verdict"):  # fmt: skip
        assert text in d["reading"], (text, d["reading"])


def test_a_young_agent_reads_with_less_confidence():
    young, old = read_shape(FLOOD, 30, 5.0), read_shape(FLOOD, 3600, 5.0)
    assert young["verdict"] == old["verdict"] == "flood"
    assert young["confidence"] < old["confidence"]
    assert young["baseline_seconds"] < 120 <= old["baseline_seconds"]


def test_normal_is_only_for_traffic_like_its_baseline():
    assert read_shape(QUIET, 3600)["verdict"] == "normal"
    # the same clients at a fifth of their rate: not like the baseline
    drop = Shape("traffic falls away", "unusual", [Group("known", 100)])
    d = read_shape(drop, 3600)
    assert d["verdict"] == "unusual", d["reading"]
    assert d["traffic_factor"] < 0.5


def test_a_reading_older_than_two_sample_intervals_says_so():
    reader, _, t = baseline_reader(60, 0, 5.0, seed=1)
    fresh = reader.read(t + 9.0)
    stale = reader.read(t + 11.0)
    assert not fresh["stale"] and "STALE" not in fresh["reading"]
    assert stale["stale"] and stale["reading"].startswith("STALE: the newest sample is 11 s old")
    assert stale["confidence"] < fresh["confidence"]


def test_first_sample_is_the_baseline_not_a_finding():
    r = Reader(sample_interval=5.0, start=0.0)
    hi, lo = v4_halves(np.arange(0x51020000, 0x51020000 + 100, dtype=np.uint32))
    iv = interval(0, 5, [(np.arange(0x51020000, 0x51020000 + 100, dtype=np.uint32), np.full(100, 5, np.uint64),
                          np.zeros(100, np.uint64), 255)])  # fmt: skip
    assert r.add(iv)["verdict"] == "learning"
    iv2 = interval(5, 10, [(np.arange(0x51020000, 0x51020000 + 100, dtype=np.uint32), np.full(100, 5, np.uint64),
                           np.zeros(100, np.uint64), 255)])  # fmt: skip
    d = r.add(iv2)
    assert d["verdict"] == "normal" and d["known_source_packet_share"] == 1.0
    assert r.known.first_seen(hi, lo).max() == 5.0


def test_no_samples_yet_says_wait():
    assert "wait a few seconds" in Reader().read(10.0)["reading"]


def test_shape_files_must_name_a_verdict(tmp_path):
    from tidegate.observation.shapes import load_shape

    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nexpect: attack\ngroups: []\n")
    with pytest.raises(ValueError, match="expect must be one of"):
        load_shape(p)


class Traffic:
    """1 s intervals for a Reader with the e2e agent's 3 s baseline and window:
    200 known clients at 1 pps on rule 1, plus whatever a step adds."""

    def __init__(self):
        self.rng = np.random.default_rng(3)
        self.reader = Reader(baseline_seconds=3.0, sample_interval=1.0, start=0.0, window_seconds=3.0)
        self.clients = np.arange(0x0A4D0000, 0x0A4D0000 + 200, dtype=np.uint32)  # 10.77.0.0/24
        self.t = 0.0

    def step(self, seconds: int, pool: np.ndarray | None = None, pps: int = 0) -> list[dict]:
        out = []
        for _ in range(seconds):
            parts = [(self.clients, np.ones(200, np.uint64), np.zeros(200, np.uint64), 1)]
            if pool is not None:
                ips, pk = np.unique(self.rng.choice(pool, pps), return_counts=True)
                parts.append((ips, pk.astype(np.uint64), np.zeros(len(ips), np.uint64), 2))
            out.append(self.reader.add(interval(self.t, self.t + 1, parts)))
            self.t += 1
        return out


def test_a_floods_sources_do_not_turn_known_once_it_ends():
    # the lab's /16 flood, a pause longer than the baseline window, then a
    # spoofed flood over the whole space on the same rule: the first flood's
    # sources are no known clients of the second (a /0 limit's what-if counted
    # them as known, and so seemed to drop known clients' packets)
    tr = Traffic()
    tr.step(10)
    lab = (0xC6120000 + tr.rng.integers(0, 65536, 20000)).astype(np.uint32)  # 198.18.0.0/16
    assert "flood" in [d["verdict"] for d in tr.step(4, lab, 2000)]
    calm = tr.step(6)
    assert calm[-1]["verdict"] not in ("flood", "mixed")
    spread = tr.rng.integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32)
    d = tr.step(5, spread, 8000)[-1]
    assert d["verdict"] == "flood", d["reading"]
    first = tr.reader.known.first_seen(*v4_halves(np.unique(lab)))
    assert not (first <= d["known_before"]).any()
    # the clients stay known
    assert (tr.reader.known.first_seen(*v4_halves(tr.clients)) <= d["known_before"]).all()


def test_a_flood_that_reads_as_a_crowd_at_first_keeps_its_first_sources_new():
    # a spoofed flood ramping up slowly reads as a crowd for longer than two
    # windows before it reads as a flood: its first sources stay new
    tr = Traffic()
    tr.step(10)
    spread = tr.rng.integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32)
    ramp = tr.step(8, spread, 80)
    assert "flood" not in [d["verdict"] for d in ramp], [d["verdict"] for d in ramp]
    d = tr.step(3, spread, 8000)[-1]
    assert d["verdict"] == "flood", d["reading"]
    assert d["known_before"] < 11  # before the ramp's first interval ended
    assert d["known_source_packet_share"] <= 0.05
