"""Fleet scale by simulation: ~1,000 simulated hosts against a real etcd.

Each simulated host runs the agent's real fleet code (tidegate.fleet.hostagent.
FleetMember: the same keys, leases, watch and status records, one etcd client
per host) on an in-memory stand-in for the change service (no kernel, no BPF):
many hosts per process, several processes. The real driver
(tidegate.fleet.driver.Driver, default settings: 0.5 s poll, 100 puts per
transaction) rolls a rule set out over all of them in waves, no shadow stage.

Measured, in the same run:
  - the driver's overhead per wave beyond the bake time: wave start (before
    the desired states are written) -> bake end, minus the bake;
  - etcd requests and bytes per host per rollout: each host's calls are sorted
    as the rollout's (the watch event, the read of the new desired state and
    of the version, the result report: keepalive + status put) or as the
    background's (heartbeats, watch renewals when nothing changed), which is
    given per host per second;
  - desired-state write -> host ACK: the wave's start to the time in the
    host's ACK (an upper bound: it includes writing the whole wave), p50/p99/max;
  - the driver's own etcd traffic, next to what reading the whole status
    prefix at each poll (the driver before its incremental view) would read;
  - etcd's memory (RSS) and database size: empty, with the fleet joined, after the rollout.

    sudo .venv/bin/python bench/fleet_sim.py                 # 1,000 hosts, saves results/fleet_sim.{json,md}
    sudo .venv/bin/python bench/fleet_sim.py --quick         # 200 hosts, printed only
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

from report import header_lines, save, table, use_repo_package

use_repo_package()

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
    """The agent's and its change service's surface FleetMember uses, in memory."""

    def __init__(self, seed_text: str):
        self.changes = self
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
        from tidegate.ruleset.parse import parse_rule_set

        with _parse_lock:  # the same text on 250 hosts of a process: parse once
            rs = _parsed.get(text)
            if rs is None:
                rs = _parsed[text] = parse_rule_set(text, source)
        return rs

    def parse(self, text, source, caller, action):
        return self.validate(text, source)

    def apply(self, rs, reason, caller, *, shadow=False, **kw):
        from tidegate.operation import ApplyOutcome

        n = self._new(rs, caller.author)
        if shadow:
            self.shadow = n
        else:
            self.active = n
        return ApplyOutcome(n, shadow=shadow)

    def rollback(self, to, reason, caller, cause="manual"):
        from tidegate.operation import ApplyOutcome

        self.active = to
        self.store.acts.append((to, "rollback", time.time(), caller.author, reason))
        return ApplyOutcome(to)

    def clear_shadow(self, reason, caller):
        self.shadow = 0


_local = threading.local()
COST_KINDS = ("rollout", "background")


def _sim_etcd_class():
    from tidegate.fleet.etcd import Etcd

    class SimEtcd(Etcd):
        """A host's etcd client that sorts its calls: the rollout's or the background's."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.cost = {kind: [0, 0, 0] for kind in COST_KINDS}  # requests, bytes out, bytes in
            self._seen: dict[str, int] = {}
            self._reported = None  # the desired revision in the last status put

        def _tally(self, requests, bytes_out, bytes_in):
            super()._tally(requests, bytes_out, bytes_in)
            acc = getattr(_local, "acc", None)
            if acc is not None:
                acc[0] += requests
                acc[1] += bytes_out
                acc[2] += bytes_in

        def _measured(self, fn):
            _local.acc = [0, 0, 0]
            try:
                return fn(), _local.acc
            finally:
                _local.acc = None

        def _add(self, kind, acc):
            with self._lock:
                c = self.cost[kind]
                for i in range(3):
                    c[i] += acc[i]

        def get(self, key):
            (kv, rev), acc = self._measured(lambda: Etcd.get(self, key))
            new = kv is not None and self._seen.get(key) != kv.mod_revision
            if kv is not None:
                self._seen[key] = kv.mod_revision
            self._add("rollout" if new or "/versions/" in key else "background", acc)
            return kv, rev

        def wait_change(self, key, after_revision, timeout, prefix=False):
            changed, acc = self._measured(lambda: Etcd.wait_change(self, key, after_revision, timeout, prefix))
            self._add("rollout" if changed else "background", acc)
            return changed

        def _lease_call(self, fn):
            out, acc = self._measured(fn)
            prev = getattr(_local, "lease_acc", None) or [0, 0, 0]
            _local.lease_acc = [a + b for a, b in zip(prev, acc)]
            return out

        def keepalive(self, lease):
            return self._lease_call(lambda: Etcd.keepalive(self, lease))

        def grant(self, ttl):
            return self._lease_call(lambda: Etcd.grant(self, ttl))

        def put(self, key, value, lease=0):
            rev, acc = self._measured(lambda: Etcd.put(self, key, value, lease))
            lease_acc = getattr(_local, "lease_acc", None) or [0, 0, 0]
            _local.lease_acc = None
            done = int((json.loads(value).get("last") or {}).get("desired_revision", 0))
            kind = "rollout" if self._reported is not None and done != self._reported else "background"
            self._reported = done
            self._add(kind, [a + b for a, b in zip(acc, lease_acc)])  # a report is keepalive + put
            return rev

    return SimEtcd


