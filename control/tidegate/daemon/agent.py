"""One running agent's parts, wired: the kernel filter, the version store,
the sampler and counter history, insight, post-deployment reviews and the
change service (changes/service.py), and what the daemon itself answers:
status, counters, top sources and the attachment watchdog.

The gRPC adapter, the metrics collector, the block list, the reloader and
the fleet host agent are handed this object or the parts they use; none of
them is imported here (daemon/main.py starts them)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time

from tidegate import __version__
from tidegate.operation import OperationError
from tidegate.changes.service import ChangeService
from tidegate.kernel.filter import InterfaceError, KernelError, KernelFilter, NotAttachedError
from tidegate.observation import insight, top
from tidegate.observation.sampler import Sampler
from tidegate.safety.guard import CounterHistory, Guard, GuardSight
from tidegate.safety.review import Reviews
from tidegate.store import VersionStore

log = logging.getLogger("tidegate.daemon.agent")


class Agent:
    """The parts of one agent on one KernelFilter and one VersionStore."""

    def __init__(self, kf: KernelFilter, store: VersionStore, options: argparse.Namespace):
        self.kf = kf
        self.store = store
        self.options = options
        self.started = time.monotonic()
        self.sampler = Sampler(kf, interval=options.sample_interval, window=options.estimate_window)
        self.history = CounterHistory(kf, keep_seconds=options.review_seconds + 300)
        self.insight = insight.Insight(kf, self.sampler, options.insight_baseline_seconds,
                                       getattr(options, "insight_window_seconds", 30.0))
        self.sampler.listeners.append(self.insight.on_sample)
        # every activation starts a post-deployment review; the next one (or the period's end) records it
        self.reviews = Reviews(kf, self.sampler, store, self.history, options.review_seconds)
        self.sampler.listeners.append(self.reviews.on_sample)
        self.insight_metrics = lambda: insight.metrics(self.insight.latest)
        sight = GuardSight(kf, self.history, self.sampler, store.audit, self.reviews.guard_fired,
                           options.guard_drop_increase, options.guard_dropped_sources)  # fmt: skip
        self.changes = ChangeService(kf, store, self.sampler, options, self.reviews, functools.partial(Guard, sight))
        self.reattaches = 0  # times the watchdog found the program detached and attached it again
        self.admission = None  # the API's admission (api.serve): refused-call counts and audit
        self._watchdog_note: str | None = None  # what the watchdog last logged, so it logs a state once
        self.health = None  # readiness.FilterHealth, set when the API serves
        self.blocklist = None  # changes.blocklist.Blocklist, set when the API serves
        self.mitigation = None  # changes.mitigation.Mitigator, set by daemon/main.py

    # ------------------------------------- read by metrics, estimates, reports
    @property
    def change_results(self) -> dict[str, int]:
        return self.changes.change_results

    @property
    def rollbacks(self) -> dict[str, int]:
        return self.changes.rollbacks

    @property
    def guard(self):
        return self.changes.guard

    @property
    def shadow_loaded_at(self) -> float | None:
        return self.changes.shadow_loaded_at

    def rule_set_of(self, version: int):
        return self.changes.rule_set_of(version)

    # ------------------------------------------------------------ watchdog
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
            "auto_mitigation": self.mitigation.summary() if self.mitigation is not None else None,
        }

    def counters(self):
        self.require_attached()
        return self.kf.counters()

    def top_sources(self, n: int, by: str, shadow: bool = False,
                    window: float = 0.0) -> tuple[list[dict], float]:  # fmt: skip
        self.require_attached()
        return top.top_sources(self.kf, self.sampler, n, by, shadow, window)
