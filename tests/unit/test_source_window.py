"""SourceWindow: per-source window maths over sampler intervals, on
intervals built by hand (pure logic above the kernel layer).

Addresses are keyed as the kernel keys them: 16 bytes loaded as two
little-endian u64 halves, IPv4 as ::ffff:a.b.c.d."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest

from tidegate.observation.sampler import Interval
from tidegate.observation.window import (
    DroppedSince,
    SourceWindow,
    address_halves,
    addresses,
    group_rows,
    network_index,
    prefix_keys,
    prefix_name,
    source_keys,
)

ACTIVE, SHADOW, OLD = 7, 8, 6


def halves(address: str) -> tuple[int, int]:
    a = ipaddress.ip_address(address)
    raw = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a).packed
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def interval(t0: float, rows, t1: float | None = None, shadow=()) -> Interval:
    """rows: (address, epoch, rule, kind, packets, drops, new_drops[, first_ns])."""
    hl = [halves(r[0]) for r in rows]

    def col(i, dtype, default=0):
        return np.array([r[i] if len(r) > i else default for r in rows], dtype)

    return Interval(t0, t0 + 5 if t1 is None else t1, np.array([h for h, _ in hl], np.uint64),
                    np.array([lo for _, lo in hl], np.uint64), col(1, np.uint32), col(2, np.uint8), col(3, np.uint8),
                    col(4, np.uint64), col(5, np.uint64), col(6, np.uint64), col(7, np.uint64), tuple(shadow))  # fmt: skip


class FakeSampler:
    def __init__(self, *ivs):
        self.ivs = list(ivs)

    def intervals(self, seconds=None):
        if seconds is None or not self.ivs:
            return list(self.ivs)
        return [iv for iv in self.ivs if iv.t1 > self.ivs[-1].t1 - seconds]


# ------------------------------------------------------------- selection
def test_window_selection_by_seconds_and_since():
    s = FakeSampler(*(interval(5.0 * i, [("10.0.0.1", ACTIVE, 0, 0, 1, 0, 0)]) for i in range(6)))
    assert SourceWindow.of(s).seconds == 30.0
    w = SourceWindow.of(s, 10)  # intervals ending within the last 10 s of the newest one
    assert [iv.t0 for iv in w.intervals] == [20.0, 25.0] and w.seconds == 10.0 and w.end == 30.0
    assert [iv.t0 for iv in SourceWindow.of(s).since(12.0).intervals] == [10.0, 15.0, 20.0, 25.0], "straddling kept"
    empty = SourceWindow([None])
    assert (len(empty), empty.seconds, empty.end, len(empty.select())) == (0, 0.0, None, 0)


def test_row_selection_kind_epoch_shadow_and_drops():
    iv = interval(0, [("10.0.0.1", ACTIVE, 1, 0, 10, 2, 0), ("10.0.0.2", ACTIVE, 1, 0, 10, 0, 0),
                      ("10.0.0.1", SHADOW, 1, 0, 10, 9, 4), ("10.0.0.0", ACTIVE, 1, 1, 20, 5, 0),
                      ("10.0.0.3", OLD, 1, 0, 3, 1, 0)], shadow=(SHADOW,))  # fmt: skip
    w = SourceWindow([iv])
    assert w.select().addresses() == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"], "per-source kind only"
    assert w.select(kind=1).addresses() == ["10.0.0.0"]
    assert w.select(epoch=ACTIVE).addresses() == ["10.0.0.1", "10.0.0.2"]
    assert w.select(enforced=True).addresses() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"], "no shadow rows"
    assert w.select(dropped=True, exclude_epoch=OLD).addresses() == ["10.0.0.1", "10.0.0.1"]
    assert w.select(would_drop=True).epoch.tolist() == [SHADOW]


def test_max_rows_keeps_the_newest_intervals_and_at_least_one():
    ivs = [interval(5.0 * i, [(f"10.0.{i}.{j}", ACTIVE, 0, 0, 1, 0, 0) for j in range(1, 4)]) for i in range(4)]
    r = SourceWindow(ivs).select(max_rows=7)
    assert (r.intervals, len(r), r.seconds) == (2, 6, 10.0)
    assert sorted({a.rsplit(".", 1)[0] for a in r.addresses()}) == ["10.0.2", "10.0.3"]
    assert SourceWindow(ivs).select(max_rows=1).intervals == 1, "one interval even when it holds more rows"


# ------------------------------------------------------------ merge, top
def test_merge_sums_each_source_and_rule_across_intervals():
    a = interval(0, [("10.0.0.1", ACTIVE, 1, 0, 10, 1, 0, 100), ("10.0.0.1", ACTIVE, 2, 0, 5, 0, 0, 100),
                     ("2001:db8::1", ACTIVE, 1, 0, 7, 7, 0, 300)])  # fmt: skip
    b = interval(5, [("10.0.0.1", ACTIVE, 1, 0, 20, 3, 0, 150), ("10.0.0.2", ACTIVE, 1, 0, 1, 0, 0, 200)])
    rows = SourceWindow([a, b]).select().per_source_rule()
    got = sorted(zip(rows.addresses(), rows.rule.tolist(), rows.packets.tolist(), rows.drops.tolist(),
                     rows.first_ns.tolist(), rows.first_row.tolist()))  # fmt: skip
    assert got == [("10.0.0.1", 1, 30, 4, 100, 0), ("10.0.0.1", 2, 5, 0, 100, 1), ("10.0.0.2", 1, 1, 0, 200, 4),
                   ("2001:db8::1", 1, 7, 7, 300, 2)], "sums; first_ns and row from the earliest row"  # fmt: skip
    assert rows.seconds == 10.0 and rows.source_count() == 3


def test_top_orders_by_the_column_drops_zeros_and_breaks_ties_the_same_way_every_time():
    rows = [(f"10.0.0.{i}", ACTIVE, 0, 0, p, d, 0) for i, (p, d) in enumerate(
        [(5, 0), (9, 1), (5, 2), (7, 0), (5, 0), (0, 0)], start=1)]  # fmt: skip
    w = SourceWindow([interval(0, rows), interval(5, [("10.0.0.1", ACTIVE, 0, 0, 1, 0, 0)])])
    top, order = w.top(3, "packets", ACTIVE)
    assert [(top.addresses([i])[0], int(top.packets[i])) for i in order][:2] == [("10.0.0.2", 9), ("10.0.0.4", 7)]
    assert int(top.packets[order[2]]) == 6 and top.addresses([order[2]]) == ["10.0.0.1"], "summed over both"
    assert [int(top.packets[i]) for i in w.top(10, "packets", ACTIVE)[1]] == [9, 7, 6, 5, 5]
    top, order = w.top(10, "drops", ACTIVE)
    assert top.addresses(order) == ["10.0.0.3", "10.0.0.2"], "sources that dropped nothing are left out"
    runs = [w.top(10, "packets", ACTIVE) for _ in range(3)]
    ranked = [top.addresses(order) for top, order in runs]
    assert sorted(ranked[0][3:]) == ["10.0.0.3", "10.0.0.5"] and ranked[1] == ranked[0] == ranked[2], "ties: fixed"


def test_one_interval_is_ranked_as_it_is_and_ranked_keeps_row_order_for_ties():
    iv = interval(0, [("10.0.0.9", ACTIVE, 0, 0, 3, 0, 2), ("10.0.0.1", ACTIVE, 0, 0, 3, 0, 5),
                      ("10.0.0.5", ACTIVE, 0, 0, 3, 0, 2)])  # fmt: skip
    top, order = SourceWindow([iv]).top(10, "packets", ACTIVE)
    assert top.addresses(order) == ["10.0.0.9", "10.0.0.1", "10.0.0.5"]
    rows = SourceWindow([iv]).select(would_drop=True).per_source_rule()
    assert rows.addresses(rows.ranked("new_drops")) == ["10.0.0.1", "10.0.0.9", "10.0.0.5"]


# ----------------------------------------------------- dropped, grouping
def test_dropped_sources_are_enforced_drops_by_source_not_by_rule():
    iv = interval(0, [("10.0.0.1", ACTIVE, 1, 0, 5, 1, 0), ("10.0.0.1", ACTIVE, 2, 0, 5, 1, 0),
                      ("10.0.0.2", SHADOW, 1, 0, 5, 5, 5), ("10.0.0.3", OLD, 1, 0, 5, 2, 0),
                      ("10.0.0.4", ACTIVE, 1, 1, 5, 2, 0), ("10.0.0.5", ACTIVE, 1, 0, 5, 0, 0)],
                  shadow=(SHADOW,))  # fmt: skip
    w = SourceWindow([iv])
    assert w.dropped_sources().tolist() == sorted(source_keys(*address_halves(["10.0.0.1", "10.0.0.3"])).tolist())
    assert w.dropped_sources(exclude_epoch=OLD).tolist() == source_keys(*address_halves(["10.0.0.1"])).tolist()


def test_source_keys_tell_apart_addresses_that_share_a_half():
    hi, lo = address_halves(["2001:db8:1::5", "2001:db8:2::5", "10.0.0.1", "::ffff:10.0.0.1"])
    k = source_keys(hi, lo)
    assert k[0] != k[1] and k[2] == k[3], "IPv4 and its mapped form are one key, as in the kernel"
    assert source_keys(hi, lo, np.zeros(4, np.uint64)).tolist() == k.tolist()
    assert source_keys(hi, lo, np.ones(4, np.uint64))[0] != k[0], "meta (epoch, rule, kind) is part of an entry key"
    assert addresses(hi, lo) == ["2001:db8:1::5", "2001:db8:2::5", "10.0.0.1", "10.0.0.1"]


def test_group_rows_takes_the_first_row_and_reduces_the_others():
    keys = np.array([3, 1, 3, 2, 1], np.uint64)
    k, (name,), (total, top) = group_rows(keys, [np.array(list("abcde"))], [np.arange(5), np.arange(5)], np.add)
    assert (k.tolist(), name.tolist(), total.tolist()) == ([1, 2, 3], ["b", "d", "a"], [5, 3, 2])
    assert group_rows(keys, [], [np.array([4, 9, 1, 0, 2])], np.maximum)[2][0].tolist() == [9, 0, 4]


@pytest.mark.parametrize("bits4, bits6, sources, groups", [
    (24, 48, ["198.51.100.1", "198.51.100.200", "198.51.101.1", "2001:db8:1:2::1", "2001:db8:1:ffff::1",
              "2001:db8:2::1"], ["198.51.100.0/24", "198.51.100.0/24", "198.51.101.0/24", "2001:db8:1::/48",
                                 "2001:db8:1::/48", "2001:db8:2::/48"]),
    (16, 32, ["198.51.100.1", "198.52.0.1", "2001:db8:1::1", "2001:db9::1"],
     ["198.51.0.0/16", "198.52.0.0/16", "2001:db8::/32", "2001:db9::/32"]),
    (0, 0, ["1.2.3.4", "200.1.1.1", "2001:db8::1"], ["0.0.0.0/0", "0.0.0.0/0", "::/0"]),
])  # fmt: skip
def test_grouping_by_prefix_ipv4_and_ipv6(bits4, bits6, sources, groups):
    keys = prefix_keys(*address_halves(sources), bits4, bits6)
    assert [prefix_name(int(k), bits4, bits6) for k in keys] == groups
    assert len(set(keys.tolist())) == len(set(groups)), "one key per prefix, IPv4 and IPv6 apart"


# ------------------------------------------------------- prefix matching
def test_prefix_matching_as_the_kernel_keys_sources():
    srcs = ["198.51.100.7", "198.51.100.16", "2001:db8::7", "10.1.2.3", "::ffff:203.0.113.9"]
    hi, lo = address_halves(srcs)
    nets = ["198.51.100.0/28", "2001:db8::/64", "0.0.0.0/0", "::ffff:203.0.113.0/120"]
    assert network_index(hi, lo, nets).tolist() == [0, 2, 1, 2, 2], "first match wins; /0 IPv4 is IPv4 only"
    assert network_index(hi, lo, ["::ffff:203.0.113.0/120"]).tolist() == [-1, -1, -1, -1, 0]
    assert network_index(hi, lo, ["::/0"]).tolist() == [0] * 5, "the IPv6 /0 holds IPv4-mapped sources too"
    assert network_index(hi, lo, []).tolist() == [-1] * 5


def test_first_network_names_the_first_canary_hit_among_dropped_rows():
    iv = interval(0, [("198.51.100.7", ACTIVE, 1, 0, 4, 1, 0), ("2001:db8::9", ACTIVE, 1, 0, 4, 1, 0),
                      ("192.0.2.1", ACTIVE, 1, 0, 4, 0, 0), ("198.51.100.8", OLD, 1, 0, 4, 4, 0)])  # fmt: skip
    dropped = SourceWindow([iv]).select(epoch=ACTIVE, dropped=True)
    canaries = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "2001:db8::/32", "198.51.100.0/28")]
    assert dropped.first_network(canaries) == "2001:db8::/32", "in the canaries' order; seen-only rows do not count"
    assert dropped.first_network(canaries[:1]) is None


def test_dropped_since_folds_each_interval_once_and_keeps_the_first_canary_hit():
    canaries = [ipaddress.ip_network("198.51.100.0/28"), ipaddress.ip_network("2001:db8::/32")]
    before = interval(0, [("198.51.100.1", ACTIVE, 1, 0, 4, 4, 0)])  # ends at the change: not folded
    straddling = interval(3, [("10.0.0.1", ACTIVE, 1, 0, 4, 1, 0), ("10.0.0.2", OLD, 1, 0, 4, 1, 0),
                              ("2001:db8::9", ACTIVE, 1, 0, 4, 0, 0)])  # fmt: skip
    d = DroppedSince(5.0, canaries).fold([before, straddling], ACTIVE)
    assert (len(d), d.network, d.t) == (1, None, 8.0), "the new epoch's drops only; seen-only rows do not count"
    later = interval(8, [("10.0.0.1", ACTIVE, 1, 0, 4, 2, 0), ("2001:db8::9", ACTIVE, 1, 0, 4, 1, 0),
                         ("198.51.100.3", ACTIVE, 1, 0, 4, 1, 0)])  # fmt: skip
    d.fold([before, straddling, later], ACTIVE)
    assert (len(d), d.network, d.t) == (3, "198.51.100.0/28", 13.0), "sources counted once; canaries in their order"
    d.fold([later, interval(13, [("2001:db8::7", ACTIVE, 1, 0, 4, 1, 0)])], ACTIVE)
    assert (len(d), d.network) == (4, "198.51.100.0/28"), "the first hit stays"


# ----------------------------------------------------------------- rates
def test_rates_join_epochs_by_rule_name_and_leave_shadow_rows_out():
    names = {OLD: {1: "api"}, ACTIVE: {3: "api", 4: "web"}, SHADOW: {1: "api"}}
    a = interval(0, [("10.0.0.1", OLD, 1, 0, 50, 5, 0), ("10.0.0.1", SHADOW, 1, 0, 50, 50, 50)], shadow=(SHADOW,))
    b = interval(5, [("10.0.0.1", ACTIVE, 3, 0, 50, 0, 0), ("10.0.0.2", ACTIVE, 4, 0, 10, 0, 0)])
    r = SourceWindow([a, b]).rates(names, min_seen=5.0)
    got = sorted(zip(r.addresses, r.rules, r.packets.tolist(), r.drops.tolist(), r.seen.tolist()))
    assert got == [("10.0.0.1", "api", 100.0, 5.0, 10.0), ("10.0.0.2", "web", 10.0, 0.0, 5.0)]
    assert r.seconds == 10.0 and sorted(r.pps.tolist()) == [2.0, 10.0]
    assert SourceWindow([a, b]).rates(names, 5.0, epochs={ACTIVE}).packets.sum() == 60
    assert SourceWindow([]).rates(names, 5.0).addresses == []


def test_unique_is_numpys_sorted_distinct_values():
    from tidegate.observation.window import unique

    rng = np.random.default_rng(3)
    for a in (rng.integers(0, 50, 1000, dtype=np.uint64), rng.integers(-5, 5, 100), np.array([], np.uint64),
              np.array([7], np.uint32), np.array([2, 2, 2], np.uint8)):
        got, want = unique(a), np.unique(a)
        assert got.dtype == want.dtype and got.tolist() == want.tolist()
