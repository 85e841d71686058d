"""`set-limit --bps` is bits per second, from the CLI's help to the kernel's
bucket: the CLI sends it to a real agent, the agent stores it as the rule
set's `bps`, writes bps/8 bytes per second into the kernel's rule entry, and
the real program, replaying the stored version with a settable clock, passes
exactly what a byte bucket of bps/8 bytes per second passes. An omitted
--bps keeps the rule's byte limit, as the help says."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import yaml

from tidegate.kernel import bpfsys
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.kernel.layout import RULE_IDX, UNIT
from tidegate.ruleset.parse import parse_rule_set

from .conftest import BASE_RULES, BIN

pytestmark = pytest.mark.e2e

BPS = 80_000  # bits per second: 10,000 bytes per second
FRAME = 1000  # bytes on the wire, what the program's byte bucket counts


def _cli(agent, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TIDEGATE_SERVER": agent.server, "TIDEGATE_TOKEN_FILE": str(agent.state_dir / "tokens")}
    r = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _app_limit(agent, version: int) -> dict:
    rs = yaml.safe_load(agent.api.GetVersion(number=version).yaml)
    return next(r for r in rs["rules"] if r["name"] == "app")["limit"]


def _kernel_rule(agent, rule_idx: int) -> dict:
    """The active slot's per-source bucket of one rule, read from the agent's
    pinned maps (bpf/layout.h: tg_ctl.sel, then tg_rule_cfg.src)."""
    def read(name: str) -> tuple[bytes, int]:
        fd = bpfsys.obj_get(f"{agent.pin_dir}/{name}")
        try:
            info = bpfsys.map_info(fd)
            _, values, count = bpfsys.lookup_batch(fd, 4, info.value_size, info.max_entries)
        finally:
            os.close(fd)
        assert count == info.max_entries
        return values.tobytes(), info.value_size

    ctl, _ = read("tg_ctl")
    slot = int.from_bytes(ctl[:4], "little") & 0xFF
    rules, size = read("tg_rules")
    raw = rules[(slot * RULE_IDX + rule_idx) * size:][:size]
    fields = ("rate", "burst", "fill_ns", "brate", "bburst", "bfill_ns")  # after action, flags, block_ns
    return dict(zip(fields, (int.from_bytes(raw[16 + 8 * i:24 + 8 * i], "little") for i in range(6))))


def _expected_passes(bytes_per_s: int, burst_bytes: int, frames: int, gap_ns: int) -> int:
    """A byte bucket written the obvious way: full at the first frame, refilled
    by bytes_per_s, capped at burst_bytes."""
    tokens, passed = burst_bytes * UNIT, 0
    for i in range(frames):
        if i:
            tokens = min(burst_bytes * UNIT, tokens + gap_ns * bytes_per_s)
        if tokens >= FRAME * UNIT:
            tokens -= FRAME * UNIT
            passed += 1
    return passed


def test_bps_is_bits_per_second_from_the_help_to_the_kernel(start_agent, tmp_path):
    helptext = subprocess.run([str(BIN), "set-limit", "--help"], capture_output=True, text=True).stdout
    bps_help = " ".join(helptext[helptext.rindex("\n  --bps"):].split("--reason")[0].split())  # the option's text
    assert "bits per second" in bps_help and "bytes per second" not in bps_help, bps_help

    agent = start_agent("bps", BASE_RULES)
    out = _cli(agent, "set-limit", "app", "--pps", "1000", "--burst", "1000", "--bps", str(BPS), "--force",
               "--reason", "a byte limit").stdout  # fmt: skip
    assert f"{BPS} bits/s" in out, out
    version = agent.api.GetStatus().active_version
    assert _app_limit(agent, version) == {"pps": 1000, "burst": 1000, "bps": BPS, "burst_bytes": BPS // 8}

    # the agent wrote bps/8 bytes per second (bucket units per ns) into the kernel
    src = _kernel_rule(agent, 0)  # app is rule 0
    assert (src["brate"], src["bburst"]) == (BPS // 8, BPS // 8 * UNIT), src

    # the real program with the stored version: 100 frames of 1000 bytes a second for 10 s
    kf = KernelFilter(FilterConfig(interface=None, pin_name=f"test-bps-{os.getpid()}", replay_clock=True,
                                   max_sources=4096))  # fmt: skip
    kf.load()
    try:
        kf.apply(parse_rule_set(agent.api.GetVersion(number=version).yaml, "stored"), version)
        from scapy.layers.inet import IP, UDP
        from scapy.layers.l2 import Ether

        eth = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")  # fixed: no address lookup on the host's network
        frame = bytes(eth / IP(src="203.0.113.9", dst="10.0.0.1") / UDP(sport=1, dport=5555) / (b"x" * (FRAME - 42)))
        assert len(frame) == FRAME
        frames, gap_ns, passed = 1000, 10_000_000, 0
        for i in range(frames):
            kf.set_clock(10**12 + i * gap_ns)
            passed += kf.test_run(frame)[0] == 2  # XDP_PASS
    finally:
        kf.close()
        kf.remove_pins()
    want = _expected_passes(BPS // 8, BPS // 8, frames, gap_ns)
    seconds = (frames - 1) * gap_ns / 1e9
    assert math.floor((BPS / 8 * (1 + seconds)) / FRAME) - 1 <= want <= math.ceil((BPS / 8 * (1 + seconds)) / FRAME)
    assert passed == want, f"{passed} frames passed, a {BPS // 8} bytes/s bucket passes {want}"

    # no --bps: the byte limit stays (the help's "default: keep")
    _cli(agent, "set-limit", "app", "--pps", "2000", "--force", "--reason", "more packets, same bytes")
    version = agent.api.GetStatus().active_version
    assert _app_limit(agent, version) == {"pps": 2000, "burst": 2000, "bps": BPS, "burst_bytes": BPS // 8}
    assert _kernel_rule(agent, 0)["brate"] == BPS // 8
