"""The gRPC service (tidegate.v1.Filter): a thin adapter. Each method turns
its request into a call of the change service (changes/service.py) or of a
reader (the agent's status and counters, observation, safety), and the
answer into a message; OperationError becomes a gRPC status code, with the
field errors and the estimate in trailers. api/server.py serves it."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import grpc

from tidegate.api import messages
from tidegate.api.admission import EXPENSIVE_READS, Admission, Refusal, busy
from tidegate.operation import Caller, OperationError
from tidegate.kernel.filter import KernelError, NotAttachedError
from tidegate.kernel.layout import DROP_REASONS
from tidegate.observation import insight, top
from tidegate.ruleset.dump import dump_yaml
from tidegate.ruleset.model import MAX_ERRORS, RuleSetError
from tidegate.safety.propose import propose
from tidegate.store import StoreError
from tidegate.v1 import tidegate_pb2 as pb
from tidegate.v1 import tidegate_pb2_grpc as pbg

log = logging.getLogger("tidegate.api.service")
ERRORS_KEY = "tidegate-errors-bin"
# each WatchCounters stream and each expensive read call holds a worker thread: capped apart
# (MAX_WATCHERS, admission.MAX_EXPENSIVE_IN_FLIGHT) so that at least 12 are always left for the rest
WORKERS = 24
MAX_WATCHERS = 8
# a list answer (versions, audit rows) stops before this many bytes: under any client's default receive
# limit (4 MiB); the rows read for it are bounded too (versions only admins make; audit rows by count)
MAX_LIST_BYTES = (4 << 20) - (64 << 10)
MAX_AUDIT_ROWS = 10_000


def _bounded(items, max_bytes: int = MAX_LIST_BYTES) -> list:
    """The first messages of `items` that fit in max_bytes together (the newest first: the caller pages on)."""
    out, size = [], 0
    for m in items:
        size += m.ByteSize() + 4  # + the field's tag and length
        if size > max_bytes:
            break
        out.append(m)
    return out


def _violations(errors) -> list[pb.FieldViolation]:
    """At most MAX_ERRORS, each cut like the trailer's: a ValidateResponse stays within ~60 KB."""
    return [pb.FieldViolation(path=e.path[:200], line=e.line or 0, message=e.message[:300])
            for e in errors[:MAX_ERRORS]]  # fmt: skip


# Clients refuse responses whose metadata exceeds 8 KiB (grpc's default
# soft limit) with RESOURCE_EXHAUSTED, hiding the real status. Keep the
# field-error trailer (base64 on the wire: x4/3) and the status message
# well inside it together; the first errors are the ones people fix first.
MAX_ERRORS_TRAILER = 2500  # serialized ValidationErrors, bytes
MAX_STATUS_MESSAGE = 1500  # characters


def _errors_trailer(source: str, errors) -> bytes:
    msg = pb.ValidationErrors(source=source[:200])
    for i, e in enumerate(errors):
        msg.violations.append(pb.FieldViolation(path=e.path[:200], line=e.line or 0, message=e.message[:300]))
        if msg.ByteSize() > MAX_ERRORS_TRAILER - 60:
            while msg.violations and msg.ByteSize() > MAX_ERRORS_TRAILER - 60:
                del msg.violations[-1]
            more = len(errors) - len(msg.violations)
            msg.violations.append(pb.FieldViolation(message=f"... and {more} more error(s) not shown"))
            break
    return msg.SerializeToString()


def _status_message(text: str) -> str:
    if len(text) <= MAX_STATUS_MESSAGE:
        return text
    head = text[:MAX_STATUS_MESSAGE].rsplit("\n", 1)[0]
    more = text[len(head):].count("\n")
    return f"{head}\n... and {more} more line(s)"


