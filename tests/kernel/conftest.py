"""Kernel fixtures: the real program, compiled once per test session.

The replay build reads time from a map, so token-bucket tests set the
clock instead of sleeping; the code path is otherwise the same program."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import pytest

from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.kernel.layout import REASONS
from tidegate.ruleset.parse import parse_rule_set

XDP_DROP, XDP_PASS = 1, 2
VERDICTS = {XDP_DROP: "drop", XDP_PASS: "pass"}


@dataclass
class Step:
    verdict: str
    reason: str


class ReplayFilter:
    """The real XDP program, driven by BPF_PROG_TEST_RUN and a settable clock."""

    def __init__(self, kf: KernelFilter):
        self.kf = kf
        self.version = 0
        self.now = 10**12

    def apply(self, yaml_text: str):
        self.version += 1
        rs = parse_rule_set(yaml_text, source="<test>")
        self.kf.apply(rs, self.version)
        self.kf.clear_sources()
        return rs

    def at(self, ms: float) -> "ReplayFilter":
        self.now = 10**12 + int(ms * 1_000_000)
        self.kf.set_clock(self.now)
        return self

    def reasons(self) -> dict[str, int]:
        return {k: v[0] for k, v in self.kf.counters().reasons.items()}

    def send(self, frame: bytes) -> Step:
        before = self.reasons()
        verdict, _ = self.kf.test_run(frame)
        after = self.reasons()
        changed = [r for r in REASONS if after[r] != before[r]]
        assert len(changed) == 1, f"exactly one reason counter must move, got {changed}"
        assert after[changed[0]] - before[changed[0]] == 1
        return Step(VERDICTS.get(verdict, str(verdict)), changed[0])


@pytest.fixture(scope="session")
def replay_kf():
    kf = KernelFilter(
        FilterConfig(interface=None, pin_name=f"test-replay-{os.getpid()}", replay_clock=True, max_sources=65536)
    )
    kf.load()
    yield kf
    kf.close()
    kf.remove_pins()


@pytest.fixture
def replay(replay_kf) -> ReplayFilter:
    f = ReplayFilter(replay_kf)
    f.at(0)
    return f


@contextlib.contextmanager
def background_traffic(kf: KernelFilter, frame: bytes, repeat: int):
    """Push `frame` through the program (BPF_PROG_TEST_RUN, `repeat` per
    call) from another thread until the block ends; yields the list of
    batch sizes run, so a test can tell how many packets were seen."""
    stop, runs = threading.Event(), []

    def traffic():
        while not stop.is_set():
            kf.test_run(frame, repeat=repeat)
            runs.append(repeat)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        yield runs
    finally:
        stop.set()
        t.join()
