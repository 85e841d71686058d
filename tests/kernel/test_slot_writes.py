"""Writing rule sets into slots, on the real maps.

- A rule set the kernel layer refuses changes nothing: every map (the
  per-source state and counters included) is byte-identical afterwards,
  and packets keep their verdicts. (What the parser rejects never reaches
  the kernel layer; tests/e2e check that through the real agent.)
- A slot rewritten after the agent restarted (a new KernelFilter adopting
  the pinned maps) keeps no trie or port entry of the set it held before:
  the adopting side must learn what each slot holds from the kernel."""

from __future__ import annotations

import dataclasses
import os

import pytest

from fixtures import rule_set
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f

FULL = rule_set("slots-full")

PROBES = [
    f.udp("10.1.2.3", 53),
    f.udp("198.51.100.9", 53),
    f.udp("203.0.113.9", 53),
    f.tcp("192.0.2.1", 8050),
    f.udp("2001:db8:1::5", 53),
    f.udp("2001:db8:d::5", 53),
]


def _refused_by_the_kernel_layer(good):
    """Rule sets that get past the parser (built from a parsed one, the way a
    bug above the kernel layer could hand them over) and that the kernel
    layer itself must refuse before it writes anything."""
    r0 = good.rules[0]
    limit = r0.limit
    return {
        "65 rules": dataclasses.replace(good, rules=tuple(dataclasses.replace(r0, name=f"r{i}") for i in range(65))),
        "unknown protocol": dataclasses.replace(good, rules=(dataclasses.replace(r0, protocol="sctp"),)),
        "zero rate": dataclasses.replace(good, rules=(dataclasses.replace(r0, limit=dataclasses.replace(limit, pps=0)),)),
        "prefix beyond the family": dataclasses.replace(
            good, defaults=dataclasses.replace(good.defaults, ipv4_prefix=33)),
    }  # fmt: skip


def test_rule_sets_the_kernel_layer_refuses_leave_every_map_byte_identical(replay):
    # FULL twice with traffic in between: the active slot and the free slot
    # the next apply would write both hold rule entries and counters
    replay.apply(FULL)
    for frame in PROBES:
        replay.send(frame)
    replay.apply(FULL)
    verdicts = [replay.send(frame) for frame in PROBES]
    kf = replay.kf
    before = kf.map_digest()  # the probes' state entries are part of it
    good = parse_rule_set(FULL, source="<t>")
    for what, rs in _refused_by_the_kernel_layer(good).items():
        with pytest.raises((ValueError, KeyError, ZeroDivisionError)):
            kf.apply(rs, 99)
        assert kf.map_digest() == before, f"{what}: a refused rule set changed a kernel map"
    with pytest.raises(ValueError, match="at most 64"):
        kf.apply(_refused_by_the_kernel_layer(good)["65 rules"], 99)
    assert kf.active_version() == replay.version
    # and the active set still gives every verdict it gave
    assert [replay.send(frame) for frame in PROBES] == verdicts


def test_adopting_agent_rewrites_slots_without_stale_entries(replay_kf):
    pin = f"test-adopt-slots-{os.getpid()}"
    cfg = FilterConfig(interface=None, pin_name=pin, replay_clock=True, max_sources=4096)
    first = KernelFilter(cfg)
    first.load()
    try:
        # three versions fill all three slots; each lists its own port and CIDR
        for v, port in ((1, 1001), (2, 1002), (3, 1003)):
            first.apply(parse_rule_set(_one_rule(port, f"10.{v}.0.0/16"), source="<t>"), v)
        first.close()

        second = KernelFilter(cfg)  # what a restarted agent does: adopt the pins
        second.load()
        try:
            # version 4 lands in a slot that held version 1 or 2; its old
            # port and CIDR entries must not survive the rewrite
            second.apply(parse_rule_set(_one_rule(2000, "10.4.0.0/16"), source="<t>"), 4)
            second.clear_sources()
            slot = second.state().active.slot
            for old_port, old_net in ((1001, "10.1.0.0/16"), (1002, "10.2.0.0/16"), (1003, "10.3.0.0/16")):
                assert not _port_mask(second, slot, old_port), f"stale port {old_port} in slot {slot}"
                assert not _has_cidr(second, slot, old_net), f"stale CIDR {old_net} in slot {slot}"
            assert _port_mask(second, slot, 2000)
            assert _has_cidr(second, slot, "10.4.0.0/16")
        finally:
            second.close()
    finally:
        KernelFilter(cfg).remove_pins()


def _one_rule(port: int, net: str) -> str:
    return (
        "defaults: {limit: {pps: 100, burst: 100}}\n"
        f"rules: [{{name: r{port}, protocol: udp, dst_ports: [{port}], sources: ['{net}'], "
        "limit: {pps: 1, burst: 1}}]\n"
    )


def _port_mask(kf: KernelFilter, slot: int, port: int) -> int:
    t = kf._tables["tg_ports"]
    return int(t[t.Key((slot * 2 + 1) * 65536 + port)].value)


def _has_cidr(kf: KernelFilter, slot: int, net: str) -> bool:
    import ipaddress

    n = ipaddress.ip_network(net)
    t = kf._tables["tg_cidrs4"]
    for k in t.keys():
        if k.slot == slot and k.prefixlen == 32 + n.prefixlen:
            if k.addr == int.from_bytes(n.network_address.packed, "little"):
                return True
    return False
