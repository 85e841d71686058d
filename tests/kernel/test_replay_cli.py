"""`tidegate replay --pcap F --rules R --against B`, the real CLI on the real
replay build of the program.

The capture is paced so every verdict is known in advance: replay reads
time from each packet's timestamp, so a source's bucket refills by exactly
rate x (time between its packets). Source B sends 200 packets 10 us apart
(2 ms in all: 0.2 packets of refill at 100 pps, never a whole token), so
it passes exactly its burst: 50 under the candidate, 150 under the base.
Replay is deterministic; the 4 ms coarse-clock tolerance (replay.py) is
about replay against live traffic, not needed here, so numbers are exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import rule_set

from .frames import write_capture

BIN = Path(sys.executable).parent / "tidegate"

CANDIDATE = rule_set("replay-candidate")
BASE = CANDIDATE.replace('deny: ["203.0.113.0/24"]\n', "").replace("burst: 50", "burst: 150")

A, B, C, D = "198.51.100.1", "198.51.100.2", "203.0.113.5", "192.0.2.1"


def capture(path: Path) -> int:
    sched = [(i * 0.02, A, 7) for i in range(40)]  # 50 pps, 40 packets: inside both bursts
    sched += [(0.1 + i * 10e-6, B, 7) for i in range(200)]  # a burst of 200
    sched += [(0.3 + i * 0.001, C, 7) for i in range(30)]  # on the candidate's deny list only
    sched += [(0.5 + i * 0.001, D, 53) for i in range(20)]  # the default rule, far below its limit
    return write_capture(path, sched)


@pytest.mark.kernel
def test_replay_cli_against(tmp_path):
    pcap = tmp_path / "cap.pcap"
    n = capture(pcap)
    (tmp_path / "cand.yaml").write_text(CANDIDATE)
    (tmp_path / "base.yaml").write_text(BASE)
    r = subprocess.run([str(BIN), "-o", "json", "replay", "--pcap", str(pcap), "--rules", str(tmp_path / "cand.yaml"),
                        "--against", str(tmp_path / "base.yaml")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    cand, base = data["candidate"], data["base"]
    assert cand["packets"] == base["packets"] == n == 290

    # candidate: B passes its burst of 50, C is denied, A and D pass
    assert (cand["passed"], cand["dropped"]) == (110, 180)
    assert cand["reasons"]["rate"] == 150 and cand["reasons"]["deny"] == 30
    rule = cand["rules"]["r"]
    assert (rule["pass_packets"], rule["drop_packets"], rule["drop_rate"]) == (40 + 50, 150, 150)
    assert cand["rules"]["deny-list"]["drop_deny"] == 30
    assert (cand["rules"]["default"]["pass_packets"], cand["rules"]["default"]["drop_packets"]) == (20, 0)
    assert {s["source"]: s["packets"] for s in cand["top_dropped_sources"]} == {B: 150, C: 30}

    # base: B passes its burst of 150, nothing else is dropped
    assert (base["passed"], base["dropped"]) == (240, 50)
    rule = base["rules"]["r"]
    assert (rule["pass_packets"], rule["drop_packets"]) == (40 + 150 + 30, 50)
    assert {s["source"]: s["packets"] for s in base["top_dropped_sources"]} == {B: 50}

    # the difference, packet by packet: B's 51st..150th packets and all of C
    assert data["newly_dropped_packets"] == 100 + 30
    assert data["newly_passed_packets"] == 0
    assert data["newly_dropped_sources"] == 2
    assert data["top_newly_dropped_sources"] == [{"source": B, "packets": 100}, {"source": C, "packets": 30}]

    # the table form says the same
    r = subprocess.run([str(BIN), "replay", "--pcap", str(pcap), "--rules", str(tmp_path / "cand.yaml"),
                        "--against", str(tmp_path / "base.yaml")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "candidate newly drops 130 packets from 2 sources; newly passes 0" in r.stdout
    assert f"{B}: 100" in r.stdout and f"{C}: 30" in r.stdout
