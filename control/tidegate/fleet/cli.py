"""`tidegate fleet VERB`: rollouts across hosts through etcd.

The fleet verbs talk to etcd only (never to an agent's API, so no API token
is needed or stored): they write desired state and rollout records and read
the hosts' status keys."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from tidegate.client import default_author
from tidegate.cli.options import output_option, parse_verb
from tidegate.fleet.driver import Driver, DriverBusy, LostLock, Settings, StatusView, new_record
from tidegate.fleet.etcd import Etcd, EtcdUnavailable
from tidegate.fleet.keys import FINAL, FleetError, Keys, encode, matches, new_rollout_id, parse_labels, plan_waves
from tidegate.fleet.metrics import serve
from tidegate.fleet.views import current_rollout, hosts, resolve_version, rollouts, summary
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import parse_rule_set

OUTPUTS = ("table", "json")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUSY, EXIT_HALTED, EXIT_REFUSED, EXIT_UNCONFIRMED = 0, 1, 2, 3, 4, 5, 6

EXAMPLES = """EXAMPLES
  tidegate fleet rollout rules.yaml --etcd https://etcd1:2379 --fleet edge --reason 'raise api limit'
  tidegate fleet rollout rules.yaml --fleet edge --reason R --selector zone=fra --waves 1,3,rest --bake 120
  tidegate fleet resume --fleet edge --wait-lock 30
  tidegate fleet rollback --fleet edge --reason 'users blocked'
  tidegate fleet -o json status --fleet edge

