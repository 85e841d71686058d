"""The rollout driver: one process at a time moves a rule set across the fleet.

    lock      the driver key on a lease; every write to desired state is fenced
              on it (a transaction comparing the key's value), so a driver that
              lost its lease cannot write after another took over
    shadow    the candidate is loaded as shadow on every selected host for
              --shadow-first seconds; would-drops are summed over the fleet and
              the rollout is refused when the sum is over budget
    waves     each wave's hosts are asked to enforce it (guarded); the next wave
              starts only when every host of this one ACKed and the bake time
              passed with no NACK, no guard rollback, no missed heartbeat
    halt      more than --max-failures failed hosts: every host that was asked
              to enforce the candidate is reverted to its previous version;
              hosts of later waves were never asked

The rollout record in etcd is the driver's whole state: `fleet resume` picks
it up where a dead driver left it (the wave in progress is run again: hosts
that already run the target answer ACK without applying again).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

from tidegate.fleet.etcd import Etcd, EtcdUnavailable
from tidegate.fleet.keys import (ACK, COMPLETED, FAILED, FINAL, HALTED, HALTING, NACK, REFUSED, ROLLED_BACK, SHADOW, WAVE,
                   Keys, decode, encode)  # fmt: skip

TXN_OPS = 100  # puts per transaction (etcd's default --max-txn-ops is 128)


class DriverBusy(Exception):
    def __init__(self, holder: dict):
        super().__init__(f"another driver holds the fleet: pid {holder.get('pid')} on {holder.get('host')} "
                         f"({holder.get('operator')}), since {time.strftime('%H:%M:%S', time.localtime(holder.get('since', 0)))}")  # fmt: skip
        self.holder = holder


class LostLock(Exception):
    pass


@dataclass
class Settings:
    bake: float = 60.0
    ack_timeout: float = 60.0
    heartbeat_deadline: float = 30.0
    poll: float = 0.5
    lock_ttl: int = 10
    etcd_patience: float = 60.0  # how long the driver waits for etcd before giving up (resume later)
    txn_ops: int = TXN_OPS  # desired states written per etcd transaction


class Driver:
    def __init__(self, etcd: Etcd, keys: Keys, operator: str, settings: Settings | None = None, progress=None):
        self.etcd = etcd
        self.keys = keys
        self.operator = operator
        self.s = settings or Settings()
        self.progress = progress or (lambda text: None)
        self.me = encode({"pid": os.getpid(), "host": socket.gethostname(), "operator": operator,
                          "since": time.time(), "nonce": os.urandom(6).hex()})  # fmt: skip
        self.lease = 0
        self._stop = threading.Event()
        self.lost = False
        self.etcd_ok_since = time.monotonic()
        self.view = StatusView(etcd, keys.status_prefix)

    # ---------------------------------------------------------------- lock
    def acquire(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            self.lease = self._retry(lambda: self.etcd.grant(self.s.lock_ttl))
            if self._retry(lambda: self.etcd.create(self.keys.driver, self.me, lease=self.lease)):
                break
            self._retry(lambda: self.etcd.revoke(self.lease))
            kv, _ = self._retry(lambda: self.etcd.get(self.keys.driver))
            if time.monotonic() >= deadline:
                raise DriverBusy(decode(kv.value) if kv else {})
            time.sleep(0.5)
        threading.Thread(target=self._keep_lock, name="driver-lease", daemon=True).start()

    def _keep_lock(self) -> None:
        while not self._stop.wait(self.s.lock_ttl / 3):
            try:
                if self.etcd.keepalive(self.lease) <= 0:
                    self.lost = True
                    return
            except EtcdUnavailable:
                pass  # the fence refuses our writes if the lease expires meanwhile

    def release(self) -> None:
        self._stop.set()
        if self.lease:
            try:
                self.etcd.delete_if_value(self.keys.driver, self.me)
                self.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass

    # ------------------------------------------------------------- etcd io
    def _retry(self, fn):
        """Run an etcd call, waiting out an outage up to etcd_patience seconds."""
        deadline = time.monotonic() + self.s.etcd_patience
        said = False
        while True:
            try:
                out = fn()
                if said:
                    self.progress("etcd is back")
                    self.etcd_ok_since = time.monotonic()
                return out
            except EtcdUnavailable as e:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    self.progress(f"etcd unreachable, waiting up to {self.s.etcd_patience:.0f} s: {str(e)[:120]}")
                    said = True
                time.sleep(1.0)

    def _fenced_put(self, items: list[tuple[str, bytes]]) -> dict[str, int]:
        """Write in transactions of txn_ops keys; {key: the revision it was written at}.
        Each batch is its own revision: a host of the first batch answers the
        first batch's revision, never a later one."""
        if self.lost:
            raise LostLock("the driver lost its lock (lease expired): stopping; see `tidegate fleet status`")
        revs = {}
        step = max(1, self.s.txn_ops)
        for i in range(0, len(items), step):
            batch = items[i:i + step]
            rev = self._retry(lambda: self.etcd.put_many(batch, if_value=(self.keys.driver, self.me)))
            if not rev:
                self.lost = True
                raise LostLock("another driver holds the fleet now: stopping")
            revs.update((k, rev) for k, _ in batch)
        return revs

    def save(self, rec: dict) -> None:
        rec["updated"] = time.time()
        self._fenced_put([(self.keys.rollout(rec["id"]), encode(rec)), (self.keys.current, rec["id"].encode())])

    def statuses(self) -> dict[str, dict]:
        """Every live host's status, {host: record}, as of now (see StatusView)."""
        return self._retry(self.view.refresh)

    def event(self, rec: dict, what: str, **fields) -> None:
        rec.setdefault("events", []).append({"t": time.time(), "event": what, **fields})

    # --------------------------------------------------------------- drive
    def drive(self, rec: dict) -> dict:
        """Run a rollout from the phase its record is in until it is final."""
        if rec["phase"] == SHADOW:
            self._shadow_stage(rec)
        while rec["phase"] == WAVE:
            i = rec["wave"]
            if i >= len(rec["waves"]):
                rec["phase"] = COMPLETED
                self.event(rec, "completed")
                self.save(rec)
                self.progress(f"rollout {rec['id']} completed: {sum(map(len, rec['waves']))} host(s)")
                break
            if self._wave(rec, i):
                rec["wave"] = i + 1
                self.save(rec)
            else:
                rec["phase"] = HALTING
                self.save(rec)
        if rec["phase"] == HALTING:
            self._revert(rec)
        return rec

    def _write_desired(self, rec: dict, hosts: list[str], step: str, **fields) -> dict[str, int]:
        """Write each host's desired state; {host: the revision of its write}."""
        items = []
        for h in hosts:
            d = {"seq": f"{rec['id']}:{step}", "rollout": rec["id"], "operator": rec["operator"],
                 "reason": rec["reason"], "written": time.time()}  # fmt: skip
            for k, v in fields.items():  # a dict value is per host (a rollback's targets differ)
                d[k] = v[h] if isinstance(v, dict) else v
            items.append((self.keys.desired(h), encode(d)))
        revs = self._fenced_put(items)
        return {h: revs[self.keys.desired(h)] for h in hosts}

    def _wait_results(self, hosts: list[str], revs: dict[str, int], timeout: float, watch: list[str] | None = None,
                      rec: dict | None = None) -> tuple[dict, dict]:  # fmt: skip
        """Wait until every host answered the desired state written for it at
        revs[host] (or `timeout`). Returns ({host: result}, {host: status})."""
        deadline = time.monotonic() + timeout
        results: dict[str, dict] = {}
        while True:
            sts = self.statuses()
            for h in hosts:
                last = (sts.get(h) or {}).get("last") or {}
                if h not in results and last.get("desired_revision", 0) >= revs[h]:
                    results[h] = last
                    first = str(last.get("message") or "").split("\n")[0]
                    self.progress(f"  {h}: {last.get('result')} {first[:100]}")
            if len(results) == len(hosts) or time.monotonic() >= deadline:
                return results, sts
            if watch and rec is not None and self._health(rec, watch, sts):
                return results, sts
            time.sleep(self.s.poll)

    def _shadow_stage(self, rec: dict) -> None:
        hosts = [h for w in rec["waves"] for h in w]
        targets = rec["targets"]
        self.event(rec, "shadow-start", hosts=len(hosts))
        self.save(rec)
        self.progress(f"shadow: loading the candidate as shadow on {len(hosts)} host(s) for {rec['shadow_first']:.0f} s")
        revs = self._write_desired(rec, hosts, "shadow", shadow={h: targets[h] for h in hosts})
        results, _ = self._wait_results(hosts, revs, self.s.ack_timeout)
        bad = {h: r for h, r in results.items() if r["result"] != ACK}
        missing = [h for h in hosts if h not in results]
        if bad or missing:
            cause = "; ".join([f"{h}: {r['result']} {r['message']}" for h, r in sorted(bad.items())] +
                              [f"{h}: no answer within {self.s.ack_timeout:.0f} s" for h in missing])  # fmt: skip
            self._clear_shadow(rec, hosts)
            self._final(rec, REFUSED, f"shadow stage failed: {cause}")
            return
        t_end = time.monotonic() + rec["shadow_first"]
        while time.monotonic() < t_end:
            time.sleep(min(self.s.poll * 2, max(0.0, t_end - time.monotonic())))
        time.sleep(self.s.poll)  # one more report from each host
        sts = self.statuses()
        rec["shadow"] = summed = sum_shadow(hosts, sts)
        self.event(rec, "shadow-done", **{k: summed["total"][k] for k in ("packet_share", "source_share")})
        self._clear_shadow(rec, hosts)
        t = summed["total"]
        self.progress(f"shadow: would newly drop {t['would_drop_new']} of {t['packets']} packets "
                      f"({t['packet_share']:.2%}) and {t['sources_would_drop']} of {t['sources_seen']} sources "
                      f"({t['source_share']:.2%}) over the fleet")  # fmt: skip
        over = t["packet_share"] > rec["packet_budget"] or t["source_share"] > rec["source_budget"]
        summed["within_budget"] = not over
        if over and not rec["force"]:
            self._final(rec, REFUSED, f"fleet-wide shadow over budget: {t['packet_share']:.2%} of packets "
                        f"(budget {rec['packet_budget']:.2%}), {t['source_share']:.2%} of sources "
                        f"(budget {rec['source_budget']:.2%}); nothing was enforced")  # fmt: skip
            return
        if over:
            self.event(rec, "shadow-forced")
            self.progress("shadow: over budget, going on because of --force")
        rec["phase"] = WAVE
        self.save(rec)

    def _clear_shadow(self, rec: dict, hosts: list[str]) -> None:
        revs = self._write_desired(rec, hosts, "shadow-clear", shadow="")
        self._wait_results(hosts, revs, min(self.s.ack_timeout, 15.0))

    def _wave(self, rec: dict, i: int) -> bool:
        hosts = rec["waves"][i]
        n = len(rec["waves"])
        for h in hosts:
            if h not in rec["enforced"]:
                rec["enforced"].append(h)
        self.event(rec, "wave-start", wave=i, hosts=hosts)
        self.save(rec)  # enforced is recorded before any host is asked: a halt reverts it
        self.progress(f"wave {i + 1}/{n}: {len(hosts)} host(s): {', '.join(hosts[:8])}{' ...' if len(hosts) > 8 else ''}")
        revs = self._write_desired(rec, hosts, f"w{i}", active={h: rec["targets"][h] for h in hosts},
                                  guard_seconds=rec["guard_seconds"], force=rec["force"])  # fmt: skip
        watch = [h for h in rec["enforced"] if h not in hosts]
        results, sts = self._wait_results(hosts, revs, self.s.ack_timeout, watch=watch, rec=rec)
        for h in hosts:
            r = results.get(h)
            if r is None:
                self._failure(rec, h, i, "timeout", f"no answer within {self.s.ack_timeout:.0f} s")
            elif r["result"] != ACK:
                self._failure(rec, h, i, r["result"], r.get("message", ""))
        self.event(rec, "wave-acked", wave=i, acks={h: r.get("time") for h, r in results.items()})
        self.save(rec)
        if self._over(rec):
            return False
        self.progress(f"wave {i + 1}/{n}: acknowledged; baking {rec['bake']:.0f} s")
        t_end = time.monotonic() + rec["bake"]
        while time.monotonic() < t_end:
            time.sleep(min(self.s.poll, max(0.0, t_end - time.monotonic())))
            if self._health(rec, rec["enforced"], self.statuses()):
                self.save(rec)
                return False
        self.event(rec, "wave-baked", wave=i)
        self.progress(f"wave {i + 1}/{n}: baked")
        return True

    def _health(self, rec: dict, hosts: list[str], sts: dict) -> bool:
        """Record failures of hosts that enforce the target; True when over the limit."""
        failed = {f["host"] for f in rec["failures"]}
        now = time.time()
        grace = time.monotonic() - self.etcd_ok_since > self.s.heartbeat_deadline
        for h in hosts:
            if h in failed:
                continue
            st = sts.get(h)
            last = (st or {}).get("last") or {}
            if st is None:
                if grace:
                    self._failure(rec, h, rec["wave"], "heartbeat", "status expired (lease gone)")
            elif last.get("result") == ROLLED_BACK and last.get("rollout") == rec["id"]:
                self._failure(rec, h, rec["wave"], ROLLED_BACK, last.get("message", ""))
            elif grace and now - st.get("heartbeat", 0) > self.s.heartbeat_deadline:
                self._failure(rec, h, rec["wave"], "heartbeat",
                              f"no heartbeat for {now - st.get('heartbeat', 0):.0f} s")  # fmt: skip
        return self._over(rec)

    def _failure(self, rec: dict, host: str, wave: int, kind: str, message: str) -> None:
        rec["failures"].append({"host": host, "wave": wave, "kind": kind, "message": message, "t": time.time()})
        self.progress(f"  FAILED {host}: {kind}: {message.splitlines()[0][:160] if message else ''}")

    def _over(self, rec: dict) -> bool:
        if len(rec["failures"]) > rec["max_failures"]:
            f = rec["failures"][-1]
            rec["cause"] = rec.get("cause") or (f"{len(rec['failures'])} host(s) failed (max {rec['max_failures']}); "
                                                f"last: {f['host']} {f['kind']}: {f['message'].splitlines()[0] if f['message'] else ''}")  # fmt: skip
            return True
        return False

    def _revert(self, rec: dict) -> None:
        hosts = [h for h in rec["enforced"] if rec["previous"].get(h)]
        skipped = [h for h in rec["enforced"] if not rec["previous"].get(h)]
        self.progress(f"halting: {rec.get('cause', '')}")
        self.progress(f"reverting {len(hosts)} host(s) that were asked to enforce it")
        self.event(rec, "revert-start", hosts=hosts)
        self.save(rec)
        revs = self._write_desired(rec, hosts, "revert", active={h: rec["previous"][h] for h in hosts}, revert=True)
        results, _ = self._wait_results(hosts, revs, self.s.ack_timeout)
        unconfirmed = sorted(h for h in hosts if results.get(h, {}).get("result") != ACK) + skipped
        rec["unconfirmed"] = unconfirmed
        self.event(rec, "reverted", acks={h: r.get("time") for h, r in results.items()}, unconfirmed=unconfirmed)
        self._final(rec, HALTED, rec.get("cause") or "halted")

    def _final(self, rec: dict, phase: str, cause: str = "") -> None:
        rec["phase"] = phase
        if cause:
            rec["cause"] = cause
        self.event(rec, phase)
        self.save(rec)
        self.progress(f"rollout {rec['id']} {phase}" + (f": {cause}" if cause else ""))


