"""FilterHealth's logic above the kernel: the status follows what the
attachment check says, watchers hear of changes only, and a Check answers
from a status at most CHECK_MAX_AGE old."""

from __future__ import annotations

import time

from grpc_health.v1 import health_pb2

from tidegate.api import readiness
from tidegate.api.readiness import NOT_SERVING, SERVING, FilterHealth


class _Context:
    def set_code(self, code):
        self.code = code


def _check(h: FilterHealth, service: str = "") -> int:
    return h.Check(health_pb2.HealthCheckRequest(service=service), _Context()).status


def test_status_follows_the_attachment_and_watchers_hear_changes_only(monkeypatch):
    monkeypatch.setattr(readiness, "CHECK_MAX_AGE", 0.0)
    state = {"attached": False, "asked": 0}

    def attached():
        state["asked"] += 1
        if state["attached"] is None:
            raise OSError("netlink went away")
        return state["attached"]

    h = FilterHealth(attached, ("tidegate.v1.Filter",))
    heard = []
    h.Watch(health_pb2.HealthCheckRequest(service=""), type("C", (), {"add_callback": lambda s, cb: None})(),
            send_response_callback=heard.append)  # fmt: skip
    assert (_check(h), _check(h, "tidegate.v1.Filter")) == (NOT_SERVING, NOT_SERVING)
    state["attached"] = True
    assert (_check(h), _check(h, "tidegate.v1.Filter")) == (SERVING, SERVING)
    for _ in range(3):
        h.refresh()
    state["attached"] = None  # cannot tell: not serving
    assert _check(h) == NOT_SERVING
    assert [r.status for r in heard] == [NOT_SERVING, SERVING, NOT_SERVING], "one message per change"
    ctx = _Context()
    h.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), ctx)
    assert ctx.code.name == "NOT_FOUND"


def test_a_check_answers_from_a_recent_status_without_asking_again(monkeypatch):
    monkeypatch.setattr(readiness, "CHECK_MAX_AGE", 60.0)
    asked = []
    h = FilterHealth(lambda: asked.append(1) or True, ())
    for _ in range(100):
        assert _check(h) == SERVING
    assert len(asked) == 1, "hammering Check costs no more netlink queries"
    monkeypatch.setattr(readiness, "CHECK_MAX_AGE", 0.0)
    time.sleep(0.001)
    _check(h)
    assert len(asked) == 2