"""

EXIT_STATUS = """EXIT STATUS
  0  rollout completed (or: the read verbs answered)
  1  etcd unreachable for longer than --etcd-patience, or an unexpected error
     (the rollout stays as recorded: `tidegate fleet resume` continues it)
  2  usage error or bad input: invalid rule set, unknown version, no host selected
  3  another driver holds the fleet (or this one lost its lock)
  4  halted: a host failed; every host that enforced the candidate was reverted
  5  refused at the fleet-wide shadow stage: nothing was enforced anywhere
  6  halted, but some host did not confirm its revert (see `fleet status`)"""

DESCRIPTION = """tidegate fleet — staged rule-set rollouts across edge hosts, through etcd.

  rollout FILE   shadow fleet-wide, then enforce in waves with bake time; halt and revert on failure
  resume         continue the rollout a dead driver left (from its record in etcd)
  rollback       roll the fleet back (to each host's version before the last rollout, or --to V), in waves
  status         hosts: labels, active and shadow version, state, heartbeat age, drift
  history        rollouts: who, why, phase, waves, cause
  exporter       serve fleet metrics for Prometheus (hosts by state and version, rollout phase, shadow sums)

Agents join with `tidegate agent ... --fleet-etcd URL --fleet NAME --host-id ID --label k=v`."""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("etcd")
    g.add_argument("--etcd", default=os.environ.get("TIDEGATE_FLEET_ETCD", "http://127.0.0.1:2379"),
                   metavar="URL[,URL...]", help="etcd endpoints (default $TIDEGATE_FLEET_ETCD or http://127.0.0.1:2379)")  # fmt: skip
    g.add_argument("--fleet", default=os.environ.get("TIDEGATE_FLEET", "default"),
                   help="fleet name (default $TIDEGATE_FLEET or 'default')")  # fmt: skip
    g.add_argument("--etcd-ca", metavar="PEM", help="CA of etcd's server certificate")
    g.add_argument("--etcd-cert", metavar="PEM", help="client certificate for etcd")
    g.add_argument("--etcd-key", metavar="PEM", help="client key for etcd")
    output_option(g, suppress=True, choices=OUTPUTS, help="table or json")


def _drive_options(p: argparse.ArgumentParser, shadow_default: float) -> None:
    p.add_argument("--reason", "-r", default="", help="why (required; recorded in the rollout and each host's audit)")
    p.add_argument("--selector", action="append", default=[], metavar="K=V", help="only hosts with this label")
    p.add_argument("--waves", default="1,10%,50%,100%",
                   help="cumulative wave sizes: host counts, percentages or 'rest' (default 1,10%%,50%%,100%%)")  # fmt: skip
    p.add_argument("--bake", type=float, default=60.0, metavar="S", help="seconds each wave bakes (default 60)")
    p.add_argument("--shadow-first", type=float, default=shadow_default, metavar="S",
                   help=f"seconds of fleet-wide shadow before any wave (default {shadow_default:.0f}; 0 skips)")  # fmt: skip
    p.add_argument("--max-failures", type=int, default=0, metavar="N", help="failed hosts tolerated (default 0)")
    p.add_argument("--force", action="store_true",
                   help="go on when the shadow stage is over budget, and pass --force to each host's blast-radius check")  # fmt: skip
    p.add_argument("--packet-budget", type=float, default=0.01, help="fleet-wide share of packets (default 0.01)")
    p.add_argument("--source-budget", type=float, default=0.05, help="fleet-wide share of sources (default 0.05)")
    p.add_argument("--guard-seconds", type=int, default=0, metavar="S",
                   help="each host's guard window (default: the bake time, at least 5 s)")  # fmt: skip
    _driver_settings(p)


def _driver_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ack-timeout", type=float, default=60.0, metavar="S",
                   help="how long a wave waits for each host's answer (default 60)")  # fmt: skip
    p.add_argument("--heartbeat-deadline", type=float, default=30.0, metavar="S",
                   help="a host silent this long fails its wave (default 30)")  # fmt: skip
    p.add_argument("--lock-ttl", type=int, default=10, metavar="S", help="driver lock lease (default 10)")
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="S",
                   help="wait this long for another driver's lock (default 0: refuse at once)")  # fmt: skip
    p.add_argument("--etcd-patience", type=float, default=60.0, metavar="S",
                   help="how long to wait out an etcd outage before exiting 1 (default 60)")  # fmt: skip
    p.add_argument("--txn-ops", type=_positive_int, default=100, metavar="N",
                   help="desired states written per etcd transaction; at most etcd's --max-txn-ops (default 100)")  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidegate fleet", description=DESCRIPTION, epilog=EXAMPLES + EXIT_STATUS,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # fmt: skip
    output_option(p, suppress=False, choices=OUTPUTS, help="table (default) or json")
    sub = p.add_subparsers(dest="fverb", metavar="VERB")
    r = sub.add_parser("rollout", help="roll a rule set out in waves", epilog=EXIT_STATUS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    r.add_argument("file", metavar="FILE", help="rule-set YAML file")
    _drive_options(r, 60.0)
    _common(r)
    rs = sub.add_parser("resume", help="continue the rollout a dead driver left", epilog=EXIT_STATUS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _driver_settings(rs)
    _common(rs)
    rb = sub.add_parser("rollback", help="roll the fleet back, in waves", epilog=EXIT_STATUS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    rb.add_argument("--to", default="", metavar="V", help="fleet version digest (prefix); default: each host's "
                    "version before the newest rollout")  # fmt: skip
    _drive_options(rb, 0.0)
    _common(rb)
    st = sub.add_parser("status", help="hosts and the current rollout")
    _common(st)
    ex = sub.add_parser("exporter", help="serve fleet metrics for Prometheus (read from etcd at each scrape)")
    ex.add_argument("--listen", default="127.0.0.1:9641", metavar="HOST:PORT", help="default 127.0.0.1:9641")
    _common(ex)
    hi = sub.add_parser("history", help="rollouts, newest first")
    hi.add_argument("--limit", type=int, default=20)
    _common(hi)
    return p


def main(argv: list[str]) -> int:
    args = parse_verb(build_parser(), argv, "fverb")
    if isinstance(args, int):
        return args
    if bool(args.etcd_cert) != bool(args.etcd_key):
        print("tidegate fleet: --etcd-cert and --etcd-key go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        keys = Keys(args.fleet)
        etcd = Etcd(args.etcd, ca=args.etcd_ca, cert=args.etcd_cert, key=args.etcd_key)
    except (FleetError, ValueError) as e:
        print(f"tidegate fleet: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return VERBS[args.fverb](args, etcd, keys)
    except FleetError as e:
        print(f"tidegate fleet: {e}", file=sys.stderr)
        return EXIT_USAGE
    except EtcdUnavailable as e:
        print(f"tidegate fleet: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tidegate fleet: interrupted; the rollout stays as recorded (tidegate fleet resume)", file=sys.stderr)
        return 130
    finally:
        etcd.close()


def _json(args) -> bool:
    return args.output == "json"


def _progress(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _driver(args, etcd, keys):
    s = Settings(ack_timeout=args.ack_timeout, heartbeat_deadline=args.heartbeat_deadline, lock_ttl=args.lock_ttl,
                 etcd_patience=args.etcd_patience, txn_ops=args.txn_ops)  # fmt: skip
    return Driver(etcd, keys, default_author(), s, progress=_progress)


def _select(etcd, keys, selector: dict) -> dict[str, dict]:
    sts = StatusView(etcd, keys.status_prefix).refresh()
    return {h: st for h, st in sts.items() if matches(st.get("labels", {}), selector)}


def _publish_version(etcd, keys, text: str, source: str, reason: str, operator: str) -> str:
    try:
        rs = parse_rule_set(text, source)
    except RuleSetError as e:
        raise FleetError(f"{source} is not a valid rule set ({len(e.errors)} error(s)):\n{e}") from None
    digest = rs.digest()
    etcd.create(keys.version(digest), encode({"digest": digest, "yaml": text, "author": operator, "reason": reason,
                                             "created": time.time(), "source": source}))  # fmt: skip
    return digest


def _run(args, etcd, keys, driver, rec: dict) -> int:
    try:
        driver.acquire(args.wait_lock)
    except DriverBusy as e:
        print(f"tidegate fleet: {e}", file=sys.stderr)
        return EXIT_BUSY
    try:
        if rec.get("new"):
            del rec["new"]
            driver.save(rec)
            _progress(f"rollout {rec['id']} by {rec['operator']}: {rec['reason']} "
                      f"({len(rec['waves'])} wave(s): {', '.join(str(len(w)) for w in rec['waves'])} host(s))")
        rec = driver.drive(rec)
    except LostLock as e:
        print(f"tidegate fleet: {e}", file=sys.stderr)
        return EXIT_BUSY
    finally:
        driver.release()
    return _finish(args, rec)


def _finish(args, rec: dict) -> int:
    if _json(args):
        print(json.dumps(rec | {"summary": summary(rec)}, indent=1, sort_keys=True))
    else:
        print(f"rollout {rec['id']}: {rec['phase']}" + (f": {rec['cause']}" if rec.get("cause") else ""))
    return {"completed": EXIT_OK, "refused": EXIT_REFUSED,
            "halted": EXIT_UNCONFIRMED if rec.get("unconfirmed") else EXIT_HALTED}.get(rec["phase"], EXIT_ERROR)  # fmt: skip


def _new_rollout(args, etcd, keys, kind: str, targets_for) -> int:
    if not args.reason.strip():
        raise FleetError("a reason is required (--reason TEXT): it is recorded in the rollout and on every host")
    selector = parse_labels(args.selector)
    hosts = _select(etcd, keys, selector)
    if not hosts:
        raise FleetError("no live host matches" + (f" {' '.join(args.selector)}" if args.selector else "") +
                         f" in fleet {keys.fleet} (tidegate fleet status)")  # fmt: skip
    driver = _driver(args, etcd, keys)
    targets, candidate = targets_for(hosts, driver.operator)
    waves = plan_waves(sorted(targets), args.waves)
    previous = {h: hosts[h].get("active_digest", "") for h in targets}
    rec = new_record(new_rollout_id(), kind, driver.operator, args.reason.strip(), waves, targets, previous,
                     candidate=candidate, selector=selector, waves_spec=args.waves, bake=args.bake,
                     shadow_first=args.shadow_first, max_failures=args.max_failures, force=args.force,
                     packet_budget=args.packet_budget, source_budget=args.source_budget,
                     guard_seconds=args.guard_seconds or max(5, int(round(args.bake))))  # fmt: skip
    rec["new"] = True
    return _run(args, etcd, keys, driver, rec)


def cmd_rollout(args, etcd, keys) -> int:
    try:
        text = open(args.file, encoding="utf-8").read()
    except OSError as e:
        raise FleetError(f"cannot read {args.file}: {e.strerror}") from None

    def targets(hosts, operator):
        digest = _publish_version(etcd, keys, text, args.file, args.reason, operator)
        return {h: digest for h in hosts}, digest

    return _new_rollout(args, etcd, keys, "rollout", targets)


def cmd_rollback(args, etcd, keys) -> int:
    def targets(hosts, operator):
        if args.to:
            digest = resolve_version(etcd, keys, args.to)
            return {h: digest for h in hosts}, digest
        last = current_rollout(etcd, keys)
        if last is None:
            raise FleetError("no rollout recorded to roll back from: use --to V")
        prev = {h: d for h, d in last.get("previous", {}).items() if d and h in hosts}
        if not prev:
            raise FleetError(f"rollout {last['id']} recorded no earlier version of any live selected host: use --to V")
        return prev, ""

    return _new_rollout(args, etcd, keys, "rollback", targets)


def cmd_resume(args, etcd, keys) -> int:
    rec = current_rollout(etcd, keys)
    if rec is None:
        raise FleetError(f"fleet {keys.fleet} has no rollout to resume")
    if rec["phase"] in FINAL:
        _progress(f"rollout {rec['id']} is already {rec['phase']}: nothing to resume")
        return _finish(args, rec)
    _progress(f"resuming rollout {rec['id']} ({rec['phase']}, wave {rec['wave'] + 1}/{len(rec['waves'])})")
    driver = _driver(args, etcd, keys)
    return _run(args, etcd, keys, driver, rec)


def cmd_status(args, etcd, keys) -> int:
    rows = hosts(etcd, keys)
    cur = current_rollout(etcd, keys)
    if _json(args):
        print(json.dumps({"fleet": keys.fleet, "hosts": rows, "rollout": summary(cur) if cur else None},
                         indent=1, sort_keys=True))  # fmt: skip
        return EXIT_OK
    print(f"fleet {keys.fleet}: {sum(r['alive'] for r in rows)} live host(s)")
    fmt = "{:<16} {:<24} {:>7} {:>7} {:<12} {:>6}  {}"
    print(fmt.format("HOST", "LABELS", "ACTIVE", "SHADOW", "STATE", "HB AGE", "DRIFT / LAST"))
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))
        d = r["drift"]
        note = (f"runs {d['active_digest'][:10]} ({(d.get('change') or {}).get('author', '?')}), fleet asked "
                f"{d['desired_digest'][:10]}") if d else (r["message"].splitlines()[0][:60] if r["message"] else "")  # fmt: skip
        age = "-" if r["heartbeat_age"] is None else f"{r['heartbeat_age']:.0f}s"
        print(fmt.format(r["host"][:16], labels[:24], r["active_version"] or "-", r["shadow_version"] or "-",
                         r["state"], age, note))  # fmt: skip
    if cur:
        print(f"rollout {cur['id']}: {cur['phase']}, wave {min(cur['wave'] + 1, len(cur['waves']))}/"
              f"{len(cur['waves'])}, by {cur['operator']}: {cur['reason']}" + (f"; cause: {cur['cause']}" if cur.get("cause") else ""))  # fmt: skip
    return EXIT_OK


def cmd_history(args, etcd, keys) -> int:
    recs = rollouts(etcd, keys, args.limit)
    if _json(args):
        print(json.dumps({"fleet": keys.fleet, "rollouts": [summary(r) for r in recs]}, indent=1, sort_keys=True))
        return EXIT_OK
    fmt = "{:<21} {:<8} {:<10} {:<12} {:<10} {}"
    print(fmt.format("ROLLOUT", "KIND", "PHASE", "VERSION", "WAVES", "OPERATOR: REASON"))
    for r in recs:
        waves = "/".join(str(len(w)) for w in r.get("waves", []))
        print(fmt.format(r["id"], r.get("kind", ""), r["phase"], (r.get("candidate") or "per-host")[:12], waves,
                         f"{r['operator']}: {r['reason']}" + (f" [{r['cause'][:80]}]" if r.get("cause") else "")))  # fmt: skip
    return EXIT_OK


def cmd_exporter(args, etcd, keys) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise FleetError(f"--listen must be HOST:PORT, got {args.listen!r}")
    try:
        srv = serve(etcd, keys, host.strip("[]"), int(port))
    except OSError as e:
        raise FleetError(f"cannot listen on {args.listen}: {e.strerror}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _progress(f"fleet {keys.fleet}: metrics on http://{args.listen}/metrics")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    srv.shutdown()
    return EXIT_OK


VERBS = {"exporter": cmd_exporter, "rollout": cmd_rollout, "resume": cmd_resume, "rollback": cmd_rollback, "status": cmd_status,
         "history": cmd_history}  # fmt: skip
