"""gRPC health that says whether the filter is on its interface.

SERVING means the agent answers and its XDP program is attached; while it
is not (started without a rule set, or something removed the program until
the watchdog attaches it again, or the interface is gone) the overall
status and the Filter service's are NOT_SERVING, so a load balancer or an
orchestrator probe sees an edge host whose gate is open.

Check answers from a status at most CHECK_MAX_AGE old (one netlink query
then, never the kernel filter's lock, so a long apply does not stall health
checks and a caller hammering Check costs at most a few queries a second);
Watch streams hear of a change when the agent's watchdog next looks.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from grpc_health.v1 import health, health_pb2

CHECK_MAX_AGE = 0.25  # seconds

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FilterHealth(health.HealthServicer):
    def __init__(self, attached: Callable[[], bool], services: tuple[str, ...]):
        super().__init__()
        self._attached = attached
        self._services = tuple(dict.fromkeys(("", *services)))
        self._refresh_lock = threading.Lock()
        self._status: int | None = None
        self._checked = 0.0
        self.refresh()

    def refresh(self) -> bool:
        """Look again; tell watchers if the status changed. True if attached."""
        with self._refresh_lock:
            try:
                ok = bool(self._attached())
            except Exception:  # cannot tell: not a state to report as serving
                ok = False
            self._checked = time.monotonic()
            status = SERVING if ok else NOT_SERVING
            if status != self._status:
                self._status = status
                for service in self._services:
                    self.set(service, status)
            return ok

    def Check(self, request, context):
        if time.monotonic() - self._checked > CHECK_MAX_AGE:
            self.refresh()
        return super().Check(request, context)
