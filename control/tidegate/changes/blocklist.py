"""The quick block list: `tidegate deny add CIDR --ttl 10m --reason R`,
`deny remove CIDR`, `deny list`.

A fast path for incident response that stays a safe change: each call makes
a new version (the active rule set with one deny entry more or less) through
the agent's apply (validated, audited, blast-radius checked: a canary cannot
be denied, and `--force` is audited like any). The expiry of entries added
with a TTL is kept in the version store (meta key `blocklist`), so it
survives restarts; the agent removes expired entries itself, all that
expired at once as one new version by `agent:ttl`. An entry is only a deny
entry: an `apply` of a file without it removes it like any other.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import threading
import time

from tidegate.ruleset.model import dump_yaml

log = logging.getLogger("tidegate.changes.blocklist")

META_KEY = "blocklist"
MAX_TTL = 365 * 86400
TTL_AUTHOR = "agent:ttl"
RETRY_SECONDS = 30.0  # after a refused expiry


class Blocklist:
    """The agent's side: add, remove, list and expire, on one Agent."""

    def __init__(self, agent, interval: float = 1.0):
        self.agent = agent
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._retry_at = 0.0
        self._entries: dict[str, dict] = json.loads(agent.store.get_meta(META_KEY) or "{}")

    # ---------------------------------------------------------- changes
    def _save(self) -> None:
        self.agent.store.set_meta(META_KEY, json.dumps(self._entries, sort_keys=True))

    def _active(self):
        from tidegate.daemon.agent import OperationError

        rs = self.agent.active_rule_set()
        if rs is None:
            raise OperationError("FAILED_PRECONDITION", "no active rule set: apply one first")
        return rs

    def add(self, cidr: str, ttl: int, reason: str, caller, force: bool = False):
        from tidegate.daemon.agent import OperationError
        from tidegate.ruleset.checks import _covers_net

        net = _network(cidr)
        if not 0 <= ttl <= MAX_TTL:
            raise OperationError("INVALID_ARGUMENT", f"ttl must be between 0 and {MAX_TTL} seconds, got {ttl}")
        if not reason.strip():
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)")
        with self._lock:
            active = self._active()
            if net in active.deny:
                raise OperationError("ALREADY_EXISTS", f"{net} is on the deny list already (`tidegate deny list`)")
            inside = next((a for a in active.allow if _covers_net(a, net)), None)
            if inside is not None:
                raise OperationError("FAILED_PRECONDITION", f"{net} lies inside the allow entry {inside}: allow "
                                     "wins, a deny entry there would never fire")  # fmt: skip
            new = dataclasses.replace(active, deny=active.deny + (net,))
            expires = time.time() + ttl if ttl else 0.0
            why = f"deny add {net}" + (f" for {_ttl_text(ttl)}" if ttl else "") + f": {reason}"
            out = self.agent.apply(dump_yaml(new), "deny add", why, caller, force=force, action="deny-add")
            self._entries[str(net)] = {"expires": expires, "reason": reason, "author": caller.author,
                                       "added": time.time(), "version": out.version}  # fmt: skip
            self._save()
        log.info("deny entry added", extra={"cidr": str(net), "ttl": ttl, "version": out.version})
        return out, expires

    def remove(self, cidr: str, reason: str, caller):
        from tidegate.daemon.agent import OperationError

        net = _network(cidr)
        if not reason.strip():
            raise OperationError("INVALID_ARGUMENT", "a reason is required (--reason TEXT)")
        with self._lock:
            active = self._active()
            if net not in active.deny:
                raise OperationError("NOT_FOUND", f"{net} is not on the active deny list")
            new = dataclasses.replace(active, deny=tuple(n for n in active.deny if n != net))
            out = self.agent.apply(dump_yaml(new), "deny remove", f"deny remove {net}: {reason}", caller,
                                   action="deny-remove")  # fmt: skip
            self._entries.pop(str(net), None)
            self._save()
        log.info("deny entry removed", extra={"cidr": str(net), "version": out.version})
        return out

    def entries(self) -> tuple[int, list[dict]]:
        """(active version, the active deny list with each quick entry's expiry)."""
        rs = self.agent.active_rule_set()
        out = []
        for n in rs.deny if rs is not None else ():
            e = self._entries.get(str(n))
            out.append({"cidr": str(n), "quick": e is not None, **(e or {"expires": 0.0, "reason": "",
                                                                          "author": "", "added": 0.0})})  # fmt: skip
        return (self.agent.kf.active_version() or 0), out

    # ----------------------------------------------------------- expiry
    def expire(self, now: float | None = None) -> int | None:
        """Remove every expired entry as one new version; the version, or None."""
        from tidegate.daemon.agent import Caller, OperationError

        now = time.time() if now is None else now
        with self._lock:
            expired = sorted(c for c, e in self._entries.items() if e["expires"] and e["expires"] <= now)
            if not expired or now < self._retry_at:
                return None
            active = self.agent.active_rule_set()
            present = [n for n in (active.deny if active is not None else ()) if str(n) in expired]
            version = None
            if present:
                new = dataclasses.replace(active, deny=tuple(n for n in active.deny if str(n) not in expired))
                why = "deny entries expired: " + ", ".join(map(str, present))
                try:
                    version = self.agent.apply(dump_yaml(new), "deny ttl", why, Caller(TTL_AUTHOR, "ttl"),
                                               action="deny-expire").version  # fmt: skip
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
        threading.Thread(target=self._run, name="tidegate-deny-ttl", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.expire()
            except Exception as e:  # never take the agent down
                log.error("deny expiry failed", extra={"error": str(e)})


def _network(cidr: str):
    from tidegate.daemon.agent import OperationError

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


# ------------------------------------------------------------- gRPC service
def register(server, filter_service, agent) -> str:
    """Adds the Blocklist service (auth and errors through FilterService) and
    starts the expiry thread; returns the service's full name."""
    from tidegate.v1 import blocklist_pb2 as bpb
    from tidegate.v1 import blocklist_pb2_grpc as bpbg

    bl = Blocklist(agent)
    agent.blocklist = bl

    class BlocklistService(bpbg.BlocklistServicer):
        def DenyAdd(self, request, context):
            def fn(c):
                out, expires = bl.add(request.cidr, request.ttl_seconds, request.reason, c, request.force)
                est = _estimate(out.estimate)
                return bpb.DenyChange(version=out.version, cidr=str(_network(request.cidr)), expires=expires,
                                      estimate=est)  # fmt: skip

            return filter_service._run(context, "DenyAdd", fn)

        def DenyRemove(self, request, context):
            def fn(c):
                out = bl.remove(request.cidr, request.reason, c)
                return bpb.DenyChange(version=out.version, cidr=str(_network(request.cidr)))

            return filter_service._run(context, "DenyRemove", fn)

        def DenyList(self, request, context):
            def fn(c):
                version, entries = bl.entries()
                return bpb.DenyListResponse(active_version=version, entries=[
                    bpb.DenyEntry(cidr=e["cidr"], expires=e["expires"], reason=e["reason"], author=e["author"],
                                  added=e["added"], quick=e["quick"]) for e in entries])  # fmt: skip

            return filter_service._run(context, "DenyList", fn)

    bpbg.add_BlocklistServicer_to_server(BlocklistService(), server)
    bl.start()
    return bpb.DESCRIPTOR.services_by_name["Blocklist"].full_name


def _estimate(est):
    if est is None:
        return None
    from tidegate.api.service import _estimate_pb

    return _estimate_pb(est)
