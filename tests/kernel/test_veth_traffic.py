"""Real traffic over a veth pair: the program attached in native mode on the
host end, frames sent from inside a network namespace the test creates.

A spoofed flood spread over many addresses of one /16 (no single address
exceeds its limit) is caught by the prefix limit, while a legitimate
low-rate client gets every packet through to a socket. The program's
counters must agree exactly with what was sent."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest

from fixtures import rule_set
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.lab.veth import VethLab
from tidegate.ruleset.parse import parse_rule_set

RULES = rule_set("app-sink-prefix")

FLOOD = 60_000
FLOOD_SOURCES = 30_000
LEGIT = 100


@pytest.fixture(scope="module")
def lab():
    tag = f"k{os.getpid() % 100000}"
    with VethLab(tag, subnet="10.201.7") as lab:
        kf = KernelFilter(FilterConfig(interface=lab.host_if, pin_name=f"test-veth-{tag}", xdp_mode="native"))
        kf.load()
        kf.apply(parse_rule_set(RULES, "veth-test"), 1)
        assert kf.attach() == "native"
        try:
            yield lab, kf
        finally:
            kf.detach(remove_pins=True)
            kf.close()


def _sender(lab: VethLab, *args: str):
    return lab.popen_in_ns(
        [sys.executable, "-m", "tidegate.lab.traffic", "--iface", lab.peer_if, "--dst-mac", lab.host_mac(),
         "--dst-ip", lab.host_ip, *args],
        stdout=-1, stderr=-1, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip


@pytest.mark.kernel
def test_flood_dropped_legit_delivered(lab):
    lab, kf = lab
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.bind((lab.host_ip, 5555))
    rx.settimeout(0.5)
    received = []

    def receive():
        deadline = time.monotonic() + 30
        while len(received) < LEGIT and time.monotonic() < deadline:
            try:
                received.append(rx.recv(2048))
            except socket.timeout:
                pass

    before = kf.counters()
    t = threading.Thread(target=receive)
    t.start()
    legit = _sender(lab, "--src", lab.peer_ip, "--dport", "5555", "--count", str(LEGIT), "--pps", "50")
    flood = _sender(lab, "--src-net", "198.18.0.0/16", "--sources", str(FLOOD_SOURCES), "--count", str(FLOOD),
                    "--dport", "9", "--time-limit", "20")  # fmt: skip
    flood_out, flood_err = flood.communicate(timeout=60)
    legit_out, legit_err = legit.communicate(timeout=60)
    t.join()
    rx.close()
    assert flood.returncode == 0, flood_err
    assert legit.returncode == 0, legit_err
    flood_sent = json.loads(flood_out)["sent"]
    legit_sent = json.loads(legit_out)["sent"]
    assert legit_sent == LEGIT and flood_sent > FLOOD // 2

    after = kf.counters()
    sink = after.rules["sink"]
    sink0 = before.rules.get("sink")
    seen = (sink.pass_packets + sink.drop_packets) - ((sink0.pass_packets + sink0.drop_packets) if sink0 else 0)
    # every flood frame reached the program and was counted on its rule
    assert seen == flood_sent
    dropped = sink.drop_packets - (sink0.drop_packets if sink0 else 0)
    assert dropped == sink.drop_prefix - (sink0.drop_prefix if sink0 else 0), "the prefix limit did the dropping"
    # the prefix bucket lets through its burst plus its rate while the flood lasts
    assert dropped >= flood_sent - 1000 - 1000 * 20
    assert dropped > flood_sent * 0.5
    # the legitimate client got everything through to its socket
    assert len(received) == LEGIT
    app = after.rules["app"]
    assert app.pass_packets - (before.rules["app"].pass_packets if "app" in before.rules else 0) == LEGIT
    assert app.drop_packets == 0
    assert after.reasons["prefix"][0] - before.reasons["prefix"][0] == dropped