def _child(endpoints: str, fleet: str, ids: range, heartbeat: float, ttl: int, conn) -> None:
    from tidegate.fleet.hostagent import FleetMember
    from tidegate.fleet.keys import Keys

    # hundreds of threads per process wait for the GIL at once when a wave lands; each waiter wakes up every
    # switch interval (5 ms) to ask for it, which on 2 cores turned into a storm of runnable threads (load
    # average > 100) that starved etcd and the hosts' heartbeats. 50 ms keeps the waiting quiet; a real
    # agent runs one fleet member per process and is not concerned.
    sys.setswitchinterval(0.05)
    SimEtcd = _sim_etcd_class()
    seed = RULES % (100, 200)
    members = []
    for i in ids:
        m = FleetMember(SimAgent(seed), SimEtcd(endpoints, timeout=10), Keys(fleet), f"sim{i:05d}",
                        {"zone": f"z{i % 4}"}, heartbeat=heartbeat, lease_ttl=ttl)  # fmt: skip
        m.start()
        members.append(m)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            conn.send({kind: [sum(m.etcd.cost[kind][i] for m in members) for i in range(3)] for kind in COST_KINDS})
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
            "--initial-cluster", f"sim=http://127.0.0.1:{pp}", "--log-level", "warn"]  # fmt: skip
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
METHOD = "measured in the same run:\n" + __doc__.split("Measured, in the same run:\n")[1].split("\n\n")[0]


