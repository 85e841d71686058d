"""Offline staging: run captured traffic through the real XDP program.

A replay build of the program (TG_REPLAY_CLOCK) reads time from a map; for
every packet of the capture the clock is set to the packet's own timestamp
and the frame goes through BPF_PROG_TEST_RUN. So token buckets see the
capture's pacing, not the speed of the replay, and the verdicts are the
ones the kernel program would give live, with two documented differences:

- live, the program reads a coarse clock (jiffies, 4 ms at HZ=250): a
  bucket refills in 4 ms steps instead of continuously, so a source close
  to its limit may see one packet more or fewer per 4 ms tick than in the
  replay (tolerance: rate x 4 ms + 1 packets per source);
- live, several CPUs may race on one source's bucket (bpf/bucket.h).

No agent and no interface are needed: the replay program has its own
pinned maps under /sys/fs/bpf/tidegate/replay-<pid>, removed afterwards.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from tidegate.kernel.filter import FilterConfig, KernelFilter, RuleCounters

XDP_DROP = 1
CLOCK_BASE_NS = 10**12  # keeps "now" far from 0 so no bucket sees negative time


@dataclass
class ReplayResult:
    packets: int = 0
    passed: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    rules: dict[str, RuleCounters] = field(default_factory=dict)
    dropped_sources: Counter = field(default_factory=Counter)
    verdicts: list[bool] = field(default_factory=list)  # True = dropped, per packet

    def to_dict(self, top: int = 10) -> dict:
        return {
            "packets": self.packets,
            "passed": self.passed,
            "dropped": self.dropped,
            "reasons": self.reasons,
            "rules": {k: v.__dict__ for k, v in self.rules.items()},
            "top_dropped_sources": [{"source": s, "packets": n} for s, n in self.dropped_sources.most_common(top)],
        }


@dataclass
class ReplayDiff:
    base: ReplayResult
    candidate: ReplayResult
    newly_dropped: int
    newly_passed: int
    newly_dropped_sources: Counter

    def to_dict(self, top: int = 10) -> dict:
        return {
            "base": self.base.to_dict(top),
            "candidate": self.candidate.to_dict(top),
            "newly_dropped_packets": self.newly_dropped,
            "newly_passed_packets": self.newly_passed,
            "newly_dropped_sources": len(self.newly_dropped_sources),
            "top_newly_dropped_sources": [
                {"source": s, "packets": n} for s, n in self.newly_dropped_sources.most_common(top)
            ],
        }


def read_pcap(path: str) -> Iterator[tuple[int, bytes]]:
    """(timestamp ns, frame bytes) for each packet of a pcap or pcapng file."""
    from scapy.utils import PcapReader

    with PcapReader(path) as reader:
        for pkt in reader:
            raw = getattr(pkt, "original", None) or bytes(pkt)
            yield int(pkt.time * 1_000_000_000), bytes(raw)


def source_of(frame: bytes) -> str | None:
    """Source address of an Ethernet frame (two VLAN tags at most), or None."""
    off = 12
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, off)[0]
    off = 14
    for _ in range(2):
        if etype in (0x8100, 0x88A8) and len(frame) >= off + 4:
            etype = struct.unpack_from("!H", frame, off + 2)[0]
            off += 4
    if etype == 0x0800 and len(frame) >= off + 20:
        return str(ipaddress.IPv4Address(frame[off + 12 : off + 16]))
    if etype == 0x86DD and len(frame) >= off + 40:
        return str(ipaddress.IPv6Address(frame[off + 8 : off + 24]))
    return None


class Replayer:
    """Owns one replay build of the program; replays captures through it."""

    def __init__(self, max_sources: int = 1 << 18):
        self.kf = KernelFilter(
            FilterConfig(interface=None, pin_name=f"replay-{os.getpid()}", replay_clock=True, max_sources=max_sources)
        )
        self._version = 0

    def __enter__(self) -> "Replayer":
        self.kf.load()
        return self

    def __exit__(self, *exc) -> None:
        self.kf.close()
        self.kf.remove_pins()

    def run(self, rule_set, packets: Iterable[tuple[int, bytes]]) -> ReplayResult:
        kf = self.kf
        self._version += 1
        kf.apply(rule_set, self._version)
        kf.clear_sources()
        before = kf.counters()
        res = ReplayResult()
        t0 = None
        for ts, frame in packets:
            if t0 is None:
                t0 = ts
            kf.set_clock(CLOCK_BASE_NS + max(0, ts - t0))
            verdict, _ = kf.test_run(frame)
            dropped = verdict == XDP_DROP
            res.verdicts.append(dropped)
            res.packets += 1
            if dropped:
                res.dropped += 1
                src = source_of(frame)
                if src:
                    res.dropped_sources[src] += 1
            else:
                res.passed += 1
        after = kf.counters()
        res.reasons = {k: after.reasons[k][0] - before.reasons[k][0] for k in after.reasons}
        names = {r.name for r in rule_set.rules} | {"default", "deny-list", "allow-list"}
        for name in sorted(names):
            a = after.rules.get(name, RuleCounters())
            b = before.rules.get(name, RuleCounters())
            res.rules[name] = RuleCounters(**{k: getattr(a, k) - getattr(b, k) for k in a.__dict__})
        return res


def replay(pcap: str, rule_set, against=None) -> ReplayResult | ReplayDiff:
    """Replay a capture through rule_set; with `against`, compare two sets.

    `against` is the base (e.g. the active set) and rule_set the candidate."""
    packets = list(read_pcap(pcap))
    with Replayer() as r:
        cand = r.run(rule_set, packets)
        if against is None:
            return cand
        base = r.run(against, packets)
    newly = Counter()
    newly_dropped = newly_passed = 0
    for (ts, frame), b, c in zip(packets, base.verdicts, cand.verdicts):
        if c and not b:
            newly_dropped += 1
            src = source_of(frame)
            if src:
                newly[src] += 1
        elif b and not c:
            newly_passed += 1
    return ReplayDiff(base, cand, newly_dropped, newly_passed, newly)
