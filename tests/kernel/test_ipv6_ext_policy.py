"""IPv6 packets with more extension headers than the program walks: a
defined verdict, never a dodge.

The program walks up to 8 extension headers (bpf/parse.h) to find the L4
header. Stacking more used to leave the last header type as the protocol, so
a TCP/22 drop rule never matched. Such packets now count under their own
reasons (ipv6-ext-pass / ipv6-ext-drop) and the rule set's
defaults.ipv6_unparsed_extensions decides them: drop (the default), pass, or
the default rule's limits. BPF_PROG_TEST_RUN on the real program, exact
verdicts and reason counters."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tidegate.kernel import bpfsys
from tidegate.kernel.filter import FilterConfig, KernelFilter, bpf_source_dir
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f

RULES = """
defaults:
  limit: {{pps: 1000, burst: 3}}
{policy}
allow: ["2001:db8:a11::/48"]
deny: ["2001:db8:dead::/48"]
rules:
  - name: ssh
    protocol: tcp
    dst_ports: [22]
    action: drop
  - name: web
    protocol: tcp
    dst_ports: [443]
    limit: {{pps: 1000, burst: 1000}}
"""


def rules(policy: str | None) -> str:
    return RULES.format(policy=f"  ipv6_unparsed_extensions: {policy}" if policy else "")


WALKED = (0, 1, 4, 5, 8)  # up to the parser's limit: the TCP header is found (4 mixed: ends with AH)
BEYOND = (9, 16, 40)  # more headers than the parser walks


IPV6_EXT = {0, 43, 44, 51, 60, 135, 139, 140, 253, 254}  # bpf/parse.h tg_is_ipv6_ext


def _expected(frame: bytes) -> tuple[str, str]:
    """What bpf/parse.h's walk decides under rules(None), written out in
    Python: up to 2 VLAN tags, the IPv6 header, up to 8 extension headers
    (a fragment header 8 bytes, AH (len + 2) x 4, the others (len + 1) x 8),
    then the port of a first fragment's TCP or UDP header."""
    off, ethertype = 14, int.from_bytes(frame[12:14], "big")
    for _ in range(2):
        if ethertype in (0x8100, 0x88A8):
            if off + 4 > len(frame):
                return "pass", "unparsed"
            ethertype, off = int.from_bytes(frame[off + 2 : off + 4], "big"), off + 4
    if ethertype != 0x86DD or off + 40 > len(frame):
        return "pass", "unparsed"
    if frame[off + 8 : off + 14] == bytes.fromhex("20010db8dead"):
        return "drop", "deny"
    proto, off, first = frame[off + 6], off + 40, True
    for _ in range(8):
        if proto == 44:
            if off + 8 > len(frame):
                break
            first = first and int.from_bytes(frame[off + 2 : off + 4], "big") & 0xFFF8 == 0
            proto, off = frame[off], off + 8
        elif proto in IPV6_EXT:
            if off + 2 > len(frame):
                break
            proto, off = frame[off], off + ((frame[off + 1] + 2) * 4 if proto == 51 else (frame[off + 1] + 1) * 8)
        else:
            break
    if proto in IPV6_EXT:
        return "drop", "ipv6-ext-drop"
    if proto == 6 and first and off + 4 <= len(frame) and int.from_bytes(frame[off + 2 : off + 4], "big") == 22:
        return "drop", "deny"
    return "pass", "pass"


@pytest.mark.kernel
def test_random_chains_are_walked_like_the_reference(replay):
    """1,500 random chains (kinds, lengths, fragments, VLAN tags, cut short,
    bytes overwritten): the program's verdict and reason are those of the
    walk written out in Python (the program reads each header at an offset
    the verifier does not know, bpf/parse.h). 20 ms apart, no bucket runs
    dry."""
    replay.apply(rules(None))
    rnd = random.Random(20261203)
    for i in range(1500):
        frame = f.random_ipv6_chain(rnd, rnd.choice(["2001:db8:dead::1", "2001:db8:5::1"]))
        step = replay.at(20 * i).send(frame)
        assert (step.verdict, step.reason) == _expected(frame), (i, frame.hex())


@pytest.mark.kernel
@pytest.mark.parametrize("mixed", [False, True], ids=["destopts", "hbh-routing-frag-ah-destopts"])
@pytest.mark.parametrize("n", [*WALKED, *BEYOND])
def test_a_port_rule_cannot_be_dodged_with_extension_headers(replay, n, mixed):
    """The default policy: TCP/22 is dropped behind any number of headers,
    by the ssh rule while the chain is walked, by the policy beyond it."""
    replay.apply(rules(None))
    for i in range(5):  # not a bucket: every one of them
        step = replay.send(f.ipv6_ext_tcp(f"2001:db8:5::{i + 1}", n, dport=22, mixed=mixed))
        assert (step.verdict, step.reason) == ("drop", "deny" if n in WALKED else "ipv6-ext-drop"), (n, i)