def _progress(text: str) -> None:
    if not text.startswith("  ") or "FAILED" in text:  # waves, not every host's answer
        print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run(args) -> dict:
    from tidegate.fleet.driver import Driver, Settings, new_record
    from tidegate.fleet.etcd import Etcd
    from tidegate.fleet.keys import Keys, encode, new_rollout_id, plan_waves
    from tidegate.ruleset.parse import parse_rule_set

    tmp = tempfile.mkdtemp(prefix="tg-fleet-sim-")
    etcd_proc, url = start_etcd(tmp)
    fleet = "sim"
    keys = Keys(fleet)
    out: dict = {"hosts": args.hosts, "procs": args.procs, "bake_s": args.bake, "waves": args.waves,
                 "heartbeat_s": args.heartbeat, "lease_ttl_s": args.lease_ttl, "driver_poll_s": args.poll}  # fmt: skip
    kids = []
    try:
        out["etcd_empty"] = etcd_memory(etcd_proc.pid, url)
        t0 = time.monotonic()
        for k in range(min(args.procs, args.hosts)):
            a, b = mp.Pipe()
            ids = range(k, args.hosts, args.procs)  # round robin: each wave is spread over every process
            p = mp.Process(target=_child, args=(url, fleet, ids, args.heartbeat, args.lease_ttl, b), daemon=True)
            p.start()
            kids.append((p, a))
        for _, a in kids:
            assert a.recv() == "ready"
        drv_etcd = Etcd(url, timeout=30)
        while len(drv_etcd.get_prefix(keys.status_prefix, keys_only=True)[0]) < args.hosts:
            time.sleep(0.5)
        out["join_s"] = round(time.monotonic() - t0, 1)
        time.sleep(args.heartbeat)  # every host past its first heartbeat
        out["etcd_joined"] = etcd_memory(etcd_proc.pid, url)

        def stats() -> dict:
            tot = {kind: [0, 0, 0] for kind in COST_KINDS}
            for _, a in kids:
                a.send("stats")
                got = a.recv()
                for kind in COST_KINDS:
                    tot[kind] = [x + y for x, y in zip(tot[kind], got[kind])]
            return tot

        text = RULES % (150, 300)
        digest = parse_rule_set(text, "sim").digest()
        drv_etcd.create(keys.version(digest), encode({"digest": digest, "yaml": text, "author": "bench"}))
        hosts = [f"sim{i:05d}" for i in range(args.hosts)]
        waves = plan_waves(hosts, args.waves)
        drv = Driver(drv_etcd, keys, "bench", Settings(ack_timeout=120, heartbeat_deadline=max(30, 3 * args.heartbeat),
                                                       poll=args.poll), progress=_progress)  # fmt: skip
        polls = [0]
        refresh = drv.view.refresh

        def counted_refresh():
            polls[0] += 1
            return refresh()

        drv.view.refresh = counted_refresh
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
        out["phase"] = rec["phase"]
        out["rollout_record_kb"] = round(len(encode(rec)) / 1e3, 1)
        out["cause"] = rec.get("cause", "")
        out["etcd_after_rollout"] = etcd_memory(etcd_proc.pid, url)
        b = drv_etcd.bytes_in
        drv_etcd.get_prefix(keys.status_prefix)
        full_read = drv_etcd.bytes_in - b
        ev = rec["events"]
        starts = {e["wave"]: e["t"] for e in ev if e["event"] == "wave-start"}
        baked = {e["wave"]: e["t"] for e in ev if e["event"] == "wave-baked"}
        acks = {e["wave"]: e["acks"] for e in ev if e["event"] == "wave-acked"}
        out["waves_hosts"] = [len(w) for w in waves]
        out["wave_overhead_s"] = [round(baked[i] - starts[i] - args.bake, 2) for i in sorted(baked)]
        out["wave_ack_p99_s"] = [round(_pct(sorted(t - starts[i] for t in acks[i].values()), 0.99), 3)
                                 for i in sorted(acks)]  # fmt: skip
        lat = sorted(t - starts[i] for i in acks for t in acks[i].values())
        out["acks"] = len(lat)
        out["ack_latency_s"] = {"p50": round(_pct(lat, 0.5), 3), "p99": round(_pct(lat, 0.99), 3),
                                "max": round(lat[-1], 3) if lat else None}  # fmt: skip
        out["rollout_s"] = round(roll_s, 1)
        n = args.hosts
        names = ("requests", "bytes_out", "bytes_in")
        roll = [s1["rollout"][i] - s0["rollout"][i] for i in range(3)]
        bg = [s1["background"][i] - s0["background"][i] for i in range(3)]
        out["per_host_per_rollout"] = {k: round(roll[i] / n, 1) for i, k in enumerate(names)}
        out["per_host_background_per_s"] = {k: round(bg[i] / n / roll_s, 2) for i, k in enumerate(names)}
        out["driver"] = {"requests": d1[0] - d0[0], "bytes_in": d1[1] - d0[1], "bytes_out": d1[2] - d0[2],
                         "status_polls": polls[0], "full_status_read_bytes": full_read,
                         "full_reads_would_be_bytes": full_read * polls[0]}  # fmt: skip
        drv_etcd.close()
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        with open(os.path.join(tmp, "etcd.log"), errors="replace") as f:
            out["etcd_slow_request_warnings"] = sum("took too long" in line for line in f)
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
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]


