"""Reload on SIGHUP (`systemctl reload tidegate-agent@IFACE`).

The agent re-reads its `--rules` file and applies it as a new version
through the same path as `tidegate apply`: parse and validate, blast-radius
check, atomic swap, guard when the agent runs with --guard. The author is
`agent:reload`. A file that does not parse, or that the blast-radius check
refuses, changes nothing: the refusal is logged and written to the audit log
(`rejected-reload`). A file whose rule set equals the active one is not a new
version (logged as unchanged).

What reload does not do: it does not re-read any other option (ports, TLS,
budgets, the token file: those need a restart), it never uses --force, and
it does not touch a loaded shadow set.
"""

from __future__ import annotations

import logging
import threading

from tidegate.operation import Caller, OperationError
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import load_rule_set

log = logging.getLogger("tidegate.daemon.reload")

AUTHOR = "agent:reload"


class Reloader:
    """Applies the --rules file of one agent through its change service; one
    reload at a time, each in its own thread so a signal never waits for a
    guard or the estimate."""

    def __init__(self, changes, rules_path: str | None):
        self.changes = changes
        self.path = rules_path
        self._lock = threading.Lock()

    def on_signal(self, signum=None, frame=None) -> None:
        threading.Thread(target=self.reload, name="tidegate-reload", daemon=True).start()

    def reload(self) -> str:
        """Returns what happened: applied, unchanged, refused or no-file."""
        caller = Caller(author=AUTHOR, peer="SIGHUP")
        with self._lock:
            if not self.path:
                log.warning("reload: the agent was started without --rules; nothing to re-read")
                return "no-file"
            try:
                rs = load_rule_set(self.path)
            except RuleSetError as e:
                self._refused(caller, f"{self.path} is not a valid rule set: {e}")
                return "refused"
            active = self.changes.active_rule_set()
            if active is not None and active.digest() == rs.digest():
                log.info("reload: unchanged", extra={"rules": self.path, "version": self.changes.kf.active_version()})
                return "unchanged"
            try:
                out = self.changes.apply(rs, f"reload of {self.path}", caller, source="reload")
            except OperationError as e:
                # the blast-radius refusal is audited by the change service itself (rejected-reload)
                log.error("reload refused: nothing changed", extra={"rules": self.path, "error": e.message})
                return "refused"
            log.info("reloaded", extra={"rules": self.path, "version": out.version, "guarded": out.guarded})
            return "applied"

    def _refused(self, caller, detail: str) -> None:
        self.changes.rejected("reload", caller, detail)
        log.error("reload refused: nothing changed", extra={"rules": self.path, "error": detail[:2000]})