@pytest.mark.kernel
@pytest.mark.parametrize("policy", [None, "drop", "pass", "default"])
def test_each_policy_gives_its_documented_verdict(replay, policy):
    replay.apply(rules(policy))
    counted = {r: c for r, c in replay.kf.counters().rules.items()}
    deep = [f.ipv6_ext_tcp("2001:db8:6::1", 16, dport=port) for port in (22, 443, 9999)]
    steps = [replay.send(frame) for frame in deep * 2]
    got = [(s.verdict, s.reason) for s in steps]
    if policy in (None, "drop"):
        assert got == [("drop", "ipv6-ext-drop")] * 6
    elif policy == "pass":  # the operator's choice: port rules do not apply to these packets
        assert got == [("pass", "ipv6-ext-pass")] * 6
    else:  # the default rule's per-source bucket (burst 3), whatever the port
        assert got == [("pass", "ipv6-ext-pass")] * 3 + [("drop", "ipv6-ext-drop")] * 3
    # per rule: the pseudo-rule `ipv6-ext` (pass, drop) or the default rule took them
    after = replay.kf.counters().rules
    rule = "default" if policy == "default" else "ipv6-ext"
    before = counted.get(rule)
    moved = (after[rule].pass_packets - (before.pass_packets if before else 0),
             after[rule].drop_packets - (before.drop_packets if before else 0))  # fmt: skip
    assert moved == {None: (0, 6), "drop": (0, 6), "pass": (6, 0), "default": (3, 3)}[policy]
    # walked chains still meet the port rules, whatever the policy
    assert (replay.send(f.ipv6_ext_tcp("2001:db8:7::1", 8, dport=22, mixed=True)).reason) == "deny"


@pytest.mark.kernel
@pytest.mark.parametrize("policy", [None, "pass", "default"])
def test_allow_and_deny_lists_decide_first(replay, policy):
    replay.apply(rules(policy))
    for n in (9, 16):
        assert (replay.send(f.ipv6_ext_tcp("2001:db8:dead::9", n)).reason) == "deny"
        step = replay.send(f.ipv6_ext_tcp("2001:db8:a11::9", n))
        assert (step.verdict, step.reason) == ("pass", "allow")


@pytest.mark.kernel
def test_a_chain_cut_short_by_the_frame_end_is_decided_by_the_policy(replay):
    replay.apply(rules(None))
    frame = f.ipv6_ext_tcp("2001:db8:8::1", 3)  # 3 destination options headers of 8 bytes, then TCP
    for end in range(54, 54 + 2 * 8 + 2):  # a next-header byte is not in the frame
        step = replay.send(frame[:end])
        assert (step.verdict, step.reason) == ("drop", "ipv6-ext-drop"), end
    assert (replay.send(frame).verdict, replay.send(frame).reason) == ("drop", "deny")


@pytest.mark.kernel
def test_esp_is_a_protocol_not_a_header_to_walk(replay):
    """What follows ESP is encrypted: ESP is what rules see (any-protocol rules, or the default)."""
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    replay.apply(rules(None))
    esp = bytes(Ether(**f.ETH) / IPv6(src="2001:db8:9::1", dst=f.DST6, nh=50) / (b"\x00" * 32))
    assert [(s.verdict, s.reason) for s in (replay.send(esp) for _ in range(4))] == [("pass", "pass")] * 3 + [
        ("drop", "rate")]


@pytest.mark.kernel
@pytest.mark.parametrize("active, shadow", [("pass", "drop"), ("drop", "default"), ("default", "pass")])
def test_the_shadow_set_applies_its_own_policy(replay, active, shadow):
    """The shadow set may reuse the active set's classification (same
    matching): its own policy still decides (bpf/layout.h same_match_as)."""
    replay.apply(rules(active))
    kf = replay.kf
    kf.load_shadow(parse_rule_set(rules(shadow), "<shadow>"), replay.version + 1000)
    try:
        before = kf.counters().shadow
        for i in range(6):
            replay.send(f.ipv6_ext_tcp(f"2001:db8:10::{i + 1}", 16, dport=22))
        after = kf.counters().shadow
        rule = "default" if shadow == "default" else "ipv6-ext"
        would = after[rule].would_drop - (before[rule].would_drop if rule in before else 0)
        # default: the six sources share one /64, so one bucket of the default rule (burst 3)
        assert would == {"drop": 6, "pass": 0, "default": 3}[shadow], (active, shadow)
    finally:
        kf.clear_shadow()


@pytest.mark.kernel
def test_pins_of_a_program_with_fewer_reasons_are_taken_over(tmp_path, monkeypatch):
    """An agent upgraded to this program finds a per-reason counter map of 8
    entries pinned (BCC would silently reuse it, and the two new reasons
    would never be counted): that map alone is made anew, the rule sets and
    per-source state are adopted."""
    old_src = tmp_path / "bpf"
    shutil.copytree(bpf_source_dir(), old_src)
    layout = old_src / "layout.h"
    layout.write_text(layout.read_text().replace("#define TG_REASONS 10", "#define TG_REASONS 8"))
    config = FilterConfig(interface=None, pin_name=f"test-upgrade-{os.getpid()}", replay_clock=True,
                          max_sources=4096)  # fmt: skip
    monkeypatch.setenv("TIDEGATE_BPF_DIR", str(old_src))
    old = KernelFilter(config)
    old.load()
    try:
        old.apply(parse_rule_set(rules(None), "<old>"), 7)
        stats = f"{config.pin_dir}/tg_stats"
        fd = bpfsys.obj_get(stats)
        assert bpfsys.map_info(fd).max_entries == 8
        os.close(fd)
    finally:
        old.close()
    monkeypatch.delenv("TIDEGATE_BPF_DIR")
    new = KernelFilter(config)
    try:
        loaded = new.load()
        assert not loaded.fresh_maps and new.active_version() == 7, "the rule set was adopted"
        fd = bpfsys.obj_get(stats)
        assert bpfsys.map_info(fd).max_entries == 10
        os.close(fd)
        new.set_clock(10**12)
        assert new.test_run(f.ipv6_ext_tcp("2001:db8:5::1", 16))[0] == 1  # XDP_DROP
        assert new.counters().reasons["ipv6-ext-drop"][0] == 1
    finally:
        new.close()
        new.remove_pins()
