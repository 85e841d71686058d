"""`tidegate agent`: the daemon that owns the filter on one interface.

Start-up order matters for "never fail open" and "a failed start leaves
nothing behind": the gRPC and metrics ports are bound first, then the store
is opened, then the program is loaded (adopting an attached program and its
pinned maps), the store is reconciled with the kernel, and only then, if
the kernel had no rule set, the initial one is written and the program
attached. On SIGTERM the agent stops serving and leaves the program
attached with its maps pinned (unless --detach-on-exit): traffic stays
filtered by the last rule set while no agent runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from tidegate import __version__
from tidegate.access.auth import is_loopback as _is_loopback
from tidegate.kernel.filter import FilterConfig, InterfaceError, KernelError, KernelFilter, NotAttachedError
from tidegate.ruleset.model import FieldError, Limit, RuleSet, RuleSetError, dump_yaml, load_rule_set, parse_rule_set
from tidegate.observation.sampler import Sampler
from tidegate.observation.window import SourceWindow
from tidegate.store import StoreError, VersionNotFound, VersionStore

log = logging.getLogger("tidegate.daemon.agent")

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS = "127.0.0.1:9640"
DEFAULT_STATE_DIR = "/var/lib/tidegate"
TOP_WINDOW_ROWS = 2_000_000  # per-source rows one windowed TopSources call may sum (~1 s of CPU)


class OperationError(Exception):
    """A refused or failed operation; `code` is the gRPC status code name."""

    def __init__(self, code: str, message: str, violations: list[FieldError] | None = None,
                 source: str = "", estimate=None):  # fmt: skip
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations or []
        self.source = source
        self.estimate = estimate


@dataclass
class Caller:
    author: str
    peer: str
    role: str = "admin"


@dataclass
class ApplyOutcome:
    version: int
    shadow: bool = False
    estimate: object = None
    guarded: bool = False
    guard_outcome: str = ""
    guard_cause: str = ""
    rolled_back_to: int = 0


class Agent:
    """Everything the API does, on one KernelFilter and one VersionStore."""

    def __init__(self, kf: KernelFilter, store: VersionStore, options: argparse.Namespace):
        self.kf = kf
        self.store = store
        self.options = options
        self.started = time.monotonic()
        from tidegate.safety.estimate import CounterHistory

        self.sampler = Sampler(kf, interval=options.sample_interval, window=options.estimate_window)
        self.history = CounterHistory(kf, keep_seconds=options.review_seconds + 300)
        from tidegate.observation import insight

        self.insight = insight.Insight(self, options.insight_baseline_seconds,
                                       getattr(options, "insight_window_seconds", 30.0))
        self.sampler.listeners.append(self.insight.on_sample)
        from tidegate.safety.review import Reviews

        # every activation starts a post-deployment review; the next one (or the period's end) records it
        self.reviews = Reviews(self)
        self.sampler.listeners.append(self.reviews.on_sample)
        self.insight_metrics = lambda: insight.metrics(self)
        self._change = threading.RLock()
        self.change_results: dict[str, int] = {"ok": 0, "rejected": 0, "error": 0}
        self.rollbacks: dict[str, int] = {}
        self.guard = None  # set by safety.Guard when a guarded apply is watched
        self._rule_sets: dict[int, RuleSet] = {}
        self.shadow_loaded_at: float | None = None
        self.reattaches = 0  # times the watchdog found the program detached and attached it again
        self.admission = None  # the API's admission (api.serve): refused-call counts and audit
        self._watchdog_note: str | None = None  # what the watchdog last logged, so it logs a state once
        self.health = None  # readiness.FilterHealth, set when the API serves

    # ------------------------------------------------------------- helpers
    def rule_set_of(self, version: int) -> RuleSet:
        rs = self._rule_sets.get(version)
        if rs is None:
            rec = self.store.get_version(version)
            rs = parse_rule_set(rec.content, f"version {version}")
            self._rule_sets[version] = rs
        return rs

    def active_rule_set(self) -> RuleSet | None:
        v = self.kf.active_version()
        return self.rule_set_of(v) if v else None

    def _parse(self, text: str, source: str, caller: Caller, action: str) -> RuleSet:
        try:
            return parse_rule_set(text, source or "<request>")
        except RuleSetError as e:
            self._rejected(action, caller, str(e))
            raise OperationError("INVALID_ARGUMENT", f"invalid rule set: {len(e.errors)} error(s)\n{e}",
                                 e.errors, e.source) from None  # fmt: skip

    def _rejected(self, action: str, caller: Caller, detail: str, version: int | None = None) -> None:
        self.change_results["rejected"] += 1
        self.store.audit(f"rejected-{action}", "rejected", caller.author, caller.peer, detail[:4000], version)
        log.info("change rejected", extra={"action": action, "author": caller.author, "detail": detail[:200]})

    def require_loaded(self) -> None:
        if self.kf.active_version() is None:
            raise OperationError("FAILED_PRECONDITION", "no rule set is active: apply one first (tidegate apply FILE)")

    def attached(self) -> bool:
        try:
            return self.kf.state().attached
        except NotAttachedError:
            return False

    def check_attachment(self) -> None:
        """The agent's watchdog: the gate must not stay open because something
        removed the program (a recreated interface, a driver reload, a stray
        `ip link set dev IF xdp off`). Re-attaches while a rule set is active
        and the pins exist; `tidegate detach` removes the pins and so is
        respected."""
        if self.kf.active_version() is None:
            return
        if not os.path.exists(os.path.join(self.kf.config.pin_dir, "tg_ctl")):
            if self._watchdog_note != "unpinned":
                log.warning("the pinned maps are gone (tidegate detach?): not re-attaching",
                            extra={"pin_dir": self.kf.config.pin_dir})  # fmt: skip
                self._watchdog_note = "unpinned"
            return
        try:
            mode = self.kf.ensure_attached()
        except InterfaceError as e:
            if self._watchdog_note != "missing":
                log.warning("interface missing: will attach again when it is back", extra={"error": str(e)})
                self._watchdog_note = "missing"
            return
        except KernelError as e:
            log.error("re-attaching failed", extra={"error": str(e)})
            return
        self._watchdog_note = None
        if mode is not None:
            self.reattaches += 1
            log.warning("the program was detached from the interface: attached it again",
                        extra={"interface": self.kf.config.interface, "mode": mode})  # fmt: skip
            self.store.audit("reattach", "ok", "agent", "watchdog",
                             f"program found detached from {self.kf.config.interface}; attached again ({mode})")

    def require_attached(self) -> None:
        if not self.attached():
            raise OperationError("FAILED_PRECONDITION", f"the filter is not attached to {self.kf.config.interface}")

    # ------------------------------------------------------------ queries
    def status(self) -> dict:
        st = self.kf.state()
        g = self.guard
        return {
            "interface": st.interface or "",
            "xdp_mode": st.mode or "",
            "attached": st.attached,
            "active_version": st.active.version if st.active else 0,
            "shadow_version": st.shadow.version if st.shadow else 0,
            "uptime_seconds": time.monotonic() - self.started,
            "tracked_sources": self.sampler.tracked_sources,
            "agent_version": __version__,
            "prog_id": st.prog_id or 0,
            "pin_dir": st.pin_dir,
            "guard_active": bool(g and g.watching),
            "guard_version": g.version if g and g.watching else 0,
            "sample_age_seconds": (time.monotonic() - self.sampler.last_sample) if self.sampler.last_sample else -1,
        }

    def validate(self, text: str, source: str) -> RuleSet:
        return parse_rule_set(text, source or "<request>")

    def counters(self):
        self.require_attached()
        return self.kf.counters()

    def top_sources(self, n: int, by: str, shadow: bool = False,
                    window: float = 0.0) -> tuple[list[dict], float]:  # fmt: skip
        """Top sources of the active (or shadow) set by packets or drops.

        window 0: the sampler's last interval; otherwise the intervals of the
        last `window` seconds, summed per source and rule (entries of the set
        loaded now: a source's counts under an earlier version are not
        included). Work is bounded by TOP_WINDOW_ROWS rows of the sampler's
        ring (fewer intervals when sources are many), never the LRU."""
        self.require_attached()
        st = self.kf.state()
        info = st.shadow if shadow else st.active
        if info is None:
            if shadow:
                raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded")
            return [], 0.0
        if window > 0:
            w = SourceWindow.of(self.sampler, window)
        else:
            w = SourceWindow([self.sampler.last_interval()])
        if not len(w):
            return [], 0.0
        # bounded work: sum at most TOP_WINDOW_ROWS rows, newest intervals first; the
        # response's interval_seconds says what was covered
        top, order = w.top(max(1, min(n, 1000)), "drops" if by == "drops" else "packets", info.epoch, TOP_WINDOW_ROWS)
        seconds = top.seconds
        out = []
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for i, address in zip(order, top.addresses(order)):
            out.append(
                {
                    "address": address,
                    "rule": self.kf.rule_name(info.slot, int(top.rule[i])),
                    "packets": int(top.packets[i]),
                    "drops": int(top.drops[i]),
                    "pps": float(top.packets[i]) / seconds,
                    "drop_pps": float(top.drops[i]) / seconds,
                    "first_seen_seconds_ago": max(0.0, (now_ns - int(top.first_ns[i])) / 1e9),
                }
            )
        return out, seconds

    def list_versions(self, limit: int, offset: int):
        return self.store.list_versions(limit or 50, offset)

    def get_version(self, number: int):
        try:
            return self.store.get_version(number)
        except VersionNotFound:
            raise OperationError("NOT_FOUND", f"version {number} does not exist") from None

    # ------------------------------------------------------------ changes
    def apply(self, text: str, source: str, reason: str, caller: Caller, *, shadow: bool = False,
              force: bool = False, guard: bool | None = None, guard_seconds: int = 0,
              wait_for_guard: bool = False, action: str = "apply") -> ApplyOutcome:  # fmt: skip
        rs = self._parse(text, source, caller, action)
        return self.apply_rule_set(rs, reason, caller, shadow=shadow, force=force, guard=guard,
                                   guard_seconds=guard_seconds, wait_for_guard=wait_for_guard,
                                   source=action)  # fmt: skip

    def apply_rule_set(self, rs: RuleSet, reason: str, caller: Caller, *, shadow: bool = False,
                       force: bool = False, guard: bool | None = None, guard_seconds: int = 0,
                       wait_for_guard: bool = False, source: str = "apply") -> ApplyOutcome:  # fmt: skip
        from tidegate.safety import estimate as safety

        if not reason.strip():
            self._rejected(source, caller, "no reason given")
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)",
                                 [FieldError("reason", None, "is required")])  # fmt: skip
        if force and len(reason.strip()) < 3:
            raise OperationError("INVALID_ARGUMENT", "--force needs a real reason (it is audited)")
        with self._change:
            estimate = None
            active = self.active_rule_set()
            if not shadow and active is not None:
                estimate = safety.estimate(self, rs)
                problems = safety.check(self, rs, estimate)
                if problems and not force:
                    msg = "refused by the blast-radius check: " + "; ".join(problems)
                    self._rejected(source, caller, msg)
                    raise OperationError("FAILED_PRECONDITION", msg + " (use --force with a reason to override)",
                                         estimate=estimate)  # fmt: skip
                if problems:
                    self.store.audit("force", "ok", caller.author, caller.peer, "; ".join(problems) + f" | {reason}")
            content = dump_yaml(rs)
            version = self.store.begin_version(content, rs.digest(), caller.author, reason, source)
            try:
                if shadow:
                    self.kf.load_shadow(rs, version)
                else:
                    self.kf.apply(rs, version)
            except KernelError as e:
                self.store.abort_version(version, str(e))
                self.change_results["error"] += 1
                self.store.audit(source, "error", caller.author, caller.peer, str(e), version)
                old_shadow = self.store.shadow_version()
                if shadow and old_shadow is not None and self.kf.shadow_version() is None:
                    # the shadow set it was to replace is unloaded already: the store follows the kernel
                    self.store.abort_version(old_shadow, f"unloaded: loading version {version} in its place failed")
                    self.shadow_loaded_at = None
                raise OperationError("INTERNAL", f"writing the rule set into the kernel failed: {e}") from None
            self._rule_sets[version] = rs
            if shadow:
                self.store.mark_shadow(version, caller.author, caller.peer)
                self.shadow_loaded_at = time.monotonic()
                self.change_results["ok"] += 1
                log.info("shadow loaded", extra={"version": version, "author": caller.author})
                return ApplyOutcome(version, shadow=True)
            self.store.commit_active(version, source, caller.author, reason, caller.peer)
            self.reviews.activated(version, source)
            self.change_results["ok"] += 1
            log.info("applied", extra={"version": version, "author": caller.author, "reason": reason})
            if not self.attached():
                mode = self.kf.attach()
                log.info("attached", extra={"interface": self.kf.config.interface, "mode": mode})
                if self.health is not None:
                    self.health.refresh()
            outcome = ApplyOutcome(version, estimate=estimate)
            use_guard = self.options.guard_default if guard is None else guard
            if use_guard and active is not None:
                g = safety.Guard(self, version, guard_seconds or self.options.guard_seconds, caller)
                self.guard = g
                g.start()
                outcome.guarded = True
                outcome.guard_outcome = "watching"
        if outcome.guarded and wait_for_guard:
            g.wait()
            outcome.guard_outcome = g.outcome
            outcome.guard_cause = g.cause
            outcome.rolled_back_to = g.rolled_back_to
        return outcome

    def rollback(self, to_version: int | None, reason: str, caller: Caller, cause: str = "manual") -> ApplyOutcome:
        if cause == "manual" and not reason.strip():
            self._rejected("rollback", caller, "no reason given")
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)",
                                 [FieldError("reason", None, "is required")])  # fmt: skip
        with self._change:
            current = self.kf.active_version()
            target = to_version or self.store.previous_active(current)
            if not target:
                raise OperationError("FAILED_PRECONDITION", "there is no earlier version to roll back to")
            rec = self.get_version(target)
            if rec.state not in ("applied", "shadow"):
                raise OperationError("FAILED_PRECONDITION",
                                     f"version {target} is {rec.state} and was never active; apply it instead")  # fmt: skip
            if target == current:
                raise OperationError("FAILED_PRECONDITION", f"version {target} is already active")
            rs = self.rule_set_of(target)
            try:
                self.kf.apply(rs, target)
            except KernelError as e:
                self.change_results["error"] += 1
                self.store.audit("rollback", "error", caller.author, caller.peer, str(e), target)
                raise OperationError("INTERNAL", f"writing the rule set into the kernel failed: {e}") from None
            self.store.commit_active(target, "rollback", caller.author, reason or f"rollback ({cause})", caller.peer)
            self.reviews.activated(target, "rollback", cause)
            self.rollbacks[cause] = self.rollbacks.get(cause, 0) + 1
            self.change_results["ok"] += 1
            log.info("rolled back", extra={"from": current, "to": target, "cause": cause, "author": caller.author})
            return ApplyOutcome(target)

    def update_thresholds(self, rule: str, pps: int, burst: int, bps: int, reason: str, caller: Caller,
                          force: bool = False) -> ApplyOutcome:  # fmt: skip
        with self._change:
            active = self.active_rule_set()
            if active is None:
                raise OperationError("FAILED_PRECONDITION", "no rule set is active")
            data = active.to_dict()
            # inherited limits must stay what they are for the other rules
            for r in data["rules"]:
                if r.get("action", "limit") == "limit" and "limit" not in r:
                    lim = active.rule(r["name"]).limit
                    if lim:
                        r["limit"] = {k: v for k, v in dataclasses.asdict(lim).items() if v is not None}
            limit = {"pps": pps, "burst": burst or pps}
            if bps:
                limit["bps"] = bps  # bits per second, as in rule sets
            if rule == "default":
                keep_byte_limit(limit, data["defaults"].get("limit"))
                data["defaults"]["limit"] = limit
            else:
                match = [r for r in data["rules"] if r["name"] == rule]
                if not match:
                    names = ", ".join(r["name"] for r in data["rules"]) or "(none)"
                    raise OperationError("NOT_FOUND", f"no rule named {rule!r} in the active set (rules: {names}; "
                                         "use 'default' for the default limit)")  # fmt: skip
                if match[0].get("action", "limit") != "limit":
                    raise OperationError("FAILED_PRECONDITION", f"rule {rule!r} has action {match[0]['action']}")
                keep_byte_limit(limit, match[0].get("limit"))
                match[0]["limit"] = limit
            text = dump_yaml(_from_dict_or_error(data))
        return self.apply(text, f"set-limit {rule}", reason, caller, force=force, action="set-limit")

    def promote(self, reason: str, caller: Caller) -> ApplyOutcome:
        with self._change:
            shadow = self.kf.shadow_version()
            if shadow is None:
                raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded (tidegate apply --shadow)")
            try:
                self.kf.promote_shadow()
            except KernelError as e:
                self.change_results["error"] += 1
                self.store.audit("promote", "error", caller.author, caller.peer, str(e), shadow)
                raise OperationError("INTERNAL", f"promoting the shadow set failed: {e}") from None
            self.store.commit_active(shadow, "promote", caller.author, reason or "promote shadow", caller.peer)
            self.reviews.activated(shadow, "promote")
            self.shadow_loaded_at = None
            self.change_results["ok"] += 1
            log.info("promoted", extra={"version": shadow, "author": caller.author})
            return ApplyOutcome(shadow)

    def clear_shadow(self, reason: str, caller: Caller) -> int:
        with self._change:
            shadow = self.kf.shadow_version()
            if shadow is None:
                raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded")
            self.kf.clear_shadow()
            self.store.abort_version(shadow, f"shadow cleared by {caller.author}: {reason}")
            self.store.audit("shadow-clear", "ok", caller.author, caller.peer, reason, shadow)
            self.shadow_loaded_at = None
            return shadow


def keep_byte_limit(new: dict, old: dict | None) -> None:
    """set-limit without --bps keeps the byte limit the rule had."""
    if "bps" not in new and old and old.get("bps"):
        new["bps"] = old["bps"]
        if old.get("burst_bytes"):
            new["burst_bytes"] = old["burst_bytes"]


def _from_dict_or_error(data: dict) -> RuleSet:
    from tidegate.ruleset.model import rule_set_from_dict

    try:
        return rule_set_from_dict(data, "set-limit")
    except RuleSetError as e:
        raise OperationError("INVALID_ARGUMENT", str(e), e.errors, e.source) from None


# ------------------------------------------------------------------ daemon
class _KeyValueFormatter(logging.Formatter):
    """One line per event: time level msg key=value... Every value but a
    number or a boolean is quoted and JSON-escaped, so a value a caller
    chose (a reason, a rule name) cannot end the line and forge another."""

    _skip = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    @staticmethod
    def _value(v) -> str:
        if isinstance(v, (bool, int, float)) or v is None:
            return str(v)
        return json.dumps(v if isinstance(v, str) else str(v))

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = " ".join(f"{k}={self._value(v)}" for k, v in record.__dict__.items() if k not in self._skip)
        msg = record.getMessage()
        line = f"ts={t}Z level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)} {extra}".rstrip()
        if record.exc_info:  # the traceback stays on the line, JSON-escaped
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tidegate agent",
        description="Run the tidegate agent: load the XDP filter on an interface and serve the gRPC API "
        "and Prometheus metrics. Needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  tidegate agent --interface eth0 --rules /etc/tidegate/rules.yaml
  tidegate agent --interface eth0 --xdp-mode generic --state-dir /var/lib/tidegate
  tidegate agent --interface eth0 --listen 0.0.0.0:50051 --tls-cert s.pem --tls-key s.key --tls-client-ca ca.pem

The program stays attached and its maps stay pinned when the agent stops;
a new agent adopts them. `tidegate detach --interface IFACE` removes them.""",
    )
    p.add_argument("--interface", "-i", required=True, help="network interface to filter")
    p.add_argument("--rules", help="rule set to apply at start when the kernel and the store have none (read "
                   "only then: ignored, with a warning, while the store holds an active version); re-read and applied "
                   "as a new version on SIGHUP (systemctl reload), through the blast-radius check")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"gRPC address (default {DEFAULT_LISTEN})")
    p.add_argument("--metrics-listen", default=DEFAULT_METRICS,
                   help=f"Prometheus /metrics address (default {DEFAULT_METRICS}; 'off' to disable)")  # fmt: skip
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"version store (default {DEFAULT_STATE_DIR})")
    p.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto")
    p.add_argument("--max-sources", type=int, default=1 << 20, help="per-source LRU entries (default 1048576)")
    p.add_argument("--pin-root", default="/sys/fs/bpf/tidegate")
    p.add_argument("--pin-name", help="pin directory name (default: the interface name)")
    p.add_argument("--detach-on-exit", action="store_true", help="remove the program and maps when stopping")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --listen without TLS (logged loudly)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA that signs client certificates (mTLS)")
    p.add_argument("--token-file", help="role tokens for clients without TLS (default <state-dir>/tokens, "
                   "created 0600 on first start)")
    p.add_argument("--auth", choices=("token", "none"), default="token",
                   help="'none' lets any local process change the filter (lab only; on a non-loopback "
                   "--listen it also needs --insecure)")  # fmt: skip
    p.add_argument("--role-map", help="JSON file mapping client-certificate subjects to roles")
    p.add_argument("--read-call-rate", type=float, default=1.0,
                   help="expensive read calls (whatif, validate, shadow report, top --window) a read caller may "
                   "make per second once its burst is used (default 1; admins are not limited)")  # fmt: skip
    p.add_argument("--read-call-burst", type=int, default=10,
                   help="expensive read calls a read caller may make at once (default 10)")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between per-source samples")
    p.add_argument("--estimate-window", type=float, default=300.0, help="seconds of history for what-if estimates")
    p.add_argument("--packet-budget", type=float, default=0.01,
                   help="refuse changes that newly drop more than this share of passing packets (default 0.01)")  # fmt: skip
    p.add_argument("--source-budget", type=float, default=0.05,
                   help="refuse changes that newly drop more than this share of sources (default 0.05)")  # fmt: skip
    p.add_argument("--no-blast-check", action="store_true", help="disable the blast-radius check")
    p.add_argument("--guard", dest="guard_default", action="store_true", help="guard every apply by default")
    p.add_argument("--guard-seconds", type=int, default=60, help="guard window after an apply (default 60)")
    p.add_argument("--guard-drop-increase", type=float, default=0.05,
                   help="roll back when the drop share rises by more than this (default 0.05)")  # fmt: skip
    p.add_argument("--guard-dropped-sources", type=int, default=50,
                   help="roll back when this many more distinct sources are dropped than before (default 50)")  # fmt: skip
    p.add_argument("--insight-baseline-seconds", type=float, default=120.0,
                   help="a source counts as known when first seen at least this long ago (default 120)")
    p.add_argument("--insight-window-seconds", type=float, default=30.0,
                   help="the insight reading's window: packets per source, persistence, prefixes (default 30)")
    p.add_argument("--review-seconds", type=float, default=3600.0, help="post-deployment review period")
    p.add_argument("--attach-check-seconds", type=float, default=2.0,
                   help="how often to check that the program is still attached, and attach it again if not")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt",
                   help="stderr lines as key=value (default) or one JSON object each")
    from tidegate.fleet.hostagent import add_arguments as fleet_arguments

    fleet_arguments(p)
    return p


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {addr!r}")
    return host, int(port)


