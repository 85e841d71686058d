"""The sampler's window stays bounded under a flood of one-off sources
(observation/fold.py): older intervals keep the sources at or above 1 pps
and sum the others per prefix; the answers that rest on the sums say so.

Pure logic above the kernel layer: a fake of the per-source table the
sampler reads, real sampler, window, estimate and insight reader."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from fixtures import rule_set
from tidegate.kernel.layout import addr_halves
from tidegate.observation import fold
from tidegate.observation import sampler as sampler_module
from tidegate.observation.reading import Reader
from tidegate.observation.sampler import Interval, Sampler
from tidegate.observation.top import top_sources
from tidegate.observation.window import SourceWindow
from tidegate.ruleset.parse import parse_rule_set
from tidegate.safety import estimate as safety

EPOCH, API, SINK = 3, 1, 2
ACTIVE = rule_set("safety-active")


def v4(a: str) -> tuple[int, int]:
    n = 0
    for part in a.split("."):
        n = n << 8 | int(part)
    return addr_halves(0xFFFF00000000 | n)


def interval(t0: float, rows: list[tuple[str, int, int, int]], seconds: float = 5.0, kind: int = 0) -> Interval:
    """rows: (IPv4 address, rule index, packets, drops), all of EPOCH."""
    n = len(rows)
    hl = [v4(r[0]) for r in rows]
    hi, lo = np.array([h for h, _ in hl], np.uint64), np.array([x for _, x in hl], np.uint64)
    return Interval(t0, t0 + seconds, hi, lo,
                    np.full(n, EPOCH, np.uint32), np.array([r[1] for r in rows], np.uint8), np.full(n, kind, np.uint8),
                    np.array([r[2] for r in rows], np.uint64), np.array([r[3] for r in rows], np.uint64),
                    np.zeros(n, np.uint64), np.zeros(n, np.uint64))  # fmt: skip


def one_offs(net: str, count: int, rule: int = API, drops: int = 0) -> list[tuple[str, int, int, int]]:
    """`count` sources of a /16 (net: "a.b"), one packet each."""
    return [(f"{net}.{i // 256}.{i % 256}", rule, 1, drops) for i in range(count)]


HEAVY = ("203.0.113.7", API, 200, 0)  # 40 pps over 5 s


def test_a_folded_interval_keeps_fast_sources_and_sums_the_others_per_prefix():
    iv = interval(0, one_offs("10.60", 1000) + [HEAVY, ("203.0.113.8", API, 4, 0), ("203.0.113.9", SINK, 5, 2)])
    f = iv.fold()
    # kept: at or above 1 pps over 5 s (5 packets); 4 packets in 5 s is under any limit
    assert sorted(SourceWindow([f]).select().addresses()) == ["203.0.113.7", "203.0.113.9"]
    g = f.folded
    assert g.bits4 == 24 and g.above_floor == 0
    nets = sorted((g.network(i)[0], int(g.sources[i]), int(g.packets[i]), int(g.peak[i])) for i in range(len(g)))
    assert nets == [("10.60.0.0", 256, 256, 1), ("10.60.1.0", 256, 256, 1), ("10.60.2.0", 256, 256, 1),
                    ("10.60.3.0", 232, 232, 1), ("203.0.113.0", 1, 4, 4)]  # fmt: skip
    # nothing lost: the kept rows and the sums hold every packet and drop
    assert int(f.packets.sum()) + int(g.packets.sum()) == int(iv.packets.sum())
    assert int(f.drops.sum()) + int(g.drops.sum()) == 2
    assert f.nbytes < iv.nbytes / 5


def test_a_fold_widens_its_prefix_to_stay_within_its_groups_and_counts_fast_sources_it_had_no_room_for():
    # 2,000 one-off sources over 2,000 /24s: more groups than allowed at /24 and /16 (8 /16s), so /8
    rows = [(f"10.{i % 8}.{i // 8}.1", API, 1, 0) for i in range(2000)]
    hi, lo = (np.array(c, np.uint64) for c in zip(*(v4(r[0]) for r in rows)))
    n = len(rows)
    g = fold.fold_rows(hi, lo, np.full(n, EPOCH, np.uint32), np.full(n, API, np.uint8), np.ones(n, np.uint64),
                       np.zeros(n, np.uint64), np.zeros(n, np.uint64), max_groups=4)  # fmt: skip
    assert (g.bits4, len(g), int(g.sources.sum())) == (8, 1, 2000)
    assert g.network(0) == ("10.0.0.0", 8)
    # more fast sources than a folded interval keeps: the heaviest stay, the rest are counted
    iv = interval(0, [(f"10.70.0.{i}", API, 10 + i, 0) for i in range(10)])
    f = iv.fold(max_kept=3)
    assert sorted(f.packets.tolist()) == [17, 18, 19] and f.folded.above_floor == 7
    assert int(f.folded.peak.max()) == 16


class ChurningTable:
    """The per-source map under a flood: every sample, `per` new one-off
    sources (one packet each) and a steady client that sends 50 packets."""

    def __init__(self, per: int):
        self.per, self.step = per, 0
        self.pk = 0

    def read_sources(self, columns=None):
        self.step += 1
        self.pk += 50
        addrs = [f"10.{80 + self.step % 100}.{i // 256}.{i % 256}" for i in range(self.per)] + ["192.0.2.10"]
        hl = [v4(a) for a in addrs]
        n = len(addrs)
        pk = np.ones(n, np.uint64)
        pk[-1] = self.pk
        return NS(addr_hi=np.array([h for h, _ in hl], np.uint64), addr_lo=np.array([lo for _, lo in hl], np.uint64),
                  epoch=np.full(n, EPOCH, np.uint32), rule=np.full(n, API, np.uint8), kind=np.zeros(n, np.uint8),
                  packets=pk, drops=np.zeros(n, np.uint64), new_drops=np.zeros(n, np.uint64),
                  first_ns=np.zeros(n, np.uint64), entries=n)  # fmt: skip

    def state(self):
        return NS(active=NS(epoch=EPOCH, slot=0), shadow=None)

    def slot_names(self, slot):
        return {API: "api", SINK: "sink"}

    def rule_name(self, slot, idx):
        return self.slot_names(slot)[idx]


def flooded_sampler(monkeypatch, samples: int = 8, per: int = 600, max_rows: int = 1000) -> Sampler:
    """A sampler that took `samples` intervals of 5 s of a ChurningTable."""
    s = Sampler(ChurningTable(per), interval=5, window=300, max_rows=max_rows)
    clock = iter(np.repeat(np.arange(0, 1000, 5.0), 2))  # a sample reads the clock twice
    monkeypatch.setattr(sampler_module, "time", NS(monotonic=lambda: float(next(clock))))
    for _ in range(samples + 1):
        s.sample()
    return s


def test_the_window_keeps_full_rows_only_for_its_newest_intervals_within_the_budget(monkeypatch):
    s = flooded_sampler(monkeypatch)
    ivs = s.intervals()
    assert len(ivs) == 8
    full = [iv for iv in ivs if iv.folded is None]
    # 601 rows an interval against a budget of 1,000: the newest one alone stays full
    assert full == [ivs[-1]] and len(ivs[-1]) == 601
    # each older one keeps its steady client (50 packets in 5 s) and sums its 600 one-offs
    for iv in ivs[:-1]:
        assert SourceWindow([iv]).select().addresses() == ["192.0.2.10"]
        assert int(iv.folded.sources.sum()) == 600 and int(iv.folded.packets.sum()) == 600
    assert sum(len(iv) for iv in ivs) == 601 + 7


def test_window_rates_count_folded_sources_as_classes_with_every_packet(monkeypatch):
    s = flooded_sampler(monkeypatch)
    r = s.window_rates(300)
    folded = r.folded
    assert int(r.packets.sum()) == 8 * 600 + 8 * 50
    assert int(r.sources[folded].sum()) == 7 * 600 and int((~folded).sum()) == 601
    assert all(n.endswith("/24") for n, f in zip(r.networks, folded) if f)
    assert r.peak_pps[folded].max() == pytest.approx(0.2)  # one packet in 5 s


def folded_agent(s: Sampler):
    return NS(options=NS(packet_budget=0.01, source_budget=0.05, estimate_window=300.0, no_blast_check=False),
              kf=NS(state=lambda: NS(active=NS(version=1))), rule_set_of=lambda v: parse_rule_set(ACTIVE, "active"),
              sampler=s)  # fmt: skip


def test_the_estimate_judges_folded_sources_by_prefix_and_says_so(monkeypatch):
    s = flooded_sampler(monkeypatch)
    agent = folded_agent(s)
    # a tighter per-source limit: the steady client (10 pps) is cut, no one-off source can be
    tight = parse_rule_set(ACTIVE.replace("pps: 100, burst: 100", "pps: 1, burst: 1"), "tight")
    est = safety.estimate(agent, tight)
    assert est.sources_seen == 7 * 600 + 601
    assert est.sources_newly_dropped == 1 and est.folded_sources == 7 * 600
    assert est.folded_packet_share == pytest.approx(4200 / 5200)
    assert est.summary.startswith("would newly drop ") and est.summary.endswith(
        "; 4200 of these sources (80.8% of packets) sent under 1 pps in intervals the sampler folded: counted by "
        "prefix as classes")  # fmt: skip
    # a deny list over the flood's space drops the classes it covers, counted by their sources: steps
    # 2 to 9 sent from 10.82 to 10.89, all folded but the newest (10.89: 600 sources of their own)
    deny = parse_rule_set('deny: ["10.82.0.0/16", "10.89.0.0/16"]\n' + ACTIVE, "deny")
    est = safety.estimate(agent, deny)
    assert est.sources_newly_dropped == 1200
    # the classes (256 packets each over the window) before the newest interval's one-off sources
    assert sorted(a["address"] for a in est.top_affected[:3]) == ["10.82.0.0/24", "10.82.1.0/24", "10.82.2.0/24"]


def test_insight_figures_leave_folded_intervals_out_and_say_so(monkeypatch):
    s = flooded_sampler(monkeypatch)
    r = Reader(120, 5)
    ivs = s.intervals()
    d = r.add(ivs[-1], window=ivs[:-1])
    assert d["folded_intervals"] == 5  # the 30 s window held 6 intervals, 5 of them folded
    assert d["intervals"] == 1 and d["sources"] == 601
    assert d["reading"].startswith("over the newest 5 s only")
    # the reader holds what the sampler holds, not the full intervals it folded
    assert all(a is b for a, b in zip(r.window, ivs[-6:]))


def test_top_sources_over_a_window_say_how_many_of_its_intervals_were_folded(monkeypatch):
    s = flooded_sampler(monkeypatch)
    rows, seconds, folded = top_sources(s.kf, s, 3, "packets", window=300)
    # the steady client's 8 x 50 packets; the folded intervals' one-off sources are not summed
    assert (rows[0]["address"], rows[0]["packets"], seconds, folded) == ("192.0.2.10", 400, 40.0, 7)
    assert top_sources(s.kf, s, 3, "packets")[2] == 0  # the last interval: never folded
