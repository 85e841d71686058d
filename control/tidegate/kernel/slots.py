"""Writing rule sets: the three rule-set slots and the selection word.

Rule-set slots (see bpf/tidegate.c): three copies of every rule-set map;
`sel` in tg_ctl names the active and the shadow slot. An apply writes the
free slot (one no packet reads), flips `sel`, and begins an RCU grace
period: the retired slot is idle once it has passed, and nothing rewrites
it before (grace.py).

The agent remembers which trie entries (with their values) and port-table
entries each slot holds (`SlotEntries`, learnt from the maps after
adoption), so rewriting a slot touches only what changes: entries the new
set does not have are deleted, entries it has with another value or not
at all are written, the others are left as they are. The slot is not
selected while this happens, so no packet sees the mix.

After an apply's swap, a retired slot holding many entries is trimmed on a
thread of its own (trim_slot): its entries the new active set does not
have are deleted then, not before the next apply's write, so the reply
does not wait for that half of a new set's kernel work.
"""

from __future__ import annotations

import array
from collections.abc import Mapping
from dataclasses import dataclass, field

from tidegate.kernel import bpfsys
from tidegate.kernel.entries import (
    KernelRuleSet,
    kernel_port_entries,
    same_matching,
    shadow_links,
    slot_trie_entries,
)
from tidegate.kernel.errors import KernelError, MapWriteError
from tidegate.kernel.grace import GracePeriods
from tidegate.kernel.layout import NO_SLOT, PORT_RANGE, RULE_IDX, SLOTS, STATE_LAYOUT
from tidegate.kernel.trie4 import Trie4
from tidegate.kernel.readers import (
    RuleCounters,
    ShadowCounters,
    Tables,
    add_rule_counts,
    read_ports,
    read_trie,
    selection,
)

TRIES = ((4, "tg_cidrs4"), (6, "tg_cidrs6"))  # family, map


@dataclass
class SlotEntries:
    cidrs: dict = field(default_factory=lambda: {4: {}, 6: {}})  # family -> {raw trie key: raw value}
    ports: set = field(default_factory=set)  # port-table indexes within the slot holding a mask
    # the kernel rule set (read-only, shared) whose trie entries `cidrs` are, exactly: None when not known
    # or trimmed since. Written again (the same rule set applied again), its entries are not worked out
    krs: KernelRuleSet | None = None