def estimate_pb(est) -> pb.Estimate | None:
    if est is None:
        return None
    return pb.Estimate(
        window_seconds=est.window_seconds,
        sources_seen=est.sources_seen,
        sources_newly_dropped=est.sources_newly_dropped,
        packets_per_second=est.packets_per_second,
        newly_dropped_pps=est.newly_dropped_pps,
        packet_share=est.packet_share,
        source_share=est.source_share,
        within_budget=est.within_budget,
        packet_budget=est.packet_budget,
        source_budget=est.source_budget,
        rules=[pb.RuleEstimate(rule=r.rule, sources_newly_dropped=r.sources_newly_dropped,
                               newly_dropped_pps=r.newly_dropped_pps) for r in est.rules],  # fmt: skip
        top_affected=[pb.SourceRate(address=a["address"], rule=a["rule"], pps=a["pps"], drop_pps=a["drop_pps"])
                      for a in est.top_affected],  # fmt: skip
        summary=est.summary,
        folded_sources=est.folded_sources,
        folded_packet_share=est.folded_packet_share,
    )


def _apply_pb(out) -> pb.ApplyResponse:
    return pb.ApplyResponse(
        version=out.version, shadow=out.shadow, estimate=estimate_pb(out.estimate), guarded=out.guarded,
        guard_outcome=out.guard_outcome, guard_cause=out.guard_cause, rolled_back_to=out.rolled_back_to,
    )  # fmt: skip


def counters_pb(agent) -> pb.Counters:
    c = agent.counters()
    st = agent.kf.state()
    msg = pb.Counters(
        lru_inserts=c.lru_inserts, lru_insert_failures=c.lru_insert_failures,
        active_version=st.active.version if st.active else 0, shadow_version=st.shadow.version if st.shadow else 0,
        time=time.time(), packets=c.packets, dropped=c.dropped,
    )  # fmt: skip
    for reason, (pk, by) in c.reasons.items():
        verdict = "drop" if reason in DROP_REASONS else "pass"
        msg.reasons.append(pb.ReasonCount(reason=reason, verdict=verdict, packets=pk, bytes=by))
    for name, rc in sorted(c.rules.items()):
        msg.rules.append(pb.RuleCount(
            rule=name, pass_packets=rc.pass_packets, drop_packets=rc.drop_packets, pass_bytes=rc.pass_bytes,
            drop_bytes=rc.drop_bytes, drop_rate=rc.drop_rate, drop_prefix=rc.drop_prefix,
            drop_blocked=rc.drop_blocked, drop_deny=rc.drop_deny))  # fmt: skip
    for name, sc in sorted(c.shadow.items()):
        msg.shadow.append(pb.ShadowCount(rule=name, packets=sc.packets, would_drop=sc.would_drop,
                                         would_drop_new=sc.would_drop_new))  # fmt: skip
    return msg


def _author(principal: str, claimed: str, limit: int = 200) -> str:
    """The audit's author: the authenticated principal, always, and the name
    the client says it acts for (the CLI sends the sudo user) only beside it:
    a header is not an identity, so it can add a name but never replace one."""
    claimed = "".join(c if c.isprintable() else "?" for c in claimed).strip()  # one audit line stays one line
    if not claimed or claimed == principal or principal.endswith(f":{claimed}"):
        return principal[:limit]
    return f"{principal} (as {claimed[: max(0, limit - len(principal) - 6)]})"[:limit]


