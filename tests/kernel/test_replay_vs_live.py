"""Offline replay gives the verdicts the live program gives.

One generated capture (three sources: under, over and bursting past their
limit) is run through the replay build with its own timestamps, and sent
live over veth at the same pacing through the real program. Per-rule and
per-source counters must agree within the documented token-bucket
tolerance: limit x (4 ms coarse-clock step + the live sender's pacing
error) + 1 packet per source; here 6% of a source's packets, at least 8."""

from __future__ import annotations

import json
import os
import sys

import pytest

from fixtures import rule_set
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.lab.veth import VethLab
from tidegate.lab.replay import replay
from tidegate.ruleset.parse import parse_rule_set

from .frames import write_capture

RULES = rule_set("replay-live")


def capture(path, dst_ip: str):
    sched = []
    for i in range(100):  # A: 50 pps for 2 s, always within its limit
        sched.append((i / 50, "198.51.100.1"))
    for i in range(600):  # B: 300 pps for 2 s, three times its limit
        sched.append((i / 300, "198.51.100.2"))
    for i in range(200):  # C: a burst of 200 within 0.2 s, then quiet
        sched.append((0.5 + i / 1000, "198.51.100.3"))
    return write_capture(path, [(t, src, 7) for t, src in sched], dst_ip)


@pytest.mark.kernel
def test_replay_matches_live(tmp_path):
    rs = parse_rule_set(RULES)
    tag = f"r{os.getpid() % 100000}"
    with VethLab(tag, subnet="10.209.1") as lab:
        pcap = tmp_path / "cap.pcap"
        n = capture(pcap, lab.host_ip)
        offline = replay(str(pcap), rs)
        assert offline.packets == n

        kf = KernelFilter(FilterConfig(interface=lab.host_if, pin_name=f"test-rvl-{tag}", xdp_mode="native"))
        kf.load()
        try:
            kf.apply(rs, 1)
            kf.attach()
            p = lab.popen_in_ns([sys.executable, "-m", "tidegate.lab.traffic", "--iface", lab.peer_if, "--dst-mac",
                                 lab.host_mac(), "--dst-ip", lab.host_ip, "--pcap", str(pcap)],
                                stdout=-1, stderr=-1, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert json.loads(out)["sent"] == n
            live = kf.counters().rules["r"]
            table = kf.read_sources()
            epoch = kf.state().active.epoch
            live_src = {table.address(i): (int(table.packets[i]), int(table.drops[i])) for i in range(table.count)
                        if table.epoch[i] == epoch and table.kind[i] == 0}  # fmt: skip
        finally:
            kf.detach(remove_pins=True)
            kf.close()

    off = offline.rules["r"]
    assert off.pass_packets + off.drop_packets == live.pass_packets + live.drop_packets == n
    tol = max(8, int(0.06 * n))
    assert abs(off.drop_packets - live.drop_packets) <= tol, (off, live)
    for src, packets in (("198.51.100.1", 100), ("198.51.100.2", 600), ("198.51.100.3", 200)):
        o = offline.dropped_sources.get(src, 0)
        lp, ld = live_src[src]
        assert lp == packets
        assert abs(o - ld) <= max(8, int(0.06 * packets)), (src, o, ld)
    # the figures themselves: A never dropped, B about 2/3 dropped, C past its burst dropped
    assert offline.dropped_sources.get("198.51.100.1", 0) == 0
    assert 330 <= offline.dropped_sources["198.51.100.2"] <= 380
    assert 120 <= offline.dropped_sources["198.51.100.3"] <= 140
