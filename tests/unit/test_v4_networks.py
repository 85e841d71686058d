"""A long IPv4 list kept as codes (ruleset/cidrs.V4Networks) reads as the
tuple of ipaddress networks the per-item parser keeps, to every caller:
items, slices, membership, equality and hash (the rule set's too), `+`,
repr, copy and pickle, dataclasses.replace. And it keeps no network
objects: that is what it is for (the agent holds the active and shadow
versions; a 100,000-CIDR one kept ~18 MB of networks)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import ipaddress
import pickle
import tracemalloc

import pytest

from tidegate.ruleset import cidrs
from tidegate.ruleset.model import Networks
from tidegate.ruleset.parse import parse_rule_set

LIST = [f"10.{i // 256}.{i % 256}.0/{24 - i % 3}" if i % 3 == 0 else f"172.{16 + i // 4096}.{(i // 16) % 256}.{(i % 16) * 16}/28"
        for i in range(300)]  # fmt: skip


def text(items: list[str]) -> str:
    return "allow: [" + ", ".join(f'"{x}"' for x in items) + "]\nrules: []\n"


def both(items: list[str], monkeypatch):
    """The rule set read with the codes, and read item by item."""
    fast = parse_rule_set(text(items))
    with monkeypatch.context() as m:
        m.setattr(cidrs, "V4_LIST_MIN", 10**9)
        slow = parse_rule_set(text(items))
    return fast, slow


def test_it_reads_as_the_tuple_of_networks(monkeypatch):
    fast, slow = both(LIST, monkeypatch)
    nets, ref = fast.allow, slow.allow
    assert type(nets) is cidrs.V4Networks and type(ref) is Networks
    assert len(nets) == len(ref) == 300 and bool(nets)
    assert list(nets) == list(ref) and [vars(n) for n in nets] == [vars(n) for n in ref]
    assert nets[0] == ref[0] and nets[-1] == ref[-1] and nets[7:19:3] == ref[7:19:3]
    assert nets == ref and ref == nets and nets == tuple(ref) and tuple(ref) == nets
    assert nets != ref[:-1] and nets != tuple(reversed(ref)) and nets != "10.0.0.0/24" and nets != list(ref)
    assert hash(nets) == hash(tuple(ref)) == hash(ref)
    assert nets.unified_keys == ref.unified_keys and nets.texts == ref.texts
    assert repr(nets) == repr(ref)
    assert nets + (ipaddress.ip_network("192.0.2.0/24"),) == ref + (ipaddress.ip_network("192.0.2.0/24"),)
    assert type(nets + ()) is tuple and type(() + nets) is tuple and () + nets == ref


def test_membership_is_by_network(monkeypatch):
    fast, _ = both(LIST, monkeypatch)
    nets = fast.allow
    assert ipaddress.ip_network(LIST[5]) in nets and ipaddress.ip_network(LIST[0]) in nets
    assert ipaddress.ip_network("10.0.0.0/25") not in nets  # inside a listed one, not listed
    assert ipaddress.ip_network("192.0.2.0/24") not in nets
    assert all(n in nets for n in map(ipaddress.ip_network, LIST))  # the first, the last, every one
    assert ipaddress.ip_network("0.0.0.0/30") not in nets and ipaddress.ip_network("255.255.255.252/30") not in nets
    assert ipaddress.ip_network("::ffff:10.0.0.0/120") not in nets and "10.0.0.0/24" not in nets
    assert nets.count(ipaddress.ip_network(LIST[9])) == 1 and nets.index(ipaddress.ip_network(LIST[9])) == 9


def test_rule_sets_read_either_way_are_equal_and_copy(monkeypatch):
    fast, slow = both(LIST, monkeypatch)
    assert fast == slow and hash(fast) == hash(slow) and fast.digest() == slow.digest()
    for again in (copy.copy(fast), copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert again == fast and again.allow.texts == fast.allow.texts and again.digest() == fast.digest()
    fewer = dataclasses.replace(fast, allow=tuple(n for n in fast.allow if n.prefixlen != 28))
    assert fewer.allow == tuple(n for n in slow.allow if n.prefixlen != 28) and len(fewer.allow) == 100


@pytest.mark.parametrize("n", [20_000])
def test_it_keeps_no_network_objects(n, monkeypatch):
    """What a parsed list keeps: with the codes, under a third of the per-item
    reading's networks, keys and texts (it keeps the texts and the codes)."""
    items = [f"10.{i // 256 % 256}.{i % 256}.0/24" for i in range(n)]
    kept = {}
    for name, fast in (("codes", True), ("items", False)):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(cidrs, "V4_LIST_MIN", 10**9)
            src = text(items)
            gc.collect()
            tracemalloc.start()
            try:
                rs = parse_rule_set(src)
                gc.collect()
                kept[name] = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            assert len(rs.allow) == n
            del rs
    assert kept["codes"] < kept["items"] / 3, kept