class FilterService(pbg.FilterServicer):
    """`agent`: the daemon's parts (daemon/agent.py); changes go through `agent.changes`."""

    def __init__(self, agent, admission: Admission):
        self.agent = agent
        self.changes = agent.changes
        self.admission = admission
        self._watchers = threading.BoundedSemaphore(MAX_WATCHERS)

    # ------------------------------------------------------------ plumbing
    def _caller(self, context, method: str) -> tuple[Caller, str]:
        """The caller and its principal (who), or the call ends refused."""
        md = dict(context.invocation_metadata())
        try:
            role, who = self.admission.authorize(method, md, context)
        except Refusal as r:
            self.admission.refuse(r, context, method)
        peer = context.peer()
        return Caller(author=_author(who or peer, md.get("tidegate-author", "")), peer=peer, role=role), who

    def _run(self, context, method: str, fn, expensive: bool | None = None):
        caller, who = self._caller(context, method)
        if expensive is None:
            expensive = method in EXPENSIVE_READS
        limits = self.admission.expensive(caller.role, who, method) if expensive else contextlib.nullcontext()
        try:
            with limits:
                return fn(caller)
        except Refusal as r:
            self.admission.refuse(r, context, method)
        except OperationError as e:
            trailers = []
            if e.violations:
                trailers.append((ERRORS_KEY, _errors_trailer(e.source, e.violations)))
            if e.estimate is not None:
                trailers.append(("tidegate-estimate-bin", estimate_pb(e.estimate).SerializeToString()))
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            context.abort(getattr(grpc.StatusCode, e.code), _status_message(e.message))
        except NotAttachedError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except KernelError as e:
            context.abort(grpc.StatusCode.INTERNAL, f"kernel: {e}")
        except StoreError as e:
            context.abort(grpc.StatusCode.INTERNAL, f"store: {e}")
        except Exception as e:  # a bug: say so clearly, keep serving
            if isinstance(e, grpc.RpcError) or type(e).__name__ == "_AbortError" or context.code() is not None:
                raise
            log.exception("unexpected error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(e).__name__}: {e}")

    # ---------------------------------------------------------------- RPCs
    def GetStatus(self, request, context):
        return self._run(context, "GetStatus", lambda c: pb.Status(**self.agent.status()))

    def ValidateRuleSet(self, request, context):
        def fn(c):
            try:
                rs = self.changes.validate(request.yaml, request.source)
            except RuleSetError as e:
                return pb.ValidateResponse(valid=False, violations=_violations(e.errors))
            return pb.ValidateResponse(valid=True, canonical_yaml=dump_yaml(rs), digest=rs.digest(),
                                       rules=len(rs.rules))  # fmt: skip

        return self._run(context, "ValidateRuleSet", fn)

    def ApplyRuleSet(self, request, context):
        def fn(c):
            guard = True if request.guard else (False if request.no_guard else None)
            rs = self.changes.parse(request.yaml, request.source, c, "apply")
            out = self.changes.apply(rs, request.reason, c, shadow=request.shadow, force=request.force, guard=guard,
                                     guard_seconds=request.guard_seconds, wait_for_guard=request.wait_for_guard)  # fmt: skip
            return _apply_pb(out)

        return self._run(context, "ApplyRuleSet", fn)

    def Rollback(self, request, context):
        return self._run(context, "Rollback",
                         lambda c: _apply_pb(self.changes.rollback(request.to_version or None, request.reason, c)))  # fmt: skip

    def ListVersions(self, request, context):
        def fn(c):
            rows = self.agent.store.list_versions(request.limit or 50, request.offset)
            return pb.ListVersionsResponse(versions=_bounded(_version_info(v) for v in rows))

        return self._run(context, "ListVersions", fn)

    def GetVersion(self, request, context):
        def fn(c):
            v = self.changes.get_version(request.number)
            return pb.Version(info=_version_info(v), yaml=v.content)

        return self._run(context, "GetVersion", fn)

    def GetCounters(self, request, context):
        return self._run(context, "GetCounters", lambda c: counters_pb(self.agent))

    def TopSources(self, request, context):
        def fn(c):
            by = request.by or "packets"
            if by not in ("packets", "drops"):
                raise OperationError("INVALID_ARGUMENT", f"by must be packets or drops, not {by!r}")
            if not 0 <= request.window_seconds <= self.agent.sampler.window:  # NaN fails this too
                raise OperationError("INVALID_ARGUMENT", f"window_seconds must be between 0 (the last sample "
                                     f"interval) and {self.agent.sampler.window:g} (the sampler's history)")  # fmt: skip
            rows, secs, folded = self.agent.top_sources(request.n or 10, by, request.shadow, request.window_seconds)
            return pb.TopSourcesResponse(sources=[pb.SourceRate(**r) for r in rows], interval_seconds=secs,
                                         tracked_sources=self.agent.sampler.tracked_sources,
                                         folded_intervals=folded)  # fmt: skip

        # the last interval is a few ms at any number of sources; a window sums up to TOP_WINDOW_ROWS rows
        return self._run(context, "TopSources", fn, expensive=request.window_seconds != 0)

    def WatchCounters(self, request, context):
        _, who = self._caller(context, "WatchCounters")
        # each stream holds a worker thread: cap them so watchers cannot starve other calls
        if not self._watchers.acquire(blocking=False):
            self.admission.refuse(busy(f"{MAX_WATCHERS} watch streams are open already; try again later", who),
                                  context, "WatchCounters")  # fmt: skip
        try:
            interval = max(0.1, (request.interval_ms or 1000) / 1000.0)
            gone = threading.Event()  # wakes the wait below when the client goes away
            context.add_callback(gone.set)
            sent = 0
            while context.is_active() and not gone.is_set():
                try:
                    msg = counters_pb(self.agent)
                except (OperationError, NotAttachedError) as e:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, getattr(e, "message", str(e)))
                yield msg
                sent += 1
                if request.max_updates and sent >= request.max_updates:
                    return
                gone.wait(interval)
        finally:
            self._watchers.release()

    def UpdateThresholds(self, request, context):
        def fn(c):
            if not request.rule:
                raise OperationError("INVALID_ARGUMENT", "rule is required (a rule name or 'default')")
            if request.pps <= 0:
                raise OperationError("INVALID_ARGUMENT", "pps must be > 0")
            out = self.changes.set_limit(request.rule, request.pps, request.burst, request.bps, request.reason, c,
                                         force=request.force)  # fmt: skip
            return _apply_pb(out)

        return self._run(context, "UpdateThresholds", fn)

    def PromoteShadow(self, request, context):
        return self._run(context, "PromoteShadow", lambda c: _apply_pb(self.changes.promote(request.reason, c)))

    def ClearShadow(self, request, context):
        return self._run(context, "ClearShadow",
                         lambda c: pb.ClearShadowResponse(cleared_version=self.changes.clear_shadow(request.reason, c)))  # fmt: skip

    def ShadowReport(self, request, context):
        def fn(c):
            r = top.shadow_report(self.agent.kf, self.agent.sampler, self.changes.shadow_loaded_at, request.top or 10)
            rules = [pb.ShadowRule(**{**x, "top_affected": [pb.SourceRate(**s) for s in x["top_affected"]]})
                     for x in r["rules"]]  # fmt: skip
            return pb.ShadowReportResponse(**{**r, "rules": rules,
                                              "top_affected": [pb.SourceRate(**s) for s in r["top_affected"]]})

        return self._run(context, "ShadowReport", fn)

    def WhatIf(self, request, context):
        def fn(c):
            try:
                rs = self.changes.validate(request.yaml, request.source)
            except RuleSetError as e:
                raise OperationError("INVALID_ARGUMENT", str(e), e.errors, e.source) from None
            est, problems = self.changes.what_if(rs)
            msg = estimate_pb(est)
            if problems:
                msg.within_budget = False
                msg.summary = "; ".join(problems)
            return msg

        return self._run(context, "WhatIf", fn)

    def GetReview(self, request, context):
        def fn(c):
            self.changes.get_version(request.version)
            # before/after over the version's first hour (or less), recorded by the agent itself (safety/review.py)
            data = self.agent.reviews.get(request.version)
            return messages.review(data, strict=False)

        return self._run(context, "GetReview", fn)

    def ListAudit(self, request, context):
        def fn(c):
            rows = self.agent.store.list_audit(min(request.limit or 100, MAX_AUDIT_ROWS), action=request.action or None)
            return pb.ListAuditResponse(entries=_bounded(
                pb.AuditEntry(time=r.time_iso, action=r.action, result=r.result, author=r.author, peer=r.peer,
                              version=r.version or 0, detail=r.detail) for r in rows))  # fmt: skip

        return self._run(context, "ListAudit", fn)

    def Insight(self, request, context):
        def fn(c):
            data = self.agent.insight.read()
            if request.propose:
                data["proposal"] = propose(self.agent, data)
            return messages.insight(data)  # made now, never stored: strict

        return self._run(context, "Insight", fn)


def _version_info(v) -> pb.VersionInfo:
    return pb.VersionInfo(number=v.number, state=v.state, created=v.created_iso, author=v.author, reason=v.reason,
                          source=v.source, digest=v.digest, active=v.active, activations=v.activations,
                          error=v.error)  # fmt: skip
