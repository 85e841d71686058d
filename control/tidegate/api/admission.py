"""Who gets in, how often, and what refused calls leave behind.

- Admission is a grpc.ServerInterceptor. With tokens (the loopback set-up)
  it checks the bearer token, and the admin role for admin methods, from
  the call's metadata before the server reads the request: a refused
  caller's body (up to MAX_MESSAGE_BYTES) is never received into Python
  nor decoded. With mTLS the handshake already requires a certificate
  signed by the client CA; the role comes from the certificate's name,
  which only the call's context carries, so the service checks it as the
  call starts (FilterService._caller).
- ReadLimits: read callers' expensive calls (EXPENSIVE_READS, chosen by
  measuring: their work grows with the input or with the tracked sources)
  go through a token bucket per caller (--read-call-burst at once,
  --read-call-rate a second after that), at most PER_CALLER_IN_FLIGHT of
  one caller and MAX_EXPENSIVE_IN_FLIGHT of all callers run at once, so
  they never hold more than that many of the server's worker threads.
  Admins are not limited: an admin can change the filter anyway.
- RefusalLog: every refusal is counted by reason (`tidegate_api_refused_total`)
  and audited in bounded form: per (peer address, reason) and minute the
  first refusal is written at once, the others are counted and written as
  one row when the minute is over; beyond MAX_PEERS_A_MINUTE pairs in a
  minute, one overflow row counts the rest. A flood of refused calls adds
  at most 2 x MAX_PEERS_A_MINUTE + 1 rows a minute, however many calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone

import grpc

from tidegate.periodic import Periodic
from tidegate.ruleset.model import MAX_FILE_BYTES

log = logging.getLogger("tidegate.api.service")

SERVICE = "tidegate.v1.Filter"
_PREFIX = "/tidegate.v1."  # every tidegate service (Filter, Blocklist); not health or reflection
# a rule-set text at its limit, plus the request's other fields (reason, source, flags)
MAX_MESSAGE_BYTES = MAX_FILE_BYTES + (64 << 10)
READ_METHODS = {
    "GetStatus", "ValidateRuleSet", "ListVersions", "GetVersion", "GetCounters", "TopSources", "WatchCounters",
    "ShadowReport", "WhatIf", "GetReview", "ListAudit", "Insight", "DenyList",
}  # fmt: skip
# measured at 100,000 tracked sources: WhatIf 2 s of CPU, ShadowReport 0.6 s, TopSources over a window
# 0.1 s (at most ~1 s by design), ValidateRuleSet up to ~1.6 s for the largest text; Insight, GetReview,
# TopSources of the last interval, counters, versions and audit stay within a few ms
EXPENSIVE_READS = {"ValidateRuleSet", "WhatIf", "ShadowReport", "TopSources"}
# They are CPU-bound Python (one GIL): more at once would not finish sooner, only hold more memory
# (the largest rule set costs ~140 MB while it is parsed) and more worker threads.
PER_CALLER_IN_FLIGHT = 1
MAX_EXPENSIVE_IN_FLIGHT = 4
REASONS = ("unauthenticated", "permission-denied", "rate-limited", "busy")
MAX_PEERS_A_MINUTE = 32


class Refusal(Exception):
    """A call that is not let in: its gRPC status, message and metric reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, who: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.who = who


class Admission(grpc.ServerInterceptor):
    def __init__(self, authorizer, store, rate: float = 1.0, burst: int = 10, clock=time.monotonic):
        self.auth = authorizer
        self.limits = ReadLimits(rate, burst, clock)
        self.refusals = RefusalLog(store)
        self.refused_total = dict.fromkeys(REASONS, 0)
        self._lock = threading.Lock()

    # ------------------------------------------------------- before the body
    def intercept_service(self, continuation, details):
        if not details.method.startswith(_PREFIX) or self.auth.mode == "cert":
            return continuation(details)
        method = details.method.rpartition("/")[2]
        try:
            self.authorize(method, dict(details.invocation_metadata), None)
        except Refusal as r:
            return self._refusing(continuation(details), r, method)
        return continuation(details)

    def _refusing(self, handler, r: Refusal, method: str):
        """A handler that refuses the call without reading its request: a
        request-streaming one whose request iterator is never touched, so the
        body is not received, let alone decoded."""
        if handler is None:  # not a method of the service: gRPC answers UNIMPLEMENTED
            return None

        def refuse(_requests, context):
            self.refuse(r, context, method)

        def refuse_stream(_requests, context):
            self.refuse(r, context, method)
            yield  # never reached: abort raises

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        return grpc.stream_unary_rpc_method_handler(refuse)

    # ------------------------------------------------------- in the service
    def authorize(self, method: str, metadata: dict, context) -> tuple[str, str]:
        """(role, who), or Refusal."""
        role, who = self.auth.authorize(context, metadata)
        if role is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          "no valid credentials: use a client certificate or the token file (--token-file)",
                          "unauthenticated")  # fmt: skip
        if method not in READ_METHODS and role != "admin":
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the admin role; {who} has {role}",
                          "permission-denied", who)  # fmt: skip
        return role, who

    def refuse(self, r: Refusal, context, method: str) -> None:
        """Count and audit a refusal, then end the call with it (raises)."""
        self.count(r.reason)
        try:
            self.refusals.add(r.reason, context.peer(), r.who or "?", method)
        except Exception:  # the store failing must not turn a refusal into an internal error
            log.exception("auditing a refused call failed")
        context.abort(r.code, r.message)

    def count(self, reason: str) -> None:
        with self._lock:
            self.refused_total[reason] = self.refused_total.get(reason, 0) + 1

    @contextmanager
    def expensive(self, role: str, who: str, method: str):
        """Around an expensive read call: the caller's limits (Refusal when over)."""
        if role == "admin":
            yield
            return
        with self.limits.slot(who, method):
            yield

    def close(self) -> None:
        self.refusals.close()


