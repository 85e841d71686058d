"""Admission logic above the server: the read-call limits and the bounded
refused-call audit, with a clock the test moves and a list for a store
(the real server and store are in tests/e2e/test_refused_calls.py)."""

from __future__ import annotations

import threading

import grpc
import pytest

from tidegate.api.admission import MAX_EXPENSIVE_IN_FLIGHT, MAX_PEERS_A_MINUTE, PER_CALLER_IN_FLIGHT, ReadLimits, \
    Refusal, RefusalLog, _peer_address  # fmt: skip
from tidegate.client import server_host


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class ListStore:
    def __init__(self):
        self.rows = []

    def audit(self, action, result, author, peer, detail="", version=None):
        self.rows.append((action, result, author, peer, detail))


def refusal(limits: ReadLimits, who: str = "token:read") -> Refusal | None:
    try:
        with limits.slot(who, "WhatIf"):
            return None
    except Refusal as r:
        return r


def test_bucket_burst_then_rate_per_caller():
    clock = Clock()
    limits = ReadLimits(rate=2.0, burst=5, clock=clock)
    assert [refusal(limits) for _ in range(5)] == [None] * 5
    r = refusal(limits)
    assert r.reason == "rate-limited" and r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "token:read may make the next in 0.5 s" in r.message
    assert refusal(limits, "cert:other") is None  # another caller, another bucket
    clock.t += 0.5
    assert refusal(limits) is None and refusal(limits) is not None
    clock.t += 100  # refills up to the burst, not beyond
    assert [refusal(limits) for _ in range(6)].count(None) == 5


def test_in_flight_caps_per_caller_and_overall():
    limits = ReadLimits(rate=1000.0, burst=1000, clock=Clock())
    held = []
    for _ in range(PER_CALLER_IN_FLIGHT):
        cm = limits.slot("token:read", "WhatIf")
        cm.__enter__()
        held.append(cm)
    r = refusal(limits)
    assert r.reason == "busy" and "running already" in r.message
    for i in range(MAX_EXPENSIVE_IN_FLIGHT - PER_CALLER_IN_FLIGHT):
        cm = limits.slot(f"cert:c{i}", "WhatIf")
        cm.__enter__()
        held.append(cm)
    r = refusal(limits, "cert:new")
    assert r.reason == "busy" and f"{MAX_EXPENSIVE_IN_FLIGHT} expensive read calls" in r.message
    for cm in held:
        cm.__exit__(None, None, None)
    assert refusal(limits, "cert:new") is None and refusal(limits) is None
    # a refused or failed call gives its slot back
    with pytest.raises(ValueError):
        with limits.slot("token:read", "WhatIf"):
            raise ValueError
    assert limits._total == 0


def test_refusals_make_a_first_row_and_one_summary_per_peer_reason_and_minute():
    clock, store = Clock(60 * 1000), ListStore()
    log = RefusalLog(store, clock=clock)
    log.job.stop()  # the test flushes by itself
    for i in range(500):
        log.add("unauthenticated", f"ipv4:127.0.0.1:{40000 + i}", "?", "GetStatus" if i % 2 else "WhatIf")
    log.add("permission-denied", "ipv4:127.0.0.1:1", "token:read", "Rollback")
    assert store.rows == [("auth-denied", "unauthenticated", "?", "ipv4:127.0.0.1:40000", "WhatIf"),
                          ("auth-denied", "permission-denied", "token:read", "ipv4:127.0.0.1:1", "Rollback")]
    log.flush()  # the minute is not over: nothing more
    assert len(store.rows) == 2
    clock.t += 60
    log.flush()
    assert len(store.rows) == 3
    action, result, who, peer, detail = store.rows[2]
    assert (action, result, peer) == ("auth-denied", "unauthenticated", "ipv4:127.0.0.1")
    assert detail.startswith("499 more refused call(s) in the minute from 1970-01-01 16:40 UTC")
    assert "WhatIf x249" in detail and "GetStatus x250" in detail


def test_many_peers_overflow_into_one_row_and_the_counts_add_up():
    clock, store = Clock(60 * 2000), ListStore()
    log = RefusalLog(store, clock=clock)
    log.job.stop()
    sent = 0
    for minute in range(3):
        for i in range(5000):
            log.add("unauthenticated", f"ipv4:10.{minute}.{i // 250}.{i % 250}:999", "?", "GetStatus")
            sent += 1
        clock.t += 60
    log.close()
    assert len(store.rows) <= 3 * (2 * MAX_PEERS_A_MINUTE + 1)
    counted = 0
    for action, result, who, peer, detail in store.rows:
        if action == "refused-calls":
            assert result == "overflow" and "beyond the first" in detail
            counted += int(detail.split()[0])
        elif "more refused call(s)" in detail:
            counted += int(detail.split()[0])
        else:
            counted += 1
    assert counted == sent


def test_refusals_from_many_threads_are_all_counted():
    clock, store = Clock(), ListStore()
    log = RefusalLog(store, clock=clock)
    log.job.stop()

    def flood():
        for _ in range(1000):
            log.add("rate-limited", "ipv6:[::1]:5", "token:read", "WhatIf")

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert [r[3] for r in store.rows] == ["ipv6:[::1]:5", "ipv6:[::1]"]
    assert store.rows[1][4].startswith("7999 more")


def test_peer_addresses_and_server_hosts():
    assert _peer_address("ipv4:127.0.0.1:50312") == "ipv4:127.0.0.1"
    assert _peer_address("ipv6:[::1]:50312") == "ipv6:[::1]"
    assert _peer_address("unix:/run/x.sock") == "unix:/run/x.sock"
    for target, host in (("127.0.0.1:50051", "127.0.0.1"), ("[::1]:50051", "::1"), ("edge1:50051", "edge1"),
                         ("dns:///edge1:50051", "edge1"), ("ipv4:10.0.0.1:7", "10.0.0.1"), ("localhost", "localhost"),
                         ("::1", "::1")):  # fmt: skip
        assert server_host(target) == host, target
