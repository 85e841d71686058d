"""Reading the maps: the selection and what each slot holds, counters
(global per reason, per rule, shadow), the per-source LRU, raw trie and
port-table contents, and a digest of everything for "nothing changed"
checks. Nothing here writes a map."""

from __future__ import annotations

import ctypes
import hashlib
import time
from dataclasses import dataclass, fields, make_dataclass

import numpy as np

from tidegate.kernel import bpfsys
from tidegate.kernel.layout import (
    DROP_REASONS,
    KIND_SOURCE,
    LRU_FAILS,
    LRU_INSERTS,
    MAP_NAMES,
    PORT_ENTRIES,
    REASONS,
    RULE_IDX,
    SLOTS,
    halves_to_address,
    tg_shadow,
    tg_src,
    tg_state_key,
)
from tidegate.kernel.pinned_maps import PinnedMap

Tables = dict[str, PinnedMap]


# RuleCounters / ShadowCounters field <- tg_rule_count field (bpf/layout.h): the one list of per-rule counters
RULE_COUNT_FIELDS = (("pass_packets", "pass_pkts"), ("pass_bytes", "pass_bytes"), ("drop_packets", "drop_pkts"),
                     ("drop_bytes", "drop_bytes"), ("drop_rate", "drop_rate"), ("drop_prefix", "drop_prefix"),
                     ("drop_blocked", "drop_blocked"), ("drop_deny", "drop_deny"))  # fmt: skip
# would_drop_new: would drop where the active set passed
SHADOW_COUNT_FIELDS = (("packets", "shadow_pkts"), ("would_drop", "shadow_drop"), ("would_drop_new", "shadow_new_drop"),
                       ("would_drop_bytes", "shadow_bytes_drop"))  # fmt: skip
# a rule's counters summed over CPUs (and over the sets it was in); every field an int, from 0
RuleCounters = make_dataclass("RuleCounters", [(mine, int, 0) for mine, _ in RULE_COUNT_FIELDS])
ShadowCounters = make_dataclass("ShadowCounters", [(mine, int, 0) for mine, _ in SHADOW_COUNT_FIELDS])


@dataclass
class Counters:
    reasons: dict[str, tuple[int, int]]  # reason -> (packets, bytes)
    rules: dict[str, RuleCounters]
    shadow: dict[str, ShadowCounters]
    lru_inserts: int
    lru_insert_failures: int

    @property
    def packets(self) -> int:
        return sum(p for p, _ in self.reasons.values())

    @property
    def dropped(self) -> int:
        return sum(self.reasons[r][0] for r in DROP_REASONS)


@dataclass
class SlotInfo:
    slot: int
    version: int
    epoch: int


@dataclass
class FilterState:
    interface: str | None
    attached: bool
    mode: str | None
    prog_id: int | None
    active: SlotInfo | None
    shadow: SlotInfo | None
    pin_dir: str


@dataclass
class SourceTable:
    """A snapshot of the per-source LRU as numpy arrays (one row an entry)."""

    addr_hi: object
    addr_lo: object
    epoch: object
    rule: object
    kind: object
    tokens: object
    last_ns: object
    blocked_until: object
    packets: object
    bytes: object
    drops: object
    new_drops: object
    first_ns: object
    taken_ns: int = 0
    count: int = 0  # rows
    entries: int = 0  # LRU entries read (rows also hold shadow state kept in active entries)

    def address(self, i: int) -> str:
        return str(halves_to_address(int(self.addr_hi[i]), int(self.addr_lo[i])))


_STATE_KEY = np.dtype(tg_state_key)
_SOURCE = np.dtype(tg_src)
_SHADOW = np.dtype(tg_shadow)


def selection(tables: Tables) -> tuple[int, int]:
    """(active slot, shadow slot) as the program reads them."""
    ctl = tables["tg_ctl"]
    sel = ctl[ctl.Key(0)].sel
    return sel & 0xFF, (sel >> 8) & 0xFF


def slot_info(tables: Tables, slot: int) -> SlotInfo | None:
    if slot >= SLOTS:
        return None
    t = tables["tg_sets"]
    cfg = t[t.Key(slot)]
    return SlotInfo(slot, int(cfg.version), int(cfg.epoch))