def _check_auth_mode(opts: argparse.Namespace, host: str) -> None:
    """`--auth none` makes every caller admin, certificate or not: a lab
    switch, so it never goes unnoticed and never reaches the network by
    accident."""
    if opts.auth != "none":
        return
    if not _is_loopback(host) and not opts.insecure:
        raise SystemExit(f"tidegate agent: refusing --auth none on {host}: anyone who can reach it could "
                         "change the filter; it is for labs on loopback (add --insecure to accept the risk)")  # fmt: skip
    log.warning("INSECURE: --auth none: every caller is admin, no token or certificate is checked (lab use only)",
                extra={"listen": opts.listen})  # fmt: skip


def _check_port_free(host: str, port: int, what: str) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        raise SystemExit(f"tidegate agent: {what} address {host}:{port} is not available: {e.strerror}")
    finally:
        s.close()


def _read_tls(opts: argparse.Namespace) -> tuple[bytes, bytes, bytes]:
    """Key, certificate and client CA, read before anything is touched."""
    out = []
    for flag, path in (("--tls-key", opts.tls_key), ("--tls-cert", opts.tls_cert),
                       ("--tls-client-ca", opts.tls_client_ca)):  # fmt: skip
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SystemExit(f"tidegate agent: cannot read {flag} {path}: {e.strerror}")
        if b"-----BEGIN " not in data:
            raise SystemExit(f"tidegate agent: {flag} {path} is not a PEM file")
        out.append(data)
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
    except (ssl.SSLError, ValueError) as e:
        raise SystemExit(f"tidegate agent: --tls-cert {opts.tls_cert} and --tls-key {opts.tls_key} are not a "
                         f"usable certificate and matching key: {e}")  # fmt: skip
    try:
        ctx.load_verify_locations(cafile=opts.tls_client_ca)
    except (ssl.SSLError, ValueError) as e:
        raise SystemExit(f"tidegate agent: --tls-client-ca {opts.tls_client_ca} holds no usable CA certificate: {e}")
    return out[0], out[1], out[2]


