"""Fleet scale by simulation: ~1,000 simulated hosts against a real etcd.

Each simulated host runs the agent's real fleet code (tidegate.fleet.hostagent.
FleetMember: the same keys, leases, watch and status records) on an in-memory
stand-in for the change service (no kernel, no BPF): many hosts per process,
several processes. The real driver (tidegate.fleet.driver.Driver) rolls a rule
set out over all of them in waves.

Measured, in the same run:
  - the driver's overhead per wave beyond the bake time (wave start -> bake end - bake);
  - etcd requests and bytes per host per rollout, net of the heartbeats an idle
    fleet sends over the same time (the reference, measured first);
  - p99 from the desired-state write to the host's ACK;
  - etcd's memory (RSS) and database size: empty, with the fleet joined, after the rollout.

    sudo .venv/bin/python bench/fleet_sim.py --hosts 1000 --procs 4 --bake 5
    sudo .venv/bin/python bench/fleet_sim.py --quick      # 200 hosts
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "control"))

RULES = """\
defaults:
  limit: {pps: 200, burst: 400}
rules:
  - name: api
    protocol: udp
    dst_ports: [8080]
    limit: {pps: %d, burst: %d}
"""


# --------------------------------------------------------- a host, no kernel
@dataclass
class _Rec:
    number: int
    digest: str
    state: str = "applied"


class _Store:
    def __init__(self):
        self.meta: dict = {}
        self.versions: list[_Rec] = []
        self.acts: list[tuple] = []

    def get_meta(self, k, default=None):
        return self.meta.get(k, default)

    def set_meta(self, k, v):
        self.meta[k] = v if isinstance(v, str) else json.dumps(v)

    def list_versions(self, limit, offset):
        return list(reversed(self.versions))[offset:offset + limit]

    def activations(self, n):
        return self.acts[-n:][::-1]

    def audit(self, *a, **k):
        pass


_parsed: dict[str, object] = {}
_parse_lock = threading.Lock()


class SimAgent:
    """The change service's surface FleetMember uses, in memory."""

    def __init__(self, seed_text: str):
        self.store = _Store()
        self.guard = None
        self.shadow_loaded_at = None
        self.active = self._new(self.validate(seed_text, "seed"), "seed")
        self.shadow = 0

    def _new(self, rs, author) -> int:
        n = len(self.store.versions) + 1
        self.store.versions.append(_Rec(n, rs.digest()))
        self.store.acts.append((n, "apply", time.time(), author, "sim"))
        return n

    def status(self):
        return {"active_version": self.active, "shadow_version": self.shadow, "attached": True,
                "guard_active": False, "guard_version": 0}  # fmt: skip

    def get_version(self, n):
        return self.store.versions[n - 1]

    def validate(self, text, source):
        from tidegate.ruleset import parse_rule_set

        with _parse_lock:  # the same text on 250 hosts of a process: parse once
            rs = _parsed.get(text)
            if rs is None:
                rs = _parsed[text] = parse_rule_set(text, source)
        return rs

    def apply(self, text, source, reason, caller, *, shadow=False, **kw):
        from tidegate.agent import ApplyOutcome

        n = self._new(self.validate(text, source), caller.author)
        if shadow:
            self.shadow = n
        else:
            self.active = n
        return ApplyOutcome(n, shadow=shadow)

    def apply_rule_set(self, rs, reason, caller, **kw):
        from tidegate.agent import ApplyOutcome

        self.active = self._new(rs, caller.author)
        return ApplyOutcome(self.active)

    def rollback(self, to, reason, caller, cause="manual"):
        from tidegate.agent import ApplyOutcome

        self.active = to
        self.store.acts.append((to, "rollback", time.time(), caller.author, reason))
        return ApplyOutcome(to)

    def clear_shadow(self, reason, caller):
        self.shadow = 0


def _child(endpoints: str, fleet: str, first: int, count: int, heartbeat: float, ttl: int, conn) -> None:
    from tidegate.fleet.etcd import Etcd
    from tidegate.fleet.hostagent import FleetMember
    from tidegate.fleet.keys import Keys

    seed = RULES % (100, 200)
    members = []
    for i in range(first, first + count):
        m = FleetMember(SimAgent(seed), Etcd(endpoints, timeout=10), Keys(fleet), f"sim{i:05d}", {"zone": f"z{i % 4}"},
                        heartbeat=heartbeat, lease_ttl=ttl)  # fmt: skip
        m.start()
        members.append(m)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            conn.send({"requests": sum(m.etcd.requests for m in members),
                       "bytes_in": sum(m.etcd.bytes_in for m in members),
                       "bytes_out": sum(m.etcd.bytes_out for m in members)})  # fmt: skip
        elif cmd == "stop":
            for m in members:
                m._stop.set()
                m._wake.set()
            conn.send("stopped")
            return


# ------------------------------------------------------------------- etcd
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_etcd(tmp: str) -> tuple[subprocess.Popen, str]:
    cp, pp = _free_port(), _free_port()
    url = f"http://127.0.0.1:{cp}"
    argv = [shutil.which("etcd") or "/usr/bin/etcd", "--name", "sim", "--data-dir", os.path.join(tmp, "sim.etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{pp}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
            "--initial-cluster", f"sim=http://127.0.0.1:{pp}", "--log-level", "error"]  # fmt: skip
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "etcd.log"), "ab"))
    from tidegate.fleet.etcd import Etcd, EtcdUnavailable

    e = Etcd(url)
    for _ in range(100):
        try:
            e.put("/sim-ready", b"1")
            break
        except EtcdUnavailable:
            time.sleep(0.1)
    e.close()
    return p, url


