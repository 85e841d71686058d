"""Review and Insight travel as typed messages: every key the producers make
has a field of the same name, and dict -> message -> dict (as `-o json`
prints it) gives the same dict back.

The readings are the shapes library's (examples/shapes, every shape at one
age, plus the first reading and the reading before any sample); the reviews
come from the real review recorder (safety/review.py) over a real store, fed
synthesized sampler intervals. One deliberate difference: a key the dict
does not have comes back with its field's zero value, or null for an unset
sub-message or `optional` field (the message cannot tell "absent" from
"None"); a key that is None comes back None.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from tidegate.api import messages
from tidegate.cli.output import message_to_dict
from tidegate.observation.reading import Reader
from tidegate.observation.window import SourceRates
from tidegate.observation.shapes import EPOCH, baseline_reader, interval, load_library, read_shape
from tidegate.safety.propose import candidate
from tidegate.ruleset.parse import parse_rule_set
from tidegate.safety.review import Reviews
from tidegate.store import VersionStore

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
ZERO = (None, 0, 0.0, "", False, [], {})


def zero(v) -> bool:
    return all(zero(x) for x in v.values()) if isinstance(v, dict) else v in ZERO


def assert_round_trip(data: dict, back: dict, where: str = "") -> None:
    """`back` holds every key of `data` with the same value and JSON type; its other keys are zero or null."""
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(back.get(k), dict) and k not in ("by_reason_pps", "new_packets_by_rule"):
            assert_round_trip(v, back[k], f"{where}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            assert len(back[k]) == len(v), f"{where}{k}"
            for i, (a, b) in enumerate(zip(v, back[k])):
                assert_round_trip(a, b, f"{where}{k}[{i}].")
        else:
            assert json.dumps(back.get(k), sort_keys=True) == json.dumps(v, sort_keys=True), f"{where}{k}"
    extra = {k: v for k, v in back.items() if k not in data and not zero(v)}
    assert not extra, f"{where}: keys the dict did not have came back non-zero: {extra}"


# ------------------------------------------------------------- readings
def shape_readings() -> list[tuple[str, dict]]:
    out = []
    by_len: dict[float, tuple] = {}
    for s in load_library(SHAPES):
        if s.seconds not in by_len:
            by_len[s.seconds] = baseline_reader(120.0, s.seconds, 5.0, 7)
        out.append((s.name, read_shape(s, 120.0, 5.0, 7, start=by_len[s.seconds])))
    r = Reader(sample_interval=5.0)
    out.append(("no sample yet", r.read(0.0)))
    first = interval(0.0, 5.0, [(np.arange(1, 50, dtype=np.uint32) + (81 << 24), np.full(49, 5, np.uint64),
                                 np.zeros(49, np.uint64), 0)])  # fmt: skip
    r.add(first)
    out.append(("the first sample (learning)", r.read(5.0)))
    out.append(("stale", r.read(60.0)))
    return out


READINGS = shape_readings()


@pytest.mark.parametrize("name,reading", READINGS, ids=[n for n, _ in READINGS])
def test_every_reading_round_trips_through_the_message(name, reading):
    data = {**reading, "sampler": {"interval_seconds": 5.0, "cpu_seconds": 0.25, "last_sample_seconds": 0.0123}}
    msg = messages.insight(data)
    assert_round_trip(data, message_to_dict(msg))
    assert msg.reading == reading["reading"] and msg.verdict == reading.get("verdict", "")


def test_every_shape_made_a_verdict():
    verdicts = {d.get("verdict") for _, d in READINGS}
    assert {"flood", "surge", "flash-crowd", "heavy-hitter", "learning"} <= verdicts, verdicts


def test_proposals_round_trip():
    """Every kind of proposal candidate() makes, with the what-if propose() adds."""
    rs = parse_rule_set("rules:\n  - name: api\n    protocol: udp\n    dst_ports: [8080]\n    limit: {pps: 50}\n")
    addrs = [f"81.2.0.{i}" for i in range(1, 21)] + [f"198.18.0.{i}" for i in range(1, 200)]
    n = len(addrs)
    pk = np.full(n, 30.0)
    rates = SourceRates(addrs, ["api"] * n, np.zeros(n, np.uint32), pk / 10, np.zeros(n), 10.0, pk, np.zeros(n),
                        np.full(n, 10.0))  # fmt: skip
    known = np.array([a.startswith("81.2.") for a in addrs])
    what_if = {"window_seconds": 300.0, "flood_sources": 199, "flood_packet_share_dropped": 0.99, "known_sources": 20,
               "known_packet_share_dropped": 0.0, "known_source_share_dropped": 0.0, "within_budget": True,
               "summary": "within budget"}  # fmt: skip
    readings = [
        {"verdict": "flood", "new_packets_by_rule": {"api": 1.0}},
        {"verdict": "flood", "new_packets_by_rule": {"api": 1.0}, "dense_prefix_packet_share": 0.9,
         "top_16_packet_share": 0.95, "top_16s": [{"prefix": "198.18.0.0/16", "packet_share": 0.95}], "top_prefixes": []},
        {"verdict": "heavy-hitter", "heavy_hitters": [{"source": "198.18.0.1", "packet_share": 0.6}]},
        {"verdict": "surge"},
    ]  # fmt: skip
    actions = set()
    for reading in readings:
        data, p = candidate(rs, reading, rates, known)
        p.update(verdict=reading["verdict"], based_on_version=3)
        if data is not None:
            p.update(what_if=what_if, rule_set="rules: []\n")
        actions.add(p["action"])
        msg = messages.insight({"reading": "r", "proposal": p})
        assert_round_trip(p, message_to_dict(msg)["proposal"])
    assert actions == {"aggregate-limit", "deny", "per-source-limit", "none"}


def test_a_key_without_a_field_is_an_error():
    with pytest.raises(ValueError, match="no field named \"brand_new_figure\""):
        messages.insight({"reading": "r", "brand_new_figure": 1.0})
    with pytest.raises(ValueError, match="no field named \"colour\""):
        messages.review({"version": 1, "before": {"seconds": 1.0, "colour": "red"}})
    # the service reads stored reviews leniently: one from an older agent is served without the unknown key
    assert messages.review({"version": 4, "colour": "red"}, strict=False).version == 4


# --------------------------------------------------------------- reviews
class Parts:
    """What the review recorder reads: a real store, the rest synthesized."""

    def __init__(self, state_dir):
        self.store = VersionStore.open(state_dir)
        self.ivs: list = []
        self.sampler = NS(intervals=lambda seconds=None: list(self.ivs), epoch_names={EPOCH: {0: "api", 1: "sink"}})
        self.kf = NS(state=lambda: NS(active=NS(epoch=EPOCH)), active_slot=lambda: NS(epoch=EPOCH),
                     read_sources=self.no_kernel)  # fmt: skip
        self.history = NS(take=lambda: None, between=self.between)

    @staticmethod
    def no_kernel():
        raise OSError("no kernel here")

    @staticmethod
    def between(t0, t1):
        return {"pass": 900, "rate": 100, "_seconds": 5.0, "_rules": {"api": (800, 100), "sink": (100, 0)}}

    def version(self, reason: str) -> int:
        v = self.store.begin_version("rules: []\n", "d", "alice", reason)
        self.store.commit_active(v, "apply")
        return v

    def drops(self, first: int, n: int) -> None:
        now = time.monotonic()
        ips = np.arange(first, first + n, dtype=np.uint32) + (10 << 24)
        self.ivs.append(interval(now - 0.5, now + 0.5, [(ips, np.full(n, 9, np.uint64), np.full(n, 7, np.uint64), 0)]))


def recorded_reviews(tmp_path) -> list[tuple[str, dict]]:
    agent = Parts(tmp_path)
    reviews = Reviews(agent.kf, agent.sampler, agent.store, agent.history, period=3600.0)
    out = []
    v1 = agent.version("first")
    reviews.activated(v1, "apply")
    agent.drops(1, 12)
    out.append(("live", reviews.get(v1)))
    v2 = agent.version("tighter")
    agent.store.audit("guard-rollback", "rolled-back", "guard", "agent", "drop share 60%", v1)
    reviews.activated(v2, "rollback", cause="guard-drop-share")
    reviews.guard_fired(v1)
    out.append(("replaced by a guard rollback", reviews.get(v1)))
    reviews.stop()
    out.append(("agent stopped", reviews.get(v2)))
    v3 = agent.version("before reviews were recorded")
    out.append(("unwatched", reviews.get(v3)))
    v4 = agent.store.begin_version("rules: []\n", "d", "bob", "never applied")
    out.append(("never active", reviews.get(v4)))
    reviews.activated(v3, "promote")  # in progress, then the agent crashes
    reviews.recover([v3])
    out.append(("recovered after a crash", json.loads(agent.store.get_review(v3))))
    return out


def test_every_review_round_trips_through_the_message(tmp_path):
    recorded = recorded_reviews(tmp_path)
    kinds = {name: d for name, d in recorded}
    assert kinds["replaced by a guard rollback"]["ended"]["kind"] == "replaced"
    assert kinds["live"]["top_newly_dropped"] and kinds["live"]["ended"] is None
    for name, data in recorded:
        msg = messages.review(data)
        back = message_to_dict(msg)
        assert_round_trip(data, back, f"{name}: ")
    guarded = messages.review(kinds["replaced by a guard rollback"])
    assert guarded.guard_fired and guarded.ended.cause == "guard-drop-share" and guarded.guard[0].action == "guard-rollback"
    assert getattr(guarded.before.by_rule_pps["api"], "pass") == 160.0
    unwatched = messages.review(kinds["unwatched"])
    assert not unwatched.HasField("newly_dropped_sources") and not unwatched.HasField("ended")