def busy(message: str, who: str) -> Refusal:
    return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "busy", who)


class ReadLimits:
    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}  # who -> [tokens, last refill]
        self._in_flight: Counter = Counter()
        self._total = 0

    @contextmanager
    def slot(self, who: str, method: str):
        with self._lock:
            if self._in_flight[who] >= PER_CALLER_IN_FLIGHT:
                raise busy(f"{who} has {PER_CALLER_IN_FLIGHT} expensive read calls running already; wait for "
                           "one to finish", who)  # fmt: skip
            if self._total >= MAX_EXPENSIVE_IN_FLIGHT:
                raise busy(f"{MAX_EXPENSIVE_IN_FLIGHT} expensive read calls are running already; try again in a "
                           "moment", who)  # fmt: skip
            now = self.clock()
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                wait = (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"rate limit: {method} is an expensive read call, and a read caller may make "
                              f"{self.burst} of them at once and {self.rate:g} a second after that; "
                              f"{who} may make the next in {wait:.1f} s", "rate-limited", who)  # fmt: skip
            if len(self._buckets) > 4096:  # identities are few; forget the idle ones (their buckets are full)
                self._buckets = {k: v for k, v in self._buckets.items() if self._in_flight[k]}
            self._buckets[who] = [tokens - 1.0, now]
            self._in_flight[who] += 1
            self._total += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[who] -= 1
                if not self._in_flight[who]:
                    del self._in_flight[who]
                self._total -= 1


def _peer_address(peer: str) -> str:
    """"ipv4:127.0.0.1:50312" -> "ipv4:127.0.0.1": a caller reconnecting gets a new port, not a new row."""
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() and head.count(":") >= 1 else peer


def _minute(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class RefusalLog:
    FLUSH_SECONDS = 5.0

    def __init__(self, store, clock=time.time):
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._minute = None  # the minute being counted (int(t // 60))
        self._open: dict[tuple[str, str], dict] = {}  # (peer address, reason) -> counts of that minute
        self._overflow = Counter()  # reason -> refusals beyond MAX_PEERS_A_MINUTE pairs
        self._overflow_peers: set[str] = set()
        self.job = Periodic("refusal-log", self.FLUSH_SECONDS, self.flush, log,
                             "writing the refused-call summary failed")
        self.job.start()

    def add(self, reason: str, peer: str, who: str, method: str) -> None:
        now = self.clock()
        first = None
        with self._lock:
            closed = self._roll(now)
            key = (_peer_address(peer), reason)
            row = self._open.get(key)
            if row is None and len(self._open) >= MAX_PEERS_A_MINUTE:
                self._overflow[reason] += 1
                if len(self._overflow_peers) < 10_000:
                    self._overflow_peers.add(key[0])
            elif row is None:
                self._open[key] = {"more": 0, "methods": Counter(), "who": who}
                first = (reason, peer, who, method)
            else:
                row["more"] += 1
                if len(row["methods"]) < 20 or method in row["methods"]:
                    row["methods"][method] += 1
        self._write(closed)
        if first is not None:
            reason, peer, who, method = first
            self.store.audit(_action(reason), reason, who[:200], peer[:200], method)

    def flush(self, everything: bool = False) -> None:
        """Write the rows of minutes that are over (all of them with everything=True)."""
        with self._lock:
            closed = self._roll(self.clock(), everything)
        self._write(closed)

    def close(self) -> None:
        self.job.stop()
        self.flush(everything=True)

    def _roll(self, now: float, everything: bool = False) -> list[tuple]:
        """Under the lock: the summary rows of the minute being counted if it is over."""
        minute = int(now // 60)
        if self._minute == minute and not everything:
            return []
        rows = []
        if self._minute is not None:
            when = _minute(self._minute * 60)
            for (addr, reason), row in self._open.items():
                if row["more"]:
                    methods = ", ".join(f"{m} x{n}" for m, n in row["methods"].most_common())
                    rows.append((_action(reason), reason, row["who"][:200], addr[:200],
                                 f"{row['more']} more refused call(s) in the minute from {when} ({methods})"))  # fmt: skip
            if self._overflow:
                n = sum(self._overflow.values())
                reasons = ", ".join(f"{r} x{c}" for r, c in self._overflow.most_common())
                rows.append(("refused-calls", "overflow", "?", f"{len(self._overflow_peers)} more peer(s)",
                             f"{n} refused call(s) in the minute from {when} beyond the first "
                             f"{MAX_PEERS_A_MINUTE} peers and reasons ({reasons})"))  # fmt: skip
        self._minute = minute
        self._open = {}
        self._overflow = Counter()
        self._overflow_peers = set()
        return rows

    def _write(self, rows: list[tuple]) -> None:
        for action, result, who, peer, detail in rows:
            self.store.audit(action, result, who, peer, detail)


def _action(reason: str) -> str:
    return "auth-denied" if reason in ("unauthenticated", "permission-denied") else "call-refused"
