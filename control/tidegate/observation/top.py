"""Per-source answers over the sampler's intervals (observation/window.py):
the top sources of the active (or shadow) set, and the sources a shadow set
would newly drop.

Plain data out (dicts); the gRPC adapter turns them into messages."""

from __future__ import annotations

import time

from tidegate.operation import OperationError
from tidegate.observation.window import SourceWindow

TOP_WINDOW_ROWS = 2_000_000  # per-source rows one windowed TopSources call may sum (~1 s of CPU)


def top_sources(kf, sampler, n: int, by: str, shadow: bool = False,
                window: float = 0.0) -> tuple[list[dict], float, int]:  # fmt: skip
    """Top sources of the active (or shadow) set by packets or drops, the
    seconds they cover and how many of the intervals covered were folded
    (observation/fold.py: their sources under 1 pps are not in the sums).

    window 0: the sampler's last interval; otherwise the intervals of the
    last `window` seconds, summed per source and rule (entries of the set
    loaded now: a source's counts under an earlier version are not
    included). Work is bounded by TOP_WINDOW_ROWS rows of the sampler's
    ring (fewer intervals when sources are many), never the LRU."""
    st = kf.state()
    info = st.shadow if shadow else st.active
    if info is None:
        if shadow:
            raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded")
        return [], 0.0, 0
    if window > 0:
        w = SourceWindow.of(sampler, window)
    else:
        w = SourceWindow([sampler.last_interval()])
    if not len(w):
        return [], 0.0, 0
    # bounded work: sum at most TOP_WINDOW_ROWS rows, newest intervals first; the
    # response's interval_seconds says what was covered
    top, order = w.top(max(1, min(n, 1000)), "drops" if by == "drops" else "packets", info.epoch, TOP_WINDOW_ROWS)
    seconds = top.seconds
    folded = sum(iv.folded is not None for iv in w.intervals[len(w) - top.intervals:]) if top.intervals else 0
    out = []
    now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    for i, address in zip(order, top.addresses(order)):
        out.append(
            {
                "address": address,
                "rule": kf.rule_name(info.slot, int(top.rule[i])),
                "packets": int(top.packets[i]),
                "drops": int(top.drops[i]),
                "pps": float(top.packets[i]) / seconds,
                "drop_pps": float(top.drops[i]) / seconds,
                "first_seen_seconds_ago": max(0.0, (now_ns - int(top.first_ns[i])) / 1e9),
            }
        )
    return out, seconds, folded


def shadow_report(kf, sampler, shadow_loaded_at: float | None, top: int) -> dict:
    """The shadow set since it was loaded: its counters per rule and the
    sources it would newly drop (per rule and overall, the top ones); the
    keys are the ShadowReportResponse's fields, a source's a SourceRate's."""
    st = kf.state()
    if st.shadow is None:
        raise OperationError("FAILED_PRECONDITION", "no shadow rule set is loaded (tidegate apply FILE --shadow)")
    c = kf.counters()
    loaded = (time.monotonic() - shadow_loaded_at) if shadow_loaded_at else 0.0
    packets = sum(s.packets for s in c.shadow.values())
    new = sum(s.would_drop_new for s in c.shadow.values())
    # sources: shadow entries that would newly drop, over the intervals since it was loaded
    since = loaded if loaded else None
    top = max(1, min(top, 100))  # per rule and overall: the response stays small under a flood
    rows = SourceWindow.of(sampler, since).select(epoch=st.shadow.epoch, would_drop=True).per_source_rule()
    ranked = rows.ranked("new_drops")
    affected = [dict(address=a, rule=kf.rule_name(st.shadow.slot, int(rows.rule[i])), packets=int(rows.packets[i]),
                     drops=int(rows.new_drops[i]))
                for i, a in zip(ranked, rows.addresses(ranked))]  # fmt: skip
    by_rule: dict[str, list] = {}
    for r in affected:
        by_rule.setdefault(r["rule"], []).append(r)
    rules = []
    for name, sc in sorted(c.shadow.items()):
        mine = by_rule.get(name, [])
        rules.append(dict(rule=name, packets=sc.packets, would_drop=sc.would_drop,
                          would_drop_new=sc.would_drop_new, sources=len(mine),
                          share=(sc.would_drop_new / packets) if packets else 0.0,
                          top_affected=mine[:top]))  # fmt: skip
    return dict(
        shadow_version=st.shadow.version, active_version=st.active.version if st.active else 0,
        loaded_seconds=loaded, packets=packets, would_drop_new=new, share=(new / packets) if packets else 0.0,
        rules=rules,
        top_affected=affected[:top],
    )  # fmt: skip
