"""The fleet's key layout in etcd and the records stored there.

Everything of one fleet lives under /tidegate/<fleet>/:

    versions/<digest>   rule set YAML + who/why/when; written once (create-only), never changed
    desired/<host>      what the host should run: active and/or shadow digest, the rollout,
                        guard seconds, force/revert; written by the driver, read by the host
    status/<host>       the host's report, bound to its lease: labels, agent version, active
                        and shadow version + digest, guard, last result (ACK / NACK /
                        ROLLED_BACK with numbers), shadow would-drops, drift, heartbeat
    rollouts/<id>       one rollout: plan (waves of hosts), targets, phase, current wave,
                        operator and reason, events with times, the cause when it halted
    rollout             the id of the newest rollout (what `fleet resume` continues)
    driver              the driver lock: held on a lease by the one process driving

Pure data and arithmetic; no I/O.
"""

from __future__ import annotations

import json
import re
import secrets
import time

ROOT = "/tidegate"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

ACK, NACK, ROLLED_BACK = "ACK", "NACK", "ROLLED_BACK"

# rollout phases; the last four are final
SHADOW, WAVE, HALTING = "shadow", "wave", "halting"
COMPLETED, HALTED, REFUSED, FAILED = "completed", "halted", "refused", "failed"
FINAL = (COMPLETED, HALTED, REFUSED, FAILED)


class FleetError(Exception):
    """Bad fleet input (a name, a selector, a wave plan): one line for the operator."""


def check_name(what: str, value: str) -> str:
    if not _NAME.match(value or ""):
        raise FleetError(f"{what} {value!r} must be 1-63 letters, digits, '.', '_' or '-' (starting alnum)")
    return value


class Keys:
    """The keys of one fleet: the prefixes of each kind (a watch or a range read takes a prefix),
    and one key of a kind by its name."""

    def __init__(self, fleet: str):
        self.fleet = check_name("fleet name", fleet)
        self.prefix = p = f"{ROOT}/{fleet}/"
        self.versions, self.desired_prefix, self.status_prefix = f"{p}versions/", f"{p}desired/", f"{p}status/"
        self.rollouts = f"{p}rollouts/"
        self.current = f"{p}rollout"  # the id of the newest rollout
        self.driver = f"{p}driver"  # the driver lock

    def version(self, digest: str) -> str:
        return self.versions + digest

    def desired(self, host: str) -> str:
        return self.desired_prefix + host

    def status(self, host: str) -> str:
        return self.status_prefix + host

    def rollout(self, rid: str) -> str:
        return self.rollouts + rid


def encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes | str) -> dict:
    return json.loads(raw)


def new_rollout_id() -> str:
    """Sorts by start time: 20260101T120000-1a2b."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def parse_labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise FleetError(f"label {item!r} must be KEY=VALUE")
        check_name("label key", k)
        out[k] = v
    return out


def matches(labels: dict, selector: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def parse_waves(spec: str, hosts: int) -> list[int]:
    """Cumulative wave sizes: "1,10%,50%,100%" over 40 hosts -> [1, 4, 20, 40].

    Each item is a host count or a percentage of the selected hosts, and says
    how many hosts run the candidate once that wave is done; `rest` means all.
    Waves that would add no host are dropped; the last wave always takes all."""
    if hosts <= 0:
        return []
    out: list[int] = []
    for raw in spec.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        try:
            if item in ("rest", "all"):
                n = hosts
            elif item.endswith("%"):
                pct = float(item[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                n = max(1, -(-int(pct * hosts) // 100)) if pct < 100 else hosts  # ceiling
            else:
                n = int(item)
                if n <= 0:
                    raise ValueError
        except ValueError:
            raise FleetError(f"--waves item {raw!r}: use a host count (3), a percentage (10%) or 'rest'") from None
        n = min(n, hosts)
        if out and n < out[-1]:
            raise FleetError(f"--waves {spec!r}: waves are cumulative and must not shrink ({raw.strip()})")
        if not out or n > out[-1]:
            out.append(n)
    if not out or out[-1] != hosts:
        out.append(hosts)
    return out


def plan_waves(hosts: list[str], spec: str) -> list[list[str]]:
    """Hosts (sorted by id, so a plan is reproducible) cut into waves."""
    hosts = sorted(hosts)
    cuts = parse_waves(spec, len(hosts))
    waves, start = [], 0
    for c in cuts:
        waves.append(hosts[start:c])
        start = c
    return waves
