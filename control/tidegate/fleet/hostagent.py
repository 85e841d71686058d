"""The agent's side of the fleet: watch this host's desired state in etcd,
apply it through the agent's own change service, report status on a lease.

A desired state is applied exactly as `tidegate apply` would apply it on
this host (ChangeService.apply: validate, blast-radius check, atomic swap, guard),
with the rollout as the author, so each host's audit names the rollout.
The answer goes into the host's status key:

    ACK          the host runs what was asked (numbers: version, estimate)
    NACK         refused: invalid rule set (the parser's message), blast
                 radius over budget (the estimate), missing version...
    ROLLED_BACK  applied, then this host's guard rolled it back (its cause)

Never failing open: when etcd is unreachable, or the desired state is
invalid, the kernel keeps the version it runs and the local API keeps
working. A desired state is handled once: the etcd revision of the last one
handled is kept in the host's store (meta `fleet_desired_revision`), so a
restart or a reconnect resumes after it, and a host whose kernel already
runs the asked digest answers ACK without applying again.

A local change (an operator's `tidegate apply` on the host) is never
overwritten: it shows as drift in the status until the fleet asks again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from tidegate import __version__
from tidegate.operation import Caller, OperationError
from tidegate.fleet import report
from tidegate.fleet.etcd import Etcd, EtcdUnavailable, split_endpoints
from tidegate.fleet.keys import ACK, NACK, ROLLED_BACK, FleetError, Keys, check_name, decode, encode, parse_labels
from tidegate.ruleset.model import RuleSetError

log = logging.getLogger("tidegate.fleet")

META_REVISION = "fleet_desired_revision"
META_DESIRED = "fleet_desired"  # the desired record last handled (for drift and status)
META_LAST = "fleet_last"  # the last result


def add_arguments(p) -> None:
    """The agent's fleet options (tidegate agent --help)."""
    g = p.add_argument_group("fleet (etcd)")
    g.add_argument("--fleet-etcd", metavar="URL[,URL...]",
                   help="etcd endpoints: join a fleet (desired state from etcd, status reported there)")  # fmt: skip
    g.add_argument("--fleet", metavar="NAME", help="fleet name: keys live under /tidegate/NAME/")
    g.add_argument("--host-id", metavar="ID", help="this host's id in the fleet (default: the hostname)")
    g.add_argument("--label", action="append", default=[], metavar="K=V", help="host label (repeatable)")
    g.add_argument("--fleet-etcd-ca", metavar="PEM", help="CA of etcd's server certificate (https endpoints)")
    g.add_argument("--fleet-etcd-cert", metavar="PEM", help="client certificate for etcd (client-cert-auth)")
    g.add_argument("--fleet-etcd-key", metavar="PEM", help="client key for etcd")
    g.add_argument("--fleet-heartbeat", type=float, default=5.0, metavar="S",
                   help="seconds between status heartbeats (default 5)")  # fmt: skip
    g.add_argument("--fleet-lease-ttl", type=int, default=15, metavar="S",
                   help="status lease TTL: a host silent this long drops out of the fleet (default 15)")  # fmt: skip


def check_options(opts) -> None:
    """Before anything is touched: a fleet agent with half its options is a start-up error."""
    if not opts.fleet_etcd:
        if opts.fleet or opts.label or opts.host_id:
            raise SystemExit("tidegate agent: --fleet, --host-id and --label need --fleet-etcd")
        return
    if not opts.fleet:
        raise SystemExit("tidegate agent: --fleet-etcd needs --fleet NAME")
    if bool(opts.fleet_etcd_cert) != bool(opts.fleet_etcd_key):
        raise SystemExit("tidegate agent: --fleet-etcd-cert and --fleet-etcd-key go together")
    try:
        split_endpoints(opts.fleet_etcd)
        Keys(opts.fleet)
        parse_labels(opts.label)
        check_name("host id", opts.host_id or socket.gethostname())
    except (ValueError, FleetError) as e:
        raise SystemExit(f"tidegate agent: {e}")
    if opts.fleet_lease_ttl < 2 or opts.fleet_heartbeat <= 0 or opts.fleet_heartbeat * 2 > opts.fleet_lease_ttl:
        raise SystemExit("tidegate agent: --fleet-heartbeat must be at most half of --fleet-lease-ttl (>= 2)")


def start(agent, opts) -> "FleetMember | None":
    if not opts.fleet_etcd:
        return None
    etcd = Etcd(opts.fleet_etcd, ca=opts.fleet_etcd_ca, cert=opts.fleet_etcd_cert, key=opts.fleet_etcd_key)
    m = FleetMember(agent, etcd, Keys(opts.fleet), opts.host_id or socket.gethostname(), parse_labels(opts.label),
                    heartbeat=opts.fleet_heartbeat, lease_ttl=opts.fleet_lease_ttl)  # fmt: skip
    m.start()
    return m


