"""Reading the fleet for people and scripts: hosts, rollouts, versions."""

from __future__ import annotations

import time

from tidegate.fleet.etcd import Etcd
from tidegate.fleet.keys import FleetError, Keys, decode


def hosts(etcd: Etcd, keys: Keys) -> list[dict]:
    """One row per host with a live status key, plus hosts that have a
    desired state but no status (their lease expired: down or cut off)."""
    sts, _ = etcd.get_prefix(keys.status_prefix)
    des, _ = etcd.get_prefix(keys.desired_prefix)
    now = time.time()
    rows = {}
    for kv in sts:
        st = decode(kv.value)
        last = st.get("last") or {}
        rows[st["host"]] = {
            "host": st["host"], "labels": st.get("labels", {}), "alive": True,
            "active_version": st.get("active_version", 0), "active_digest": st.get("active_digest", ""),
            "shadow_version": st.get("shadow_version", 0), "shadow_digest": st.get("shadow_digest", ""),
            "guard": st.get("guard", {}), "result": last.get("result", ""), "message": last.get("message", ""),
            "rollout": last.get("rollout", ""), "heartbeat_age": round(now - st.get("heartbeat", now), 1),
            "drift": st.get("drift"), "agent_version": st.get("agent_version", ""),
            "shadow_numbers": st.get("shadow_numbers"), "state": _state(st),
        }  # fmt: skip
    for kv in des:
        h = kv.key[len(keys.desired_prefix):]
        if h not in rows:
            rows[h] = {"host": h, "labels": {}, "alive": False, "active_version": 0, "active_digest": "",
                       "shadow_version": 0, "shadow_digest": "", "guard": {}, "result": "", "message": "",
                       "rollout": "", "heartbeat_age": None, "drift": None, "agent_version": "",
                       "shadow_numbers": None, "state": "gone"}  # fmt: skip
    return [rows[h] for h in sorted(rows)]


def _state(st: dict) -> str:
    last = st.get("last") or {}
    if st.get("drift"):
        return "drift"
    if (st.get("guard") or {}).get("watching"):
        return "guarding"
    if last.get("result") in ("NACK", "ROLLED_BACK"):
        return last["result"].lower().replace("_", "-")
    return "in-sync"


def rollouts(etcd: Etcd, keys: Keys, limit: int = 20) -> list[dict]:
    kvs, _ = etcd.get_prefix(keys.rollouts)
    recs = [decode(kv.value) for kv in kvs]
    recs.sort(key=lambda r: r.get("started", 0), reverse=True)
    return recs[:limit]


def current_rollout(etcd: Etcd, keys: Keys) -> dict | None:
    kv, _ = etcd.get(keys.current)
    if kv is None:
        return None
    rec, _ = etcd.get(keys.rollout(kv.value.decode()))
    return decode(rec.value) if rec else None


def summary(rec: dict) -> dict:
    """A rollout without its per-host detail."""
    return {k: rec.get(k) for k in ("id", "kind", "phase", "operator", "reason", "started", "updated", "wave",
                                    "cause", "max_failures", "bake", "shadow_first")} | {
        "waves": [len(w) for w in rec.get("waves", [])], "failures": rec.get("failures", []),
        "candidate": rec.get("candidate", ""), "unconfirmed": rec.get("unconfirmed", []),
        "shadow_total": (rec.get("shadow") or {}).get("total")}  # fmt: skip


def resolve_version(etcd: Etcd, keys: Keys, prefix: str) -> str:
    """A full digest from a prefix of one (at least 6 characters)."""
    if len(prefix) < 6:
        raise FleetError("--to needs at least 6 characters of a version digest (tidegate fleet history)")
    kvs, _ = etcd.get_prefix(keys.version(prefix), keys_only=True)
    digests = [kv.key[len(keys.versions):] for kv in kvs]
    if len(digests) != 1:
        raise FleetError(f"version {prefix!r} matches {len(digests)} fleet versions" +
                         (f": {', '.join(d[:12] for d in digests)}" if digests else ""))  # fmt: skip
    return digests[0]
