"""Safe change: blast-radius estimates, the guard that rolls back by
itself, and the counter history they and the post-deployment reviews
(review.py) read.

The estimate asks "what would this rule set drop that the active one
passes?" of the traffic the agent actually saw: per-source rates from the
sampler's recent window (default 5 min), each source classified by the
candidate set the way the XDP program would (kernel.entries.Classifier) and
given the candidate's steady-state rate (token buckets pass at most `pps`
in the long run; bursts are ignored, so the estimate errs towards
refusing). Prefix limits are applied to the sum of a prefix's sources.
The traffic's protocol and port are taken from the active rule that
matched it (a representative of its protocol and first port); traffic on
the default rule is classified without a port.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from tidegate.kernel.entries import Classifier, build_kernel_rule_set
from tidegate.kernel.layout import (
    ACT_DROP,
    ACT_PASS,
    DROP_REASONS,
    RULE_ALLOWLIST,
    RULE_DEFAULT,
    RULE_DENYLIST,
)
from tidegate.observation.window import DroppedSince, SourceWindow

log = logging.getLogger("tidegate.safety.estimate")

PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "any": None}


@dataclass
class RuleEstimate:
    rule: str
    sources_newly_dropped: int = 0
    newly_dropped_pps: float = 0.0


@dataclass
class Estimate:
    window_seconds: float = 0.0
    sources_seen: int = 0
    sources_newly_dropped: int = 0
    packets_per_second: float = 0.0
    newly_dropped_pps: float = 0.0
    packet_share: float = 0.0
    source_share: float = 0.0
    within_budget: bool = True
    packet_budget: float = 0.01
    source_budget: float = 0.05
    rules: list[RuleEstimate] = field(default_factory=list)
    top_affected: list[dict] = field(default_factory=list)
    summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _representative(rule) -> tuple[int | None, int | None]:
    if rule is None:
        return None, None
    proto = PROTO.get(rule.protocol)
    if proto is None and rule.dst_ports:
        proto = 6
    port = rule.dst_ports[0].lo if rule.dst_ports else None
    return proto, port


def _mask_key(address: str, v4: int, v6: int) -> str:
    a = ipaddress.ip_address(address)
    return str(ipaddress.ip_network(f"{a}/{v4 if a.version == 4 else v6}", strict=False))


def estimate(agent, candidate, rates=None) -> Estimate:
    """`rates`: per-source rates to estimate against (a subset of the
    sampler's window, e.g. only known sources); the whole window if None."""
    opts = agent.options
    est = Estimate(packet_budget=opts.packet_budget, source_budget=opts.source_budget)
    st = agent.kf.state()
    if st.active is None:
        est.summary = "no active rule set: nothing to compare against"
        return est
    active = agent.rule_set_of(st.active.version)
    # every epoch in the window: an apply a moment ago must not blind the check
    if rates is None:
        rates = agent.sampler.window_rates(opts.estimate_window, kind=0)
    est.window_seconds = rates.seconds
    krs = build_kernel_rule_set(candidate)
    cls = Classifier(krs)
    d = candidate.defaults

    # Work in packets over the window, not summed per-source rates: a
    # sparse source (one packet in the window) has no meaningful rate, but
    # its packets count exactly. Per source: P packets, of which the active
    # set passed P - D; the candidate passes a fraction f of them, from its
    # per-source limit against the source's rate (P / seen) and then its
    # prefix limit against the prefix's total rate.
    per_key: dict[str, list] = {}
    for addr, name, pk, dr, seen in zip(rates.addresses, rates.rules, rates.packets, rates.drops, rates.seen):
        rule = active.rule(name)
        proto, port = _representative(rule)
        cidx = cls.classify(addr, proto, port)
        ckey = _mask_key(addr, d.ipv4_prefix, d.ipv6_prefix)
        row = per_key.setdefault(f"{ckey}|{cidx}", [ckey, cidx, 0.0, 0.0, [], 0.0])
        row[2] += float(pk)
        row[3] += float(pk - dr)
        row[4].append(addr)
        row[5] = max(row[5], float(seen))

    prefix_groups: dict[str, list] = {}
    frac: dict[str, float] = {}
    for k, (ckey, cidx, packets, passing, _addrs, seen) in per_key.items():
        params = krs.rules.get(cidx)
        rate = packets / seen if seen else 0.0
        if cidx == RULE_DENYLIST or (params and params.action == ACT_DROP):
            f = 0.0
        elif cidx == RULE_ALLOWLIST or params is None or params.action == ACT_PASS or not params.src.rate:
            f = 1.0
        else:
            f = min(1.0, float(params.src.rate) / rate) if rate else 1.0
        frac[k] = f
        if params and params.pfx.rate:
            crule = candidate.rule(krs.rule_names.get(cidx, "")) if cidx < 64 else None
            pfx = crule.prefix_limit if crule else d.prefix_limit
            if pfx:
                a = ipaddress.ip_network(ckey).network_address
                pk_ = _mask_key(str(a), pfx.ipv4_prefix, pfx.ipv6_prefix)
                prefix_groups.setdefault(f"{pk_}|{cidx}", [float(params.pfx.rate), []])[1].append(k)
    for _, (limit, keys) in prefix_groups.items():
        seen = max(per_key[k][5] for k in keys)
        total_rate = sum(per_key[k][2] * frac[k] for k in keys) / seen if seen else 0.0
        if total_rate > limit:
            for k in keys:
                frac[k] *= limit / total_rate

    by_rule: dict[str, RuleEstimate] = {}
    affected = []
    passing_total = 0.0
    lost_total = 0.0
    newly: dict[str, float] = {}
    span = max(rates.seconds, 1e-9)
    for k, (ckey, cidx, packets, passing, addrs, seen) in per_key.items():
        passing_total += passing
        lost = max(0.0, passing - packets * frac[k])
        if lost > max(0.01 * passing, 0.5):
            name = krs.rule_names.get(cidx, f"rule{cidx}")
            newly[k] = lost
            lost_total += lost
            re = by_rule.setdefault(name, RuleEstimate(name))
            re.sources_newly_dropped += len(addrs)
            re.newly_dropped_pps += lost / span
            affected.append({"address": ckey, "rule": name, "pps": packets / seen if seen else 0.0,
                             "drop_pps": lost / seen if seen else 0.0})  # fmt: skip
    est.sources_seen = len(rates.addresses)
    est.sources_newly_dropped = sum(len(per_key[k][4]) for k in newly)
    est.packets_per_second = passing_total / span
    est.newly_dropped_pps = lost_total / span
    est.packet_share = lost_total / passing_total if passing_total else 0.0
    est.source_share = est.sources_newly_dropped / est.sources_seen if est.sources_seen else 0.0
    est.within_budget = est.packet_share <= est.packet_budget and est.source_share <= est.source_budget
    est.rules = sorted(by_rule.values(), key=lambda r: -r.newly_dropped_pps)
    est.top_affected = sorted(affected, key=lambda a: -a["drop_pps"])[:10]
    if not est.sources_seen:
        est.summary = "no per-source traffic observed in the window yet: nothing to estimate"
    else:
        est.summary = (
            f"would newly drop {est.packet_share:.1%} of passing packets ({est.newly_dropped_pps:.0f} of "
            f"{est.packets_per_second:.0f} pps) and {est.source_share:.1%} of sources ({est.sources_newly_dropped} of "
            f"{est.sources_seen}) seen over the last {est.window_seconds:.0f} s"
        )
    return est


def check(agent, candidate, est: Estimate | None) -> list[str]:
    """Problems that refuse an apply unless forced."""
    problems = []
    if est is not None and not agent.options.no_blast_check and not est.within_budget:
        problems.append(
            f"{est.summary} (budget: {est.packet_budget:.1%} of packets, {est.source_budget:.1%} of sources)"
        )
    if candidate.canaries:
        cls = Classifier(build_kernel_rule_set(candidate))
        krs = cls.krs
        for net in candidate.canaries:
            idx = cls.classify(str(net.network_address))
            params = krs.rules.get(idx)
            if idx == RULE_DENYLIST:
                problems.append(f"canary {net} is on the deny list")
            elif params is not None and params.action == ACT_DROP:
                problems.append(f"canary {net} matches rule {krs.rule_names.get(idx)!r} with action drop")
    return problems


# ------------------------------------------------------------------ history
class CounterHistory:
    """Global counters every second (8 per-CPU reads): the guard's baseline
    and the post-deployment review read it. Bounded: one entry a second for
    the review period plus a little."""

    def __init__(self, kf, keep_seconds: float = 3900.0, step: float = 1.0):
        self.kf = kf
        self.step = step
        self._ring: deque[tuple[float, dict]] = deque(maxlen=int(keep_seconds / step) + 10)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="counter-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.take()
            except Exception:
                pass
            self._stop.wait(self.step)

    def take(self) -> tuple[float, dict]:
        c = self.kf.counters()
        snap = {r: p for r, (p, _) in c.reasons.items()}
        snap["_rules"] = {n: (rc.pass_packets, rc.drop_packets) for n, rc in c.rules.items()}
        item = (time.monotonic(), snap)
        with self._lock:
            self._ring.append(item)
        return item

    def between(self, t0: float, t1: float) -> dict | None:
        """Counter deltas between the samples nearest to t0 and t1."""
        with self._lock:
            items = list(self._ring)
        if len(items) < 2:
            return None
        a = min(items, key=lambda it: abs(it[0] - t0))
        b = min(items, key=lambda it: abs(it[0] - t1))
        if b[0] <= a[0]:
            return None
        out = {k: b[1][k] - a[1].get(k, 0) for k in b[1] if k != "_rules"}
        out["_seconds"] = b[0] - a[0]
        rules = {}
        for n, (p, dr) in b[1]["_rules"].items():
            p0, d0 = a[1]["_rules"].get(n, (0, 0))
            rules[n] = (p - p0, dr - d0)
        out["_rules"] = rules
        return out




def drop_share(delta: dict | None) -> tuple[float, int]:
    if not delta:
        return 0.0, 0
    total = sum(v for k, v in delta.items() if not k.startswith("_"))
    drops = sum(delta.get(r, 0) for r in DROP_REASONS)
    return (drops / total if total else 0.0), total


# -------------------------------------------------------------------- guard
class Guard:
    """Watches a freshly applied version and rolls back when legitimate
    traffic suffers: the drop share rises past the pre-apply baseline, many
    more distinct sources are dropped than before, or a canary is dropped."""

    def __init__(self, agent, version: int, seconds: int, caller):
        self.agent = agent
        self.version = version
        self.seconds = seconds
        self.caller = caller
        self.watching = False
        self.outcome = "watching"
        self.cause = ""
        self.rolled_back_to = 0
        self._done = threading.Event()
        self._cancel = threading.Event()
        self.started = time.monotonic()
        hist = agent.history
        self.baseline_share, self.baseline_packets = drop_share(hist.between(self.started - 30, self.started))
        self.baseline_sources = self._dropped_sources_before()
        self.dropped = DroppedSince(self.started, agent.rule_set_of(version).canaries)

    def _dropped_sources_before(self) -> int:
        return len(SourceWindow.of(self.agent.sampler, 60).dropped_sources())

    def start(self) -> None:
        self.watching = True
        threading.Thread(target=self._run, name=f"guard-{self.version}", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        self._cancel.set()

    def _sources_cause(self, epoch: int) -> tuple[str, str] | None:
        """(kind, cause) when a canary or too many distinct sources were
        dropped since the change, as the sampler's intervals show it."""
        dropped = self.dropped.fold(self.agent.sampler.intervals_since(self.dropped.t), epoch)
        if dropped.network:
            return "canary", f"canary {dropped.network} was dropped"
        if len(dropped) - self.baseline_sources > self.agent.options.guard_dropped_sources:
            return "dropped-sources", (f"{len(dropped)} distinct sources dropped vs {self.baseline_sources} before "
                                       f"(limit +{self.agent.options.guard_dropped_sources})")  # fmt: skip
        return None

    def _covered(self, t: float) -> bool:
        """The sampler has an interval that ends at `t` or later."""
        ivs = self.agent.sampler.intervals_since(t)
        return bool(ivs) and ivs[-1].t1 >= t

    def _run(self) -> None:
        opts = self.agent.options
        deadline = self.started + self.seconds
        try:
            while time.monotonic() < deadline and not self._cancel.is_set():
                time.sleep(1.0)
                now = time.monotonic()
                if self.agent.kf.active_version() != self.version:
                    self.outcome = "superseded"
                    return
                cause = None
                share, packets = drop_share(self.agent.history.between(max(self.started, now - 5), now))
                if packets >= 50 and share - self.baseline_share > opts.guard_drop_increase:
                    cause = (f"drop share {share:.1%} vs {self.baseline_share:.1%} before the change "
                             f"(limit +{opts.guard_drop_increase:.0%})")  # fmt: skip
                found = self._sources_cause(self.agent.kf.state().active.epoch)
                kind = "drop-share"
                if found and (found[0] == "canary" or not cause):
                    kind, cause = found
                if cause:
                    self._roll_back(kind, cause)
                    return
            # drops late in the watch reach the sampler up to one sample later: wait for the sample
            # that covers the deadline (two sample intervals at most, in case the sampler stalls)
            wait = deadline + 2 * self.agent.sampler.interval + 2
            while not self._cancel.is_set() and time.monotonic() < wait and not self._covered(deadline):
                time.sleep(1.0)
                if self.agent.kf.active_version() != self.version:
                    self.outcome = "superseded"
                    return
                found = self._sources_cause(self.agent.kf.state().active.epoch)
                if found:
                    self._roll_back(*found)
                    return
            self.outcome = "kept" if not self._cancel.is_set() else "cancelled"
            self.agent.store.audit("guard", "ok", "guard", "agent", f"kept after {self.seconds}s", self.version)
        except Exception as e:  # never leave the guard silently dead
            log.exception("guard failed")
            self.outcome = "error"
            self.cause = str(e)
        finally:
            self.watching = False
            self._done.set()

    def _roll_back(self, kind: str, cause: str) -> None:
        from tidegate.daemon.agent import Caller, OperationError

        log.warning("guard rolling back", extra={"version": self.version, "cause": cause})
        try:
            out = self.agent.rollback(None, f"guard: {cause}", Caller("guard", f"agent (after {self.caller.author})"),
                                      cause=f"guard-{kind}")  # fmt: skip
            self.rolled_back_to = out.version
            self.outcome = "rolled-back"
            self.cause = cause
            self.agent.store.audit("guard-rollback", "rolled-back", "guard", "agent",
                                   f"{cause}; rolled back to {out.version}", self.version)  # fmt: skip
            self.agent.reviews.guard_fired(self.version)
        except OperationError as e:
            self.outcome = "error"
            self.cause = f"{cause}; rollback failed: {e.message}"


def review(agent, version: int) -> dict:
    """Before/after comparison for a version over its first hour (or less);
    recorded by the agent itself (review.Reviews)."""
    return agent.reviews.get(version)


def _summary(delta: dict | None) -> dict | None:
    if not delta:
        return None
    secs = delta["_seconds"]
    share, total = drop_share(delta)
    return {
        "seconds": round(secs, 1),
        "pps": round(total / secs, 2) if secs else 0,
        "drop_share": round(share, 4),
        "by_reason_pps": {k: round(v / secs, 2) for k, v in delta.items() if not k.startswith("_") and secs},
        "by_rule_pps": {n: {"pass": round(p / secs, 2), "drop": round(d / secs, 2)}
                        for n, (p, d) in delta["_rules"].items() if p or d},  # fmt: skip
    }