class FleetMember:
    def __init__(self, agent, etcd: Etcd, keys: Keys, host: str, labels: dict, heartbeat: float = 5.0,
                 lease_ttl: int = 15):  # fmt: skip
        self.agent = agent
        self.etcd = etcd
        self.keys = keys
        self.host = host
        self.labels = labels
        self.heartbeat = heartbeat
        self.lease_ttl = lease_ttl
        self.connected = False
        self.lease = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # report now (a result changed)
        self._threads: list[threading.Thread] = []
        store = agent.store
        self.revision = int(store.get_meta(META_REVISION, 0) or 0)
        raw = store.get_meta(META_DESIRED)
        self.desired = decode(raw) if raw else None
        raw = store.get_meta(META_LAST)
        self.last = decode(raw) if raw else None
        self.handled = 0  # desired states applied by this process (tests and metrics)

    # ---------------------------------------------------------------- life
    def start(self) -> None:
        for name, fn in (("fleet-watch", self._watch_loop), ("fleet-report", self._report_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("fleet member started", extra={"fleet": self.keys.fleet, "host": self.host,
                                                "endpoints": ",".join(self.etcd.endpoints),
                                                "resume_after_revision": self.revision})  # fmt: skip

    def stop(self) -> None:
        """On a clean stop the status key goes at once (the lease is revoked)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass
        self.etcd.close()

    # --------------------------------------------------------------- watch
    def _watch_loop(self) -> None:
        key = self.keys.desired(self.host)
        backoff = 0.5
        while not self._stop.is_set():
            try:
                kv, rev = self.etcd.get(key)
                self.connected = True
                backoff = 0.5
                if kv is not None and kv.mod_revision > self.revision:
                    self._handle(kv.value, kv.mod_revision)
                self.etcd.wait_change(key, max(rev, self.revision), timeout=max(2.0, self.heartbeat * 2))
            except EtcdUnavailable as e:
                if self.connected:
                    log.warning("etcd unreachable: keeping the last good version", extra={"error": str(e)[:200]})
                self.connected = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # the watcher must not die: the filter keeps running either way
                log.exception("fleet watcher failed; retrying")
                self._stop.wait(2.0)

    def _handle(self, raw: bytes, revision: int) -> None:
        try:
            desired = decode(raw)
            if not isinstance(desired, dict):
                raise ValueError("not an object")
        except ValueError as e:
            desired = {}
            result = self._result(NACK, f"desired state is not valid JSON: {e}", revision, desired)
        else:
            try:
                result = self._apply(desired, revision)
            except OperationError as e:
                numbers = e.estimate.to_dict() if e.estimate is not None else {}
                numbers.pop("top_affected", None)
                numbers.pop("rules", None)
                result = self._result(NACK, e.message, revision, desired, numbers)
            except _Nack as e:
                result = self._result(NACK, str(e), revision, desired)
        self.handled += 1
        self.revision = revision
        if not desired.get("active") and self.desired and self.desired.get("active"):
            # a shadow-only state leaves the active set as the fleet last asked: drift is measured against it
            desired = {**desired, "active": self.desired["active"], "active_from": self.desired.get("rollout", "")}
        store = self.agent.store
        if result["result"] == ACK:  # what the host accepted is what drift is measured against
            self.desired = desired
            store.set_meta(META_DESIRED, encode(desired).decode())
        self.last = result
        store.set_meta(META_LAST, encode(result).decode())
        store.set_meta(META_REVISION, revision)  # last: a crash before this handles it again, idempotently
        log.info("fleet desired state handled", extra={"revision": revision, "rollout": desired.get("rollout", ""),
                                                       "result": result["result"],
                                                       "message": result["message"][:200]})  # fmt: skip
        self._wake.set()

    def _result(self, result: str, message: str, revision: int, desired: dict, numbers: dict | None = None) -> dict:
        return {"result": result, "message": message, "desired_revision": revision, "seq": desired.get("seq", ""),
                "rollout": desired.get("rollout", ""), "numbers": numbers or {}, "time": time.time()}  # fmt: skip

    def _text(self, digest: str) -> str:
        """The rule set with this digest: from etcd, or else from this host's
        own store (a `fleet rollback` to what a host ran before the fleet
        published anything); the caller checks the digest of what it parses."""
        kv, _ = self.etcd.get(self.keys.version(digest))
        if kv is None:
            rec = self._local_record(digest)
            if rec is not None and rec.content:
                return rec.content
            raise _Nack(f"version {digest[:12]} is not in etcd ({self.keys.version(digest)}) nor in this host's store")
        try:
            return decode(kv.value)["yaml"]
        except (ValueError, KeyError, TypeError):
            raise _Nack(f"version {digest[:12]} in etcd is not a version record") from None

    def _apply(self, d: dict, revision: int) -> dict:
        changes = self.agent.changes
        rollout = str(d.get("rollout") or "manual")
        caller = Caller(author=f"fleet rollout {rollout} ({d.get('operator') or 'unknown'})",
                        peer=f"fleet:{self.keys.fleet}")  # fmt: skip
        reason = f"rollout {rollout}: {d.get('reason') or 'no reason recorded'}"
        source = f"fleet:{self.keys.fleet}"
        notes = []
        shadow = d.get("shadow")
        if shadow == "":
            if self._shadow_digest():
                changes.clear_shadow(reason, caller)
                notes.append("shadow cleared")
        elif shadow:
            if self._shadow_digest() != shadow:
                text = self._text(shadow)
                rs = changes.parse(text, source, caller, "fleet-shadow")
                out = changes.apply(rs, reason, caller, shadow=True, source="fleet-shadow")
                notes.append(f"shadow loaded as version {out.version}")
            else:
                notes.append("shadow already loaded")
        active = d.get("active")
        numbers: dict = {}
        if active:
            if self._active_digest() == active:
                notes.append("already active")
            elif d.get("revert"):
                local = self._local_version(active)
                if local:
                    out = changes.rollback(local, reason, caller, cause="fleet-revert")
                    notes.append(f"reverted to version {out.version}")
                else:
                    rs = changes.parse(self._text(active), source, caller, "fleet-revert")
                    out = changes.apply(rs, reason, caller, force=True, guard=False, source="fleet-revert")
                    notes.append(f"reverted: applied as version {out.version}")
            else:
                text = self._text(active)
                try:
                    rs = changes.validate(text, f"fleet version {active[:12]}")
                except RuleSetError:
                    # the change service refuses it the way `tidegate apply` would: audited, the parser's message
                    changes.parse(text, f"fleet version {active[:12]}", caller, "fleet-apply")
                    raise
                if rs.digest() != active:
                    raise _Nack(f"version {active[:12]}: content digest is {rs.digest()[:12]}, not its key's")
                gs = int(d.get("guard_seconds") or 0)
                out = changes.apply(rs, reason, caller, force=bool(d.get("force")), guard=gs > 0, guard_seconds=gs,
                                    source="fleet-apply")  # fmt: skip
                notes.append(f"applied as version {out.version}" + (f", guarded {gs} s" if out.guarded else ""))
                if out.estimate is not None:
                    numbers = {k: v for k, v in out.estimate.to_dict().items() if k not in ("rules", "top_affected")}
                numbers["version"] = out.version
                if out.guarded and changes.guard is not None:
                    self._follow_guard(changes.guard, revision, d)
        return self._result(ACK, "; ".join(notes) or "nothing to do", revision, d, numbers)

    def _follow_guard(self, guard, revision: int, desired: dict) -> None:
        def run():
            guard.wait()
            if guard.outcome == "rolled-back" and self.last and self.last.get("desired_revision") == revision:
                self.last = self._result(ROLLED_BACK, f"guard rolled back to version {guard.rolled_back_to}: "
                                         f"{guard.cause}", revision, desired,
                                         {"rolled_back_to": guard.rolled_back_to, "version": guard.version})  # fmt: skip
                self.agent.store.set_meta(META_LAST, encode(self.last).decode())
                self._wake.set()

        threading.Thread(target=run, name="fleet-guard", daemon=True).start()

    # ------------------------------------------------------------- reading
    def _digest_of(self, version: int) -> str:
        return self.agent.changes.get_version(version).digest if version else ""

    def _active_digest(self) -> str:
        return self._digest_of(self.agent.status()["active_version"])

    def _shadow_digest(self) -> str:
        return self._digest_of(self.agent.status()["shadow_version"])

    def _local_record(self, digest: str):
        """The newest version of this host's store with this digest that was applied or shadowed."""
        for rec in self.agent.store.list_versions(1000, 0):  # a listing carries no text: read the one found
            if rec.digest == digest and rec.state in ("applied", "shadow"):
                return self.agent.store.get_version(rec.number)
        return None

    def _local_version(self, digest: str) -> int:
        rec = self._local_record(digest)
        return rec.number if rec is not None else 0

    # -------------------------------------------------------------- report
    def status_record(self) -> dict:
        st = self.agent.status()
        active_digest = self._digest_of(st["active_version"])
        g = self.agent.guard
        rec = {
            "host": self.host, "fleet": self.keys.fleet, "labels": self.labels, "agent_version": __version__,
            "active_version": st["active_version"], "active_digest": active_digest,
            "shadow_version": st["shadow_version"], "shadow_digest": self._digest_of(st["shadow_version"]),
            "attached": st["attached"],
            "guard": {"watching": st["guard_active"], "version": st["guard_version"],
                      "outcome": g.outcome if g else "", "cause": g.cause if g else ""},
            "last": self.last, "revision_seen": self.revision, "heartbeat": time.time(),
            "shadow_numbers": report.shadow_numbers(self.agent) if st["shadow_version"] else None,
            "drift": report.drift(self.agent, self.desired, active_digest),
        }  # fmt: skip
        return rec

    def report_once(self) -> None:
        if not self.lease or self.etcd.keepalive(self.lease) <= 0:
            self.lease = self.etcd.grant(self.lease_ttl)
        self.etcd.put(self.keys.status(self.host), encode(self.status_record()), lease=self.lease)

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.report_once()
                self.connected = True
            except EtcdUnavailable:
                self.connected = False
                self.lease = self.lease  # keep it: keepalive tells whether it survived
            except Exception:
                log.exception("fleet status report failed")
            self._wake.wait(self.heartbeat)
            self._wake.clear()


class _Nack(Exception):
    pass