def markdown(o: dict, command: str, header: list[str]) -> str:
    lines = list(header)
    lines += [f"Command: `{command}`", "",
              f"{o['hosts']} simulated hosts in {o['procs']} processes, one etcd 3.4 member on loopback, waves "
              f"`{o['waves']}` ({', '.join(map(str, o['waves_hosts']))} hosts), bake {o['bake_s']:.0f} s, "
              f"heartbeat {o['heartbeat_s']:.0f} s (lease {o['lease_ttl_s']} s), driver poll {o['driver_poll_s']} s. "
              f"Rollout: **{o['phase']}**" + (f" ({o['cause']})" if o.get("cause") else "") +
              f" in {o['rollout_s']} s; {o['acks']} ACKs; hosts joined in {o['join_s']} s.", ""]  # fmt: skip
    lines += ["### per wave", "", table(
        ["wave", "hosts", "overhead beyond bake s", "write -> ACK p99 s"],
        [[i + 1, o["waves_hosts"][i], o["wave_overhead_s"][i] if i < len(o["wave_overhead_s"]) else "n/a",
          o["wave_ack_p99_s"][i] if i < len(o["wave_ack_p99_s"]) else "n/a"] for i in range(len(o["waves_hosts"]))]),
        ""]  # fmt: skip
    a, r, b, d = o["ack_latency_s"], o["per_host_per_rollout"], o["per_host_background_per_s"], o["driver"]
    lines += ["### figures", "", table(["figure", "value"], [
        ["desired write -> ACK p50 / p99 / max", f"{a['p50']} / {a['p99']} / {a['max']} s"],
        ["etcd per host per rollout (the rollout's calls)",
         f"{r['requests']} requests, {r['bytes_out'] / 1e3:.2f} kB out, {r['bytes_in'] / 1e3:.2f} kB in"],
        ["etcd per host per second in the background (heartbeats, watch renewals)",
         f"{b['requests']} requests, {b['bytes_out'] / 1e3:.2f} kB out, {b['bytes_in'] / 1e3:.2f} kB in"],
        ["driver, whole rollout", f"{d['requests']} requests, {d['bytes_in'] / 1e6:.2f} MB in, "
                                  f"{d['bytes_out'] / 1e6:.2f} MB out; {d['status_polls']} status polls"],
        ["the same polls reading the whole status prefix", f"{d['full_reads_would_be_bytes'] / 1e6:.1f} MB in "
                                                           f"({d['full_status_read_bytes'] / 1e3:.0f} kB a read)"],
        ["rollout record (rewritten at each step)", f"{o['rollout_record_kb']} kB"],
        ["etcd 'took too long' warnings during the run", o["etcd_slow_request_warnings"]],
        ["load average at the end (1, 5, 15 min)", ", ".join(map(str, o["loadavg_after"]))],
        ["etcd RSS empty -> joined -> after", f"{o['etcd_empty']['rss_mb']} -> {o['etcd_joined']['rss_mb']} -> "
                                              f"{o['etcd_after_rollout']['rss_mb']} MB"],
        ["etcd db size empty -> joined -> after", f"{o['etcd_empty']['db_mb']} -> {o['etcd_joined']['db_mb']} -> "
                                                  f"{o['etcd_after_rollout']['db_mb']} MB"],
    ]), ""]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help="processes the simulated hosts are spread over")
    ap.add_argument("--bake", type=float, default=5.0)
    ap.add_argument("--waves", default="1,10%,50%,100%")
    ap.add_argument("--heartbeat", type=float, default=5.0)
    ap.add_argument("--lease-ttl", type=int, default=15)
    ap.add_argument("--poll", type=float, default=0.5, help="the driver's poll interval (its default: 0.5 s)")
    ap.add_argument("--quick", action="store_true", help="200 hosts in 2 processes, printed only")
    ap.add_argument("--save", action="store_true", help="save a --quick run too (as fleet_sim-quick)")
    ap.add_argument("--no-save", action="store_true", help="print a full run without saving it")
    args = ap.parse_args()
    if args.quick:
        args.hosts, args.procs = 200, 2
    command = "sudo .venv/bin/python bench/fleet_sim.py " + " ".join(sys.argv[1:])
    header = header_lines(f"fleet simulation: {args.hosts} hosts", METHOD)  # the load average before the run
    o = run(args)
    text = markdown(o, command.strip(), header)
    print(text)
    if (args.quick and args.save) or not (args.quick or args.no_save):
        jp, mp_ = save("fleet_sim-quick" if args.quick else "fleet_sim", o | {"command": command.strip()}, text)
        print(f"saved {jp} and {mp_}")
    return 0 if o["phase"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