def index_slots(tables: Tables, max_cidrs: int) -> dict[int, SlotEntries]:
    """Which trie and port-table entries each slot holds, read from the maps."""
    out = {s: SlotEntries() for s in range(SLOTS)}
    for fam, name in TRIES:
        keys, values, n = read_trie(tables[name], max_cidrs)
        for i in range(n):
            slot = int.from_bytes(keys[i][4:8], "little")
            out.setdefault(slot, SlotEntries()).cidrs[fam][keys[i]] = values[i]
    for idx in read_ports(tables).nonzero()[0].tolist():
        out[idx // PORT_RANGE].ports.add(idx % PORT_RANGE)
    return out


def write_selection(tables: Tables, grace: GracePeriods, active: int, shadow: int) -> None:
    """Select the active and shadow slots in one word, then begin the grace
    period after which no packet still reads the old selection: a slot it
    retires is written only once that has passed (grace.wait())."""
    ctl = tables["tg_ctl"]
    leaf = ctl.Leaf()
    leaf.sel = (active & 0xFF) | ((shadow & 0xFF) << 8)
    leaf.state_layout = STATE_LAYOUT
    try:
        ctl[ctl.Key(0)] = leaf  # one word: the old selection or the new one
    except Exception as e:
        raise MapWriteError(f"switching the rule-set selection failed ({e}); it is unchanged") from e
    grace.begin()


def free_slot(tables: Tables) -> int:
    a, s = selection(tables)
    for slot in range(SLOTS):
        if slot not in (a, s):
            return slot
    raise KernelError("no free rule-set slot")  # cannot happen with 3 slots


def _next_epoch(tables: Tables) -> int:
    t = tables["tg_sets"]
    return max(int(t[t.Key(s)].epoch) for s in range(SLOTS)) + 1


def write_slot(tables: Tables, slot: int, krs: KernelRuleSet, version: int, old: SlotEntries) -> None:
    """Write a complete rule set into a slot no packet reads. `old` is what
    the slot holds; it is updated to what it holds afterwards as each map
    is written."""
    sets, rules, ports = tables["tg_sets"], tables["tg_rules"], tables["tg_ports"]

    # Batched writes: one bpf(2) call per few thousand entries instead of
    # one per entry (the difference between ~10 ms and ~100 ms at 10,000)
    for (fam, name), new in zip(TRIES, slot_trie_entries(krs, slot) if old.krs is not krs else (None, None)):
        if new is None:  # the slot holds this very rule set's entries
            continue
        fd = tables[name].map_fd
        held = old.cidrs[fam]
        if isinstance(new, Trie4) or isinstance(held, Trie4):  # IPv4 entries as arrays (trie4.py)
            new, held = Trie4.held(new), Trie4.held(held)
            if new.same(held):  # the same set again
                continue
            stale = held.without(new)
            if stale:
                bpfsys.delete_batch(fd, stale.key_bytes(), len(stale))
            changed = new.changed_from(held)  # what the slot holds already is not written again
            if changed:
                bpfsys.update_batch(fd, changed.key_bytes(), changed.value_bytes(), len(changed))
            old.cidrs[fam] = new
            continue
        if held == new:  # the same set again (compared in C; a new set differs at its first entry)
            continue
        stale = held.keys() - new.keys()
        if stale:
            bpfsys.delete_batch(fd, b"".join(stale), len(stale))
        # what the slot holds already (a set two versions back is mostly the same) is not written again
        changed = {k: v for k, v in new.items() if held.get(k) != v} if held else new
        if changed:
            bpfsys.update_batch(fd, b"".join(changed), b"".join(changed.values()), len(changed))
        old.cidrs[fam] = new
    old.krs = krs

    # port table: the new masks, and zeros where the old set had one
    new_ports = kernel_port_entries(krs)
    for idx in old.ports - new_ports.keys():
        new_ports[idx] = 0
    if new_ports:
        base = slot * PORT_RANGE
        idxs = sorted(new_ports)
        bpfsys.update_batch(ports.map_fd, array.array("I", (base + i for i in idxs)).tobytes(),
                            array.array("Q", (new_ports[i] for i in idxs)).tobytes(), len(idxs))  # fmt: skip
    old.ports = {i for i, m in new_ports.items() if m}
    for idx in range(RULE_IDX):
        leaf = rules.Leaf()
        rp = krs.rules.get(idx)
        if rp is not None:
            leaf.action, leaf.flags, leaf.block_ns = rp.action, rp.flags, rp.block_ns
            for dst, src in ((leaf.src, rp.src), (leaf.pfx, rp.pfx)):
                dst.rate, dst.burst, dst.fill_ns = src.rate, src.burst, src.fill_ns
                dst.brate, dst.bburst, dst.bfill_ns = src.brate, src.bburst, src.bfill_ns
            leaf.pfx4.hi, leaf.pfx4.lo = rp.pfx4.hi, rp.pfx4.lo
            leaf.pfx6.hi, leaf.pfx6.lo = rp.pfx6.hi, rp.pfx6.lo
        rules[rules.Key(slot * RULE_IDX + idx)] = leaf

    cfg = sets.Leaf()
    cfg.version = version
    cfg.epoch = _next_epoch(tables)
    cfg.flags = krs.flags
    cfg.any_src_mask = krs.any_src_mask
    for i, m in enumerate(krs.proto_mask):
        cfg.proto_mask[i] = m
    cfg.key4.hi, cfg.key4.lo = krs.key4.hi, krs.key4.lo
    cfg.key6.hi, cfg.key6.lo = krs.key6.hi, krs.key6.lo
    cfg.same_match_as = NO_SLOT
    sets[sets.Key(slot)] = cfg


def trim_slot(tables: Tables, held: SlotEntries, keep: tuple[Mapping, dict]) -> int:
    """Delete from a retired slot (no packet reads it: a grace period has
    passed since it was last selected) the trie entries not in `keep` (the
    active set's, slot_trie_entries for this slot); `held` follows. The
    next apply writes a free slot, mostly this one: what the active set has
    stays for it (the same set applied again writes nothing), and a new
    set's entries are written without deleting old ones first. Returns how
    many entries were deleted."""
    deleted = 0
    for (fam, name), same in zip(TRIES, keep):
        entries = held.cidrs[fam]
        if isinstance(same, Trie4) or isinstance(entries, Trie4):  # IPv4 entries as arrays (trie4.py)
            same, entries = Trie4.held(same), Trie4.held(entries)
            stale = entries.without(same)
            if stale:
                held.krs = None
                bpfsys.delete_batch(tables[name].map_fd, stale.key_bytes(), len(stale))
                held.cidrs[fam] = entries.within(same)
                deleted += len(stale)
            continue
        stale = entries.keys() - same.keys()
        if stale:
            held.krs = None
            bpfsys.delete_batch(tables[name].map_fd, b"".join(stale), len(stale))
            for k in stale:
                del entries[k]
            deleted += len(stale)
    return deleted


def link_shadow(tables: Tables, shadow: int, active: int, krs: dict[int, KernelRuleSet]) -> None:
    """Let the shadow slot reuse the active slot's classification if the
    two match alike (bpf/layout.h same_match_as), and tell each of its rules
    where it keeps its state (tg_rule_cfg.shadow_link, entries.shadow_links).
    Called before a flip makes `active` active, or before the shadow slot is
    selected: until then both name a slot that is not active, which the
    program ignores. Also on the selected pair an agent adopted (links that
    maps of an older agent lack): a packet reads each rule's link whole, the
    old one or the new. krs: slot -> what it holds, where known."""
    a, b = krs.get(active), krs.get(shadow)
    same = active if a is not None and b is not None and same_matching(a, b) else NO_SLOT
    sets = tables["tg_sets"]
    cfg = sets[sets.Key(shadow)]
    if cfg.same_match_as != same:
        cfg.same_match_as = same  # one byte differs: a concurrent reader sees old or new
        sets[sets.Key(shadow)] = cfg
    # after same_match_as: a packet that still read the old value reads each rule's old link or its new
    # one (one byte), and a new one names a slot that is not active yet
    links = shadow_links(a, b, active) if same != NO_SLOT else {}
    rules = tables["tg_rules"]
    for idx in range(RULE_IDX):
        key = rules.Key(shadow * RULE_IDX + idx)
        leaf = rules[key]
        if leaf.shadow_link != links.get(idx, 0):
            leaf.shadow_link = links.get(idx, 0)
            rules[key] = leaf


def set_version(tables: Tables, slot: int, version: int) -> None:
    sets = tables["tg_sets"]
    cfg = sets[sets.Key(slot)]
    cfg.version = version
    sets[sets.Key(slot)] = cfg


def harvest_slot(tables: Tables, slot: int, names: dict[int, str], rules: dict[str, RuleCounters],
                 shadow: dict[str, ShadowCounters]) -> None:  # fmt: skip
    """Fold a retired slot's per-rule counters into the running totals
    (rules, shadow: by rule name), then zero them so the next rule set in
    this slot starts clean."""
    rs = tables["tg_rule_stats"]
    for idx in range(RULE_IDX):
        key = rs.Key(slot * RULE_IDX + idx)
        name = names.get(idx)
        if name is not None:
            add_rule_counts(rules.setdefault(name, RuleCounters()), shadow.setdefault(name, ShadowCounters()),
                            rs.getvalue(key))  # fmt: skip
        rs[key] = rs.Leaf()  # per-CPU array of zeroed values
