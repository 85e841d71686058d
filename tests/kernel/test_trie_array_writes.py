"""The trie entries an apply writes through the arrays (kernel/trie4.py: a
large IPv4 list none of whose entries contains another) are the ones the
per-entry path writes.

A series of applies moves between rule sets that take the arrays and ones
that take the walk (a nested prefix, an IPv6 network), each applied with
the arrays allowed or turned off, so slots are rewritten from and to both
forms and trimmed in between. After each, read back from the kernel: the
active slot holds exactly the entries the per-entry path gives for its set,
every slot holds what the filter believes it holds, and a packet from the
deny list is dropped while one from the allow list passes."""

from __future__ import annotations

import pytest

from tidegate.kernel import entries as ke
from tidegate.kernel import filter as kfilter
from tidegate.kernel import slots
from tidegate.ruleset.parse import parse_rule_set

from . import frames as f

XDP_DROP, XDP_PASS = 1, 2


def _nets(first: int, n: int) -> list[str]:
    return [f"100.{64 + i // 256}.{i % 256}.0/24" for i in range(first, first + n)]


RULES = ("rules:\n  - name: dns\n    protocol: udp\n    dst_ports: [53]\n    limit: {pps: 1000, burst: 1000}\n"
         "    sources: %s\n")  # fmt: skip
TEXTS = {  # allow, deny (its first network is the probe's), the dns rule's sources
    "A": (_nets(0, 600), ["198.51.100.0/24"], ["100.64.0.0/24"]),
    "B": (_nets(300, 600), ["198.51.100.0/24", *_nets(2000, 80)], ["203.0.113.0/24"]),
    "nested": (_nets(0, 600) + ["100.64.0.0/16"], ["198.51.100.0/24"], ["100.64.0.0/24"]),
    "ipv6": (_nets(100, 600) + ["2001:db8::/32"], ["198.51.100.0/24"], ["100.64.0.0/24"]),
    "C": (_nets(900, 300), ["198.51.100.0/24"], _nets(900, 100)),
}
SERIES = [("A", True), ("B", True), ("nested", True), ("A", False), ("C", True), ("ipv6", True), ("B", False),
          ("A", True), ("C", False), ("A", True)]  # (set, arrays allowed)


def _text(name: str) -> str:
    allow, deny, sources = TEXTS[name]
    return f"allow: {allow}\ndeny: {deny}\n" + RULES % sources


def _per_entry(rs, slot: int) -> dict[bytes, bytes]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ke, "ARRAY_MIN", 10**9)
        v4, v6 = ke.kernel_trie_entries(ke._build_kernel_rule_set(rs), slot)
    return {**v4, **v6}


@pytest.fixture
def kf(replay_kf):
    """The session's filter, its three slots emptied of this test's entries afterwards."""
    yield replay_kf
    for version in range(100, 103):
        replay_kf.apply(parse_rule_set("rules: []\n", "empty"), version)
    replay_kf.settle()


@pytest.mark.kernel
def test_array_writes_leave_the_entries_of_per_entry_writes(kf, monkeypatch):
    monkeypatch.setattr(kfilter, "TRIM_MIN", 100)
    took = set()
    for version, (name, arrays) in enumerate(SERIES, 1):
        rs = parse_rule_set(_text(name), name)  # a new object each time: nothing reused by identity
        with pytest.MonkeyPatch.context() as mp:
            if not arrays:
                mp.setattr(ke, "ARRAY_MIN", 10**9)
            took.add((name, ke.build_kernel_rule_set(rs).v4 is not None))
            kf.apply(rs, version)
        kf.settle()
        active = kf.state().active.slot
        held = slots.index_slots(kf._tables, kf.config.max_cidrs)
        assert {**held[active].cidrs[4], **held[active].cidrs[6]} == _per_entry(rs, active), (version, name)
        for s, known in kf._slot_entries.items():
            for fam in (4, 6):
                assert known.cidrs[fam] == held[s].cidrs[fam], (version, name, s, fam)
        assert kf.test_run(f.udp("198.51.100.7", 53))[0] == XDP_DROP
        assert kf.test_run(f.udp(TEXTS[name][0][5].replace(".0/24", ".9"), 53))[0] == XDP_PASS
    assert {("A", True), ("A", False), ("nested", False), ("ipv6", False), ("C", True), ("C", False)} <= took
