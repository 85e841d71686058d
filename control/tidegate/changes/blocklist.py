"""The quick block list: `tidegate deny add CIDR --ttl 10m --reason R`,
`deny remove CIDR`, `deny list`.

A fast path for incident response that stays a safe change: each call makes
a new version (the active rule set with one deny entry more or less) through
the change service's apply (validated, audited, blast-radius checked: a
canary cannot be denied, and `--force` is audited like any). The expiry of entries added
with a TTL is kept in the version store (meta key `blocklist`), so it
survives restarts; the agent removes expired entries itself, all that
expired at once as one new version by `agent:ttl`. An entry is only a deny
entry: an `apply` of a file without it removes it like any other.

Its gRPC service is api/blocklist.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time

from tidegate.operation import Caller, OperationError
from tidegate.periodic import Periodic
from tidegate.ruleset.checks import first_allow_around

log = logging.getLogger("tidegate.changes.blocklist")

META_KEY = "blocklist"
MAX_TTL = 365 * 86400
TTL_AUTHOR = "agent:ttl"
RETRY_SECONDS = 30.0  # after a refused expiry


class Blocklist:
    """The agent's side: add, remove, list and expire, through one ChangeService."""

    def __init__(self, changes, interval: float = 1.0):
        self.changes = changes
        self.job = Periodic("tidegate-deny-ttl", interval, self.expire, log, "deny expiry failed")
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._entries: dict[str, dict] = json.loads(changes.store.get_meta(META_KEY) or "{}")

    # ---------------------------------------------------------- changes
    def _save(self) -> None:
        self.changes.store.set_meta(META_KEY, json.dumps(self._entries, sort_keys=True))

    def _active(self):
        rs = self.changes.active_rule_set()
        if rs is None:
            raise OperationError("FAILED_PRECONDITION", "no active rule set: apply one first")
        return rs

    def add(self, cidr: str, ttl: int, reason: str, caller, force: bool = False):
        net = network(cidr)
        if not 0 <= ttl <= MAX_TTL:
            raise OperationError("INVALID_ARGUMENT", f"ttl must be between 0 and {MAX_TTL} seconds, got {ttl}")
        if not reason.strip():
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)")
        with self._lock:
            active = self._active()
            if net in active.deny:
                raise OperationError("ALREADY_EXISTS", f"{net} is on the deny list already (`tidegate deny list`)")
            j = first_allow_around([net], active.allow)[0]
            if j is not None:
                inside = active.allow[j]
                raise OperationError("FAILED_PRECONDITION", f"{net} lies inside the allow entry {inside}: allow "
                                     "wins, a deny entry there would never fire")  # fmt: skip
            new = _with_deny(active.to_dict(), lambda texts: [*texts, str(net)])
            expires = time.time() + ttl if ttl else 0.0
            why = f"deny add {net}" + (f" for {_ttl_text(ttl)}" if ttl else "") + f": {reason}"
            new = self.changes.revise(new, "deny add", caller, "deny-add")
            out = self.changes.apply(new, why, caller, force=force, source="deny-add")
            self._entries[str(net)] = {"expires": expires, "reason": reason, "author": caller.author,
                                       "added": time.time(), "version": out.version}  # fmt: skip
            self._save()
        log.info("deny entry added", extra={"cidr": str(net), "ttl": ttl, "version": out.version})
        return out, expires

    def remove(self, cidr: str, reason: str, caller):
        net = network(cidr)
        if not reason.strip():
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)")
        with self._lock:
            active = self._active()
            if net not in active.deny:
                raise OperationError("NOT_FOUND", f"{net} is not on the active deny list")
            text = str(net)
            new = _with_deny(active.to_dict(), lambda texts: [t for t in texts if t != text])
            new = self.changes.revise(new, "deny remove", caller, "deny-remove")
            out = self.changes.apply(new, f"deny remove {net}: {reason}", caller, source="deny-remove")
            self._entries.pop(str(net), None)
            self._save()
        log.info("deny entry removed", extra={"cidr": str(net), "version": out.version})
        return out

    def entries(self) -> tuple[int, list[dict]]:
        """(active version, the active deny list with each quick entry's expiry)."""
        rs = self.changes.active_rule_set()
        out = []
        for n in rs.deny if rs is not None else ():
            e = self._entries.get(str(n))
            out.append({"cidr": str(n), "quick": e is not None, **(e or {"expires": 0.0, "reason": "",
                                                                          "author": "", "added": 0.0})})  # fmt: skip
        return (self.changes.kf.active_version() or 0), out

    # ----------------------------------------------------------- expiry
    def expire(self, now: float | None = None) -> int | None:
        """Remove every expired entry as one new version; the version, or None."""
        now = time.time() if now is None else now
        with self._lock:
            expired = sorted(c for c, e in self._entries.items() if e["expires"] and e["expires"] <= now)
            if not expired or now < self._retry_at:
                return None
            active = self.changes.active_rule_set()
            gone = set(expired)
            data = active.to_dict() if active is not None else {}
            present = [t for t in data.get("deny", ()) if t in gone]
            version = None
            if present:
                new = _with_deny(data, lambda texts: [t for t in texts if t not in gone])
                why = "deny entries expired: " + ", ".join(map(str, present))
                caller = Caller(TTL_AUTHOR, "ttl")
                try:
                    new = self.changes.revise(new, "deny ttl", caller, "deny-expire")
                    version = self.changes.apply(new, why, caller, source="deny-expire").version
                except OperationError as e:
                    self._retry_at = now + RETRY_SECONDS
                    log.error("expiring deny entries refused; retrying", extra={"cidrs": ", ".join(expired),
                                                                                "error": e.message})  # fmt: skip
                    return None
            for c in expired:  # gone from the rule set (an apply removed them) or just removed
                self._entries.pop(c, None)
            self._save()
        log.info("deny entries expired", extra={"cidrs": ", ".join(expired), "version": version})
        return version

    def start(self) -> None:
        self.job.start()

    def stop(self) -> None:
        self.job.stop()


def _with_deny(data: dict, change) -> dict:
    """A rule set's plain data (RuleSet.to_dict) with its deny list changed by `change` (a list of
    texts -> the new list). The texts are canonical, str() of each network, so a network is found by
    its text, and a long list is changed without making a network of each entry."""
    deny = change(data.get("deny", []))
    if deny:
        data["deny"] = deny
    else:
        data.pop("deny", None)
    return data


def network(cidr: str):
    """An address or a CIDR without host bits, or INVALID_ARGUMENT."""
    try:
        return ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as e:
        raise OperationError("INVALID_ARGUMENT", f"{cidr[:60]!r} is not an address or CIDR without host bits ({e})"
                             ) from None  # fmt: skip


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """"90", "90s", "10m", "2h", "1d" -> seconds."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 10m, 2h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def _ttl_text(seconds: int) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"
