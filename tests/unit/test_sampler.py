"""Per-source rates from sampler intervals: what enforced traffic is.

A loaded shadow set keeps per-source entries of its own for the same
packets; its would-drops must not be read as drops, nor its packets
counted twice, by the blast-radius estimate or the guard's baseline."""

from __future__ import annotations

import numpy as np

from tidegate.kernel.layout import RULE_DEFAULT
from tidegate.observation.sampler import Column, Interval, Sampler

ACTIVE, SHADOW = 7, 8


def interval(t0: float, rows: list[tuple[int, int, int, int]], shadow_epoch: int) -> Interval:
    """rows: (source number, epoch, packets, drops)."""
    n = len(rows)
    lo = np.array([0xFFFF0000 | (int.from_bytes((0x0A000000 + r[0]).to_bytes(4, "big"), "little") << 32)
                   for r in rows], np.uint64)  # fmt: skip
    return Interval(
        t0, t0 + 5, np.zeros(n, np.uint64), lo, np.array([r[1] for r in rows], np.uint32),
        np.full(n, RULE_DEFAULT, np.uint8), np.zeros(n, np.uint8), np.array([r[2] for r in rows], np.uint64),
        np.array([r[3] for r in rows], np.uint64), np.zeros(n, np.uint64), np.zeros(n, np.uint64),
        (shadow_epoch,) if shadow_epoch >= 0 else (),
    )  # fmt: skip


def sampler_with(*ivs: Interval) -> Sampler:
    s = Sampler(kf=None, interval=5, window=300)
    s.epoch_names = {ACTIVE: {RULE_DEFAULT: "default"}, SHADOW: {RULE_DEFAULT: "default"}}
    s._intervals.extend(ivs)
    return s


def test_shadow_rows_are_neither_packets_nor_drops():
    # two sources send 100 packets each; the shadow set would drop all of source 1's
    iv = interval(0, [(1, ACTIVE, 100, 0), (2, ACTIVE, 100, 0), (1, SHADOW, 100, 100), (2, SHADOW, 100, 0)], SHADOW)
    r = sampler_with(iv).window_rates(300)
    assert sorted(r.addresses) == ["10.0.0.1", "10.0.0.2"]
    assert int(r.packets.sum()) == 200 and int(r.drops.sum()) == 0
    assert iv.enforced().tolist() == [True, True, False, False]


def test_a_promoted_shadow_counts_once_it_enforces():
    # interval 1: epoch 8 is the shadow; interval 2: it was promoted
    before = interval(0, [(1, ACTIVE, 50, 0), (1, SHADOW, 50, 50)], SHADOW)
    after = interval(5, [(1, SHADOW, 50, 40)], -1)
    r = sampler_with(before, after).window_rates(300)
    assert int(r.packets.sum()) == 100 and int(r.drops.sum()) == 40


def test_a_compact_column_gives_back_exactly_what_it_was_made_of():
    rng = np.random.default_rng(7)
    v4_lo = (rng.integers(0, 1 << 32, 1000, dtype=np.uint64) << np.uint64(32)) | np.uint64(0xFFFF0000)
    cases = {
        "ipv4 lo": v4_lo,
        "ipv6 lo": rng.integers(0, 1 << 63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1),
        "zeros": np.zeros(1000, np.uint64),
        "one epoch": np.full(1000, 7, np.uint32),
        "small counters": rng.integers(0, 200, 1000, dtype=np.uint64),
        "counters over 32 bits": rng.integers(0, 1 << 40, 1000, dtype=np.uint64),
        "first_ns near a large base": np.uint64(10**15) + rng.integers(0, 5 * 10**9, 1000, dtype=np.uint64),
        "empty": np.array([], np.uint64),
        "top bit set": np.array([1 << 63, (1 << 64) - 1, 0], np.uint64),
    }
    for name, v in cases.items():
        c = Column(v)
        back = c.values()
        assert back.dtype == v.dtype and np.array_equal(back, v), name
    assert Column(cases["zeros"]).nbytes == 0 and Column(cases["one epoch"]).nbytes == 0
    assert Column(cases["ipv4 lo"]).nbytes == 4000  # the address alone
    assert Column(cases["small counters"]).nbytes == 1000
    # made from another integer dtype, read in the column's own
    assert Column(np.array([3, 1, 2], np.int64), np.uint64).values().tolist() == [3, 1, 2]
    assert Column(np.array([3, 1, 2], np.int64), np.uint64).values().dtype == np.uint64


def test_an_interval_reads_its_columns_as_given():
    iv = interval(0, [(1, ACTIVE, 100, 0), (2, ACTIVE, 5, 5), (3, SHADOW, 1 << 40, 0)], SHADOW)
    assert len(iv) == 3
    assert iv.packets.tolist() == [100, 5, 1 << 40] and iv.packets.dtype == np.uint64
    assert iv.epoch.tolist() == [ACTIVE, ACTIVE, SHADOW] and iv.epoch.dtype == np.uint32
    assert iv.drops.tolist() == [0, 5, 0] and iv.new_drops.tolist() == [0, 0, 0]
    assert iv.nbytes < 3 * 54  # the 54 bytes a row took in full