class StatusView:
    """The status keys as last read, refreshed cheaply: the first read takes
    the whole prefix, each later one only the keys modified since the last
    read (etcd's min_mod_revision) plus the prefix's key count; when that
    count is below what the view holds, hosts' leases expired and one
    keys-only read finds which. A poll costs the statuses that changed
    (heartbeats and results), not the whole fleet's."""

    def __init__(self, etcd: Etcd, prefix: str):
        self.etcd = etcd
        self.prefix = prefix
        self.revision = 0
        self._sts: dict[str, dict | None] = {}  # None: a value that is not a status record

    def refresh(self) -> dict[str, dict]:
        kvs, count, rev = self.etcd.get_prefix_since(self.prefix, self.revision)
        if not self.revision:
            self._sts = {}
        for kv in kvs:
            try:
                st = decode(kv.value)
            except ValueError:
                st = None
            self._sts[kv.key[len(self.prefix):]] = st if isinstance(st, dict) else None
        if count < len(self._sts):
            live, _ = self.etcd.get_prefix(self.prefix, keys_only=True)
            keep = {kv.key[len(self.prefix):] for kv in live}
            self._sts = {h: st for h, st in self._sts.items() if h in keep}
        self.revision = rev
        return {h: st for h, st in self._sts.items() if st is not None}