def _undo_start(kf: KernelFilter, loaded) -> None:
    """A start that fails leaves what it found: a program that was attached
    before stays attached; one this run attached is detached, and maps this
    run created are unpinned."""
    try:
        if not (loaded.adopted or loaded.replaced):
            kf.detach(remove_pins=loaded.fresh_maps)
    except KernelError as e:
        log.error("cleaning up after a failed start", extra={"error": str(e)})
    kf.close()


def main(argv: list[str] | None = None) -> int:
    # everything the agent creates (the store and its -wal/-shm/.bak, tokens, backups) is root's alone,
    # whatever umask the shell or service manager gave it
    os.umask(0o077)
    opts = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if opts.log_format == "json":
        from tidegate.daemon.logjson import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_KeyValueFormatter())
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO), handlers=[handler])
    try:
        return run(opts)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise


def run(opts: argparse.Namespace) -> int:
    from tidegate.api import service as api
    from tidegate.access import auth
    from tidegate.observation import metrics

    from tidegate.daemon.privileges import check_agent_privileges

    check_agent_privileges()
    try:
        host, port = _split_addr(opts.listen)
        mhost, mport = _split_addr(opts.metrics_listen) if opts.metrics_listen != "off" else (None, None)
    except ValueError as e:
        raise SystemExit(f"tidegate agent: {e}")
    tls = bool(opts.tls_cert or opts.tls_key or opts.tls_client_ca)
    if tls and not (opts.tls_cert and opts.tls_key and opts.tls_client_ca):
        raise SystemExit("tidegate agent: TLS needs --tls-cert, --tls-key and --tls-client-ca together (mTLS)")
    if not _is_loopback(host) and not tls:
        if not opts.insecure:
            raise SystemExit(
                f"tidegate agent: refusing to listen on {host} without TLS: remote access needs mTLS "
                "(--tls-cert/--tls-key/--tls-client-ca), or pass --insecure to accept the risk"
            )
        log.warning("INSECURE: gRPC listens on a non-loopback address without TLS; anyone who can reach "
                    "it can change the filter", extra={"listen": opts.listen})  # fmt: skip
    _check_auth_mode(opts, host)
    from tidegate.fleet import hostagent

    hostagent.check_options(opts)
    opts.tls_material = _read_tls(opts) if tls else None
    # ports first: a start that fails here has touched nothing
    _check_port_free(host, port, "gRPC")
    if mhost is not None:
        _check_port_free(mhost, mport, "metrics")

    try:
        store = VersionStore.open(opts.state_dir)
    except StoreError as e:
        raise SystemExit(f"tidegate agent: {e}")
    if opts.auth == "token" and not tls:
        # before the kernel is touched, like the store: a token file nobody can use is a start-up error,
        # not an agent that answers every call UNAUTHENTICATED
        try:
            auth.ensure_token_file(auth.token_path(opts))
        except auth.TokenFileError as e:
            raise SystemExit(f"tidegate agent: {e}")

    initial = None
    if opts.rules:
        # the seed file is read only when it would be used, on a store with no active version: a
        # missing or broken seed never stops a restart on the store's good version
        stored = store.active_version()
        if stored is None:
            try:
                initial = load_rule_set(opts.rules)
            except RuleSetError as e:
                if len(e.errors) == 1:  # one line, e.g. rules.yaml: (document): no such file
                    raise SystemExit(f"tidegate agent: --rules {e}")
                raise SystemExit(f"tidegate agent: --rules is not a valid rule set ({len(e.errors)} errors):\n{e}")
        else:
            log.warning("--rules not applied (not even read): the store holds an active version, which this start "
                        "runs; use `tidegate apply` to change it", extra={"version": stored, "rules": opts.rules})

    kf = KernelFilter(FilterConfig(interface=opts.interface, xdp_mode=opts.xdp_mode, pin_root=opts.pin_root,
                                   max_sources=opts.max_sources, pin_name=opts.pin_name))  # fmt: skip
    try:
        loaded = kf.load()
    except KernelError as e:
        raise SystemExit(f"tidegate agent: {e}")
    log.info("program ready", extra={"interface": opts.interface, "adopted": loaded.adopted, "replaced": loaded.replaced,
                                     "compiled": loaded.compiled, "compile_s": round(loaded.compile_seconds, 2)})  # fmt: skip
    agent = Agent(kf, store, opts)
    boot = Caller(author="agent", peer="startup")
    try:
        kver, sver = kf.active_version(), kf.shadow_version()
        res = store.reconcile(kver, kernel_shadow=sver)
        if res.action != "none" or res.aborted:
            log.info("store reconciled", extra={"kernel": kver, "store": res.store_version,
                                                "action": res.action, "aborted": res.aborted})  # fmt: skip
        for v in (kver, sver):
            if v:
                kf.bind_names(v, agent.rule_set_of(v))
        # a review the previous agent left open (it crashed) is closed as last written
        agent.reviews.recover((res.store_version, kver))
        if res.action == "followed-kernel":
            agent.reviews.activated(kver, "reconcile")
        if kver is None:
            # the kernel has no rule set (first start, reboot, `tidegate detach`): the store's last
            # active version wins, so a reboot never swaps an operator's change for the --rules file;
            # --rules seeds a store that has none
            stored = store.active_version()
            if stored is not None:
                rs = agent.rule_set_of(stored)
                kf.apply(rs, stored)
                store.commit_active(stored, "restore", "agent", "restored at start", "startup")
                agent.reviews.activated(stored, "restore")
                mode = kf.attach()
                log.info("restored", extra={"version": stored, "interface": opts.interface, "mode": mode})
            elif initial is not None:
                agent.apply_rule_set(initial, f"initial rules from {opts.rules}", boot, source="apply")
            else:
                log.warning("no rule set: the filter is loaded but not attached until the first apply",
                            extra={"interface": opts.interface})  # fmt: skip
        elif not agent.attached():
            kf.attach()
        elif initial is not None:  # a first apply that crashed after the swap: the kernel's version wins
            log.info("--rules ignored: the kernel already runs a rule set", extra={"version": kver})
    except (StoreError, KernelError, OperationError) as e:
        _undo_start(kf, loaded)
        raise SystemExit(f"tidegate agent: {e}")

    server = msrv = None
    try:
        server = api.serve(agent, opts)
        msrv = metrics.serve(agent, mhost, mport) if mhost is not None else None
    except (SystemExit, Exception) as e:
        # lost a race for a port, an unusable certificate, an unwritable token file...
        if server is not None:
            server.stop(grace=0)
        _undo_start(kf, loaded)
        msg = e.code if isinstance(e, SystemExit) else f"tidegate agent: cannot serve: {e}"
        raise SystemExit(msg) from None
    agent.sampler.start()
    agent.history.start()
    fleet = hostagent.start(agent, opts)  # after serving: the local API works whatever etcd does
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from tidegate.daemon.reload import Reloader

    signal.signal(signal.SIGHUP, Reloader(agent, opts.rules).on_signal)  # systemctl reload
    st = kf.state()
    log.info("serving", extra={"listen": opts.listen, "metrics": opts.metrics_listen, "attached": st.attached,
                               "mode": st.mode, "active_version": st.active.version if st.active else 0})  # fmt: skip
    while not stop.wait(opts.attach_check_seconds):
        try:
            agent.health.refresh()  # health watchers hear of a detached filter before it is attached again
            agent.check_attachment()
            agent.health.refresh()
        except Exception as e:  # the watchdog must never take the agent down
            log.error("attachment check failed", extra={"error": str(e)})
    if fleet is not None:
        fleet.stop()
    agent.health.enter_graceful_shutdown()
    server.stop(grace=2).wait()
    agent.admission.close()  # the refused-call counts of the last minute
    if msrv is not None:
        msrv.shutdown()
    agent.sampler.stop()
    agent.history.stop()
    if agent.guard is not None:
        agent.guard.cancel()
    agent.reviews.stop()  # the active version's review ends with this agent
    if opts.detach_on_exit:
        kf.detach(remove_pins=True)
        log.info("detached", extra={"interface": opts.interface})
    kf.close()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