def add_rule_counts(rc: RuleCounters, sc: ShadowCounters, percpu_vals) -> None:
    """Add one rule's per-CPU tg_rule_count values to its totals."""
    for v in percpu_vals:
        for totals, fields in ((rc, RULE_COUNT_FIELDS), (sc, SHADOW_COUNT_FIELDS)):
            for mine, kernel in fields:
                setattr(totals, mine, getattr(totals, mine) + getattr(v, kernel))


def read_counters(tables: Tables, names: dict[int, dict[int, str]], retired: dict[str, RuleCounters]) -> Counters:
    """The counters by reason and by rule name. names: slot -> rule index ->
    name of the sets in the slots; retired: the totals of sets no longer in
    a slot, added to the rule of the same name."""
    stats = tables["tg_stats"]
    reasons = {}
    for i, name in enumerate(REASONS):
        vals = stats.getvalue(stats.Key(i))
        reasons[name] = (sum(v.packets for v in vals), sum(v.bytes for v in vals))
    rules = {k: RuleCounters(**v.__dict__) for k, v in retired.items()}
    shadow: dict[str, ShadowCounters] = {}
    rs = tables["tg_rule_stats"]
    _, shadow_slot = selection(tables)
    for slot in range(SLOTS):
        for idx, name in names.get(slot, {}).items():
            vals = rs.getvalue(rs.Key(slot * RULE_IDX + idx))
            rc = rules.setdefault(name, RuleCounters())
            sc = ShadowCounters()
            add_rule_counts(rc, sc, vals)
            if slot == shadow_slot:
                shadow[name] = sc
    lru = tables["tg_lru"]
    inserts = sum(lru.getvalue(lru.Key(LRU_INSERTS)))
    fails = sum(lru.getvalue(lru.Key(LRU_FAILS)))
    return Counters(reasons, rules, shadow, int(inserts), int(fails))


def read_sources(tables: Tables, max_entries: int, columns: tuple[str, ...] | None = None) -> SourceTable:
    """Snapshot the per-source LRU with one batched read (at most max_entries
    entries). `columns`: only these SourceTable fields (the others are None).
    Read chunk by chunk, so the snapshot never holds the entries' other
    fields.

    A shadow set's state kept in the active set's entry for a source or a
    prefix (bpf/layout.h struct tg_shadow) comes as a row of its own, keyed
    by the shadow set's epoch, as an entry of its own would: readers see the
    shadow state alike wherever the program keeps it. Only the active set's
    entries hold it: after an apply, the new active set's entries hold the
    shadow's state afresh; a shadow set since promoted keeps its state in
    entries of its own. Where an entry of the shadow set's own, left from an
    earlier active set, has the same key as such a row, the row wins."""
    names = tuple(dict.fromkeys((*(columns or SOURCE_COLUMNS), *KEY_COLUMNS)))
    active = slot_info(tables, selection(tables)[0])
    host = active.epoch if active is not None else 0  # no set has epoch 0
    # an array a column, filled as the chunks come (pages past the count are never touched)
    out = {name: np.empty(max(1, 2 * max_entries), _column_type(name)) for name in names}
    made = np.zeros(max(1, 2 * max_entries), bool)  # rows of shadow state
    count = entries = 0
    fd = tables["tg_state"].map_fd
    for kb, vb, n in bpfsys.lookup_batch_chunks(fd, _STATE_KEY.itemsize, _SOURCE.itemsize, max_entries):
        keys, vals = kb.view(_STATE_KEY)[:n], vb.view(_SOURCE)[:n]
        held = np.flatnonzero((keys["epoch"] == host) & (vals["sh_epoch"] != 0))
        for name in names:
            out[name][count:count + n] = keys[name] if name in _STATE_KEY.names else vals[name]
            out[name][count + n:count + n + len(held)] = _shadow_column(keys, vals, name, held)
        made[count + n:count + n + len(held)] = True
        count += n + len(held)
        entries += n
    rows = {name: col[:count] for name, col in out.items()}
    stale = _stale_own_entries(rows, made[:count])
    if stale is not None:
        rows = {name: col[~stale] for name, col in rows.items()}
    given = {name: rows[name] if columns is None or name in columns else None for name in SOURCE_COLUMNS}
    return SourceTable(**given, taken_ns=time.monotonic_ns(), count=len(rows["epoch"]), entries=entries)