def sum_shadow(hosts: list[str], sts: dict) -> dict:
    """Per host and fleet-wide would-drops of the shadow stage."""
    per = {}
    tot = {"packets": 0, "would_drop_new": 0, "sources_seen": 0, "sources_would_drop": 0}
    for h in hosts:
        n = (sts.get(h) or {}).get("shadow_numbers") or {}
        row = {k: int(n.get(k, 0)) for k in tot}
        row["packet_share"] = n.get("packet_share", 0.0)
        row["source_share"] = n.get("source_share", 0.0)
        per[h] = row
        for k in tot:
            tot[k] += row[k]
    tot["packet_share"] = tot["would_drop_new"] / tot["packets"] if tot["packets"] else 0.0
    tot["source_share"] = tot["sources_would_drop"] / tot["sources_seen"] if tot["sources_seen"] else 0.0
    return {"hosts": per, "total": tot}


def new_record(rid: str, kind: str, operator: str, reason: str, waves: list[list[str]], targets: dict,
               previous: dict, **settings) -> dict:  # fmt: skip
    return {"id": rid, "kind": kind, "operator": operator, "reason": reason, "started": time.time(),
            "waves": waves, "targets": targets, "previous": previous, "wave": 0, "enforced": [], "failures": [],
            "cause": "", "events": [], "phase": SHADOW if settings.get("shadow_first") else WAVE, **settings}  # fmt: skip


__all__ = ["Driver", "DriverBusy", "LostLock", "Settings", "StatusView", "new_record", "sum_shadow", "FINAL", "FAILED",
           "NACK"]