def etcd_memory(pid: int, url: str) -> dict:
    from tidegate.fleet.etcd import Etcd

    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    e = Etcd(url)
    st = e.status()
    e.close()
    return {"rss_mb": round(rss / 2**20, 1), "db_mb": round(int(st.get("dbSize", 0)) / 2**20, 2)}


# ------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--bake", type=float, default=5.0)
    ap.add_argument("--waves", default="1,10%,50%,100%")
    ap.add_argument("--heartbeat", type=float, default=5.0)
    ap.add_argument("--lease-ttl", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="200 hosts, 2 processes")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    if args.quick:
        args.hosts, args.procs = 200, 2
    from tidegate.fleet.driver import Driver, Settings, new_record
    from tidegate.fleet.etcd import Etcd
    from tidegate.fleet.keys import Keys, encode, new_rollout_id, plan_waves

    tmp = tempfile.mkdtemp(prefix="tg-fleet-sim-")
    etcd_proc, url = start_etcd(tmp)
    fleet = "sim"
    keys = Keys(fleet)
    out: dict = {"hosts": args.hosts, "procs": args.procs, "bake_s": args.bake, "waves": args.waves,
                 "heartbeat_s": args.heartbeat}  # fmt: skip
    kids = []
    try:
        out["etcd_empty"] = etcd_memory(etcd_proc.pid, url)
        per = -(-args.hosts // args.procs)
        t0 = time.monotonic()
        for k in range(args.procs):
            n = min(per, args.hosts - k * per)
            if n <= 0:
                break
            a, b = mp.Pipe()
            p = mp.Process(target=_child, args=(url, fleet, k * per, n, args.heartbeat, args.lease_ttl, b), daemon=True)
            p.start()
            kids.append((p, a))
        for _, a in kids:
            assert a.recv() == "ready"
        drv_etcd = Etcd(url, timeout=30)
        while len(drv_etcd.get_prefix(keys.status_prefix, keys_only=True)[0]) < args.hosts:
            time.sleep(0.5)
        out["join_s"] = round(time.monotonic() - t0, 1)
        out["etcd_joined"] = etcd_memory(etcd_proc.pid, url)

        def stats() -> dict:
            tot = {"requests": 0, "bytes_in": 0, "bytes_out": 0}
            for _, a in kids:
                a.send("stats")
                s = a.recv()
                for k in tot:
                    tot[k] += s[k]
            return tot

        # reference: an idle fleet's heartbeats over the rollout's length, measured after it
        text = RULES % (150, 300)
        from tidegate.ruleset import parse_rule_set

        digest = parse_rule_set(text, "sim").digest()
        drv_etcd.create(keys.version(digest), encode({"digest": digest, "yaml": text, "author": "bench"}))
        hosts = [f"sim{i:05d}" for i in range(args.hosts)]
        waves = plan_waves(hosts, args.waves)
        drv = Driver(drv_etcd, keys, "bench", Settings(ack_timeout=120, heartbeat_deadline=max(30, 3 * args.heartbeat),
                                                       poll=1.0))  # fmt: skip
        rec = new_record(new_rollout_id(), "rollout", "bench", "scale", waves, {h: digest for h in hosts},
                         {h: "" for h in hosts}, candidate=digest, bake=args.bake, shadow_first=0, max_failures=0,
                         force=False, packet_budget=0.01, source_budget=0.05, guard_seconds=0)  # fmt: skip
        drv.acquire()
        s0, d0 = stats(), (drv_etcd.requests, drv_etcd.bytes_in, drv_etcd.bytes_out)
        t_roll = time.monotonic()
        drv.save(rec)
        rec = drv.drive(rec)
        roll_s = time.monotonic() - t_roll
        s1, d1 = stats(), (drv_etcd.requests, drv_etcd.bytes_in, drv_etcd.bytes_out)
        drv.release()
        assert rec["phase"] == "completed", rec.get("cause")
        out["etcd_after_rollout"] = etcd_memory(etcd_proc.pid, url)
        time.sleep(0.5)
        s2 = stats()
        time.sleep(roll_s)
        s3 = stats()  # idle over the same length: the heartbeat reference
        ev = rec["events"]
        starts = {e["wave"]: e["t"] for e in ev if e["event"] == "wave-start"}
        baked = {e["wave"]: e["t"] for e in ev if e["event"] == "wave-baked"}
        acks = {e["wave"]: e["acks"] for e in ev if e["event"] == "wave-acked"}
        out["waves_hosts"] = [len(w) for w in waves]
        out["wave_overhead_s"] = [round(baked[i] - starts[i] - args.bake, 2) for i in sorted(starts)]
        lat = sorted(t - starts[i] for i in acks for t in acks[i].values())
        out["ack_latency_s"] = {"p50": round(lat[len(lat) // 2], 3), "p99": round(lat[int(len(lat) * 0.99) - 1], 3),
                                "max": round(lat[-1], 3)}  # fmt: skip
        out["rollout_s"] = round(roll_s, 1)
        n = args.hosts
        roll = {k: s1[k] - s0[k] for k in s0}
        idle = {k: s3[k] - s2[k] for k in s2}
        out["per_host_during_rollout"] = {k: round(v / n, 1) for k, v in roll.items()}
        out["per_host_idle_same_time"] = {k: round(v / n, 1) for k, v in idle.items()}
        out["per_host_per_rollout_net"] = {k: round((roll[k] - idle[k]) / n, 1) for k in roll}
        out["driver_total"] = {"requests": d1[0] - d0[0], "bytes_in": d1[1] - d0[1], "bytes_out": d1[2] - d0[2]}
        drv_etcd.close()
    finally:
        for _, a in kids:
            try:
                a.send("stop")
            except OSError:
                pass
        for p, _ in kids:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        etcd_proc.terminate()
        etcd_proc.wait(timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