SOURCE_COLUMNS = tuple(f.name for f in fields(SourceTable) if f.name not in ("taken_ns", "count", "entries"))
KEY_COLUMNS = ("addr_hi", "addr_lo", "epoch", "rule", "kind")


def _stale_own_entries(rows: dict[str, np.ndarray], made: np.ndarray) -> np.ndarray | None:
    """Rows of entries keyed by a shadow epoch with the same key as a row of
    shadow state (an earlier active set had the shadow keep its own), as a
    mask; None when there are none."""
    if not made.any():
        return None
    epoch = rows["epoch"]
    own = ~made & np.isin(epoch, np.unique(epoch[made]))
    if not own.any():
        return None
    idx = np.flatnonzero(made | own)
    cols = [rows[c][idx] for c in ("kind", "rule", "epoch", "addr_lo", "addr_hi")]
    order = np.lexsort(cols)
    srt = [c[order] for c in cols]
    same = np.logical_and.reduce([c[1:] == c[:-1] for c in srt])
    pairs = np.concatenate([idx[order][1:][same], idx[order][:-1][same]])
    stale = np.zeros(len(made), bool)
    stale[pairs[~made[pairs]]] = True
    return stale


def _column_type(name: str) -> np.dtype:
    return (_STATE_KEY if name in _STATE_KEY.names else _SOURCE).fields[name][0]


def _shadow_column(keys: np.ndarray, vals: np.ndarray, name: str, held: np.ndarray) -> np.ndarray:
    """One column of the shadow rows of the entries `held`."""
    if name == "epoch":
        return vals["sh_epoch"][held]
    if name in ("addr_hi", "addr_lo", "rule", "kind"):
        return keys[name][held]
    if name == "blocked_until":  # in a prefix entry it holds the loans: a prefix never blocks
        col = vals["sh"][name][held]
        col[keys["kind"][held] != KIND_SOURCE] = 0
        return col
    if name in _SHADOW.names:
        return vals["sh"][name][held]
    return np.zeros(len(held), _column_type(name))  # bytes: the shadow state does not count them


def read_trie(table: PinnedMap, max_entries: int) -> tuple[list[bytes], list[bytes], int]:
    """A trie's raw keys and values, one batched read."""
    ksz, vsz = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    keys, values, n = bpfsys.lookup_batch(table.map_fd, ksz, vsz, max_entries)
    kb, vb = keys.tobytes(), values.tobytes()
    return [kb[i * ksz:(i + 1) * ksz] for i in range(n)], [vb[i * vsz:(i + 1) * vsz] for i in range(n)], n


def read_ports(tables: Tables) -> np.ndarray:
    """The whole port table (all slots) as u64 masks, one batched read."""
    _, values, n = bpfsys.lookup_batch(tables["tg_ports"].map_fd, 4, 8, PORT_ENTRIES)
    return values.view("<u8")[:n]


def map_digest(tables: Tables, max_cidrs: int, include_state: bool = True) -> str:
    """sha256 over every map's content, for 'nothing changed' checks."""
    h = hashlib.sha256()
    for name in MAP_NAMES:
        if name == "tg_state" and not include_state:
            continue
        h.update(name.encode())
        if name == "tg_ports":
            h.update(read_ports(tables).tobytes())  # 393,216 entries: one batched read, not a Python loop
            continue
        if name in ("tg_cidrs4", "tg_cidrs6"):
            keys, values, _ = read_trie(tables[name], max_cidrs)
            items = sorted(zip(keys, values))
        else:
            items = sorted((bytes(k), bytes(v)) for k, v in tables[name].items())
        for kb, vb in items:
            h.update(kb)
            h.update(vb)
    return h.hexdigest()
