"""What a fleet host reports beyond its versions: the shadow set's
would-drops (summed by the driver over the fleet) and drift (a local change
the fleet did not ask for). Read-only views of the agent."""

from __future__ import annotations

import time

from tidegate.observation.window import SourceWindow


def shadow_numbers(agent) -> dict | None:
    """The shadow set since it was loaded: packets it saw, packets it would
    newly drop (the active set passed them), and distinct sources seen and
    newly dropped, from the sampler's intervals (kind 0, the shadow's epoch)."""
    st = agent.kf.state()  # read-only: which epoch is the shadow's
    if st.shadow is None:
        return None
    c = agent.counters()
    packets = int(sum(s.packets for s in c.shadow.values()))
    new = int(sum(s.would_drop_new for s in c.shadow.values()))
    loaded = (time.monotonic() - agent.shadow_loaded_at) if agent.shadow_loaded_at else 0.0
    rows = SourceWindow.of(agent.sampler, loaded or None).select(epoch=st.shadow.epoch)
    seen, dropped = rows.source_count(), rows.take(rows.new_drops > 0).source_count()
    return {
        "version": st.shadow.version, "loaded_seconds": round(loaded, 1), "packets": packets,
        "would_drop_new": new, "packet_share": (new / packets) if packets else 0.0,
        "sources_seen": seen, "sources_would_drop": dropped,
        "source_share": (dropped / seen) if seen else 0.0,
    }  # fmt: skip


def drift(agent, desired: dict | None, active_digest: str) -> dict | None:
    """None when the host runs what the fleet last asked for (or the fleet
    never asked); otherwise what runs instead and the change that put it
    there (its author and reason come from the host's own store)."""
    want = (desired or {}).get("active")
    if not want or want == active_digest:
        return None
    rows = agent.store.activations(1)
    by = {}
    if rows:
        version, kind, when, author, reason = rows[0]
        by = {"version": version, "kind": kind, "time": when, "author": author, "reason": reason}
    return {"desired_digest": want, "active_digest": active_digest, "change": by}
