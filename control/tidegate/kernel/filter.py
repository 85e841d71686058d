"""The kernel layer: the one owner of tidegate's BPF program and maps.

`KernelFilter` holds the kernel objects for one interface (the program's
fd, its pinned maps, the grace-period waiter) and the agent's knowledge of
the rule-set slots, and does each job through the module for it:

- loader.py: compile (in a child) or open the pinned program, adopt
  pinned maps and an attached program;
- attach.py: attach, replace and detach over netlink;
- slots.py: write a rule set into the free slot and swap it in atomically;
- readers.py: counters, per-source state, the filter's state;
- fault_injection.py: the test hooks.

Everything above this module talks to `KernelFilter` and never touches a
map; the names it needs (FilterConfig, the errors, Counters...) are
imported from here.
"""

from __future__ import annotations

import logging
import os
import threading

from tidegate.kernel import attach, bpfsys, loader, program, readers, slots
from tidegate.kernel.entries import KernelRuleSet, build_kernel_rule_set, same_cidrs, slot_trie_entries
from tidegate.kernel.errors import InterfaceError, KernelError, MapWriteError, NotAttachedError
from tidegate.kernel.grace import GracePeriods
from tidegate.kernel.layout import NO_SLOT, SLOTS
from tidegate.kernel.loader import PIN_ROOT, FilterConfig, LoadResult, bpf_source_dir, inline_source
from tidegate.kernel.readers import Counters, FilterState, RuleCounters, ShadowCounters, SlotInfo, SourceTable

__all__ = [
    "KernelFilter", "FilterConfig", "LoadResult", "PIN_ROOT", "bpf_source_dir", "inline_source",
    "KernelError", "InterfaceError", "NotAttachedError", "MapWriteError",
    "Counters", "RuleCounters", "ShadowCounters", "SourceTable", "FilterState", "SlotInfo",
]  # fmt: skip

log = logging.getLogger("tidegate.kernel.filter")

# a retired slot holding at least this many trie entries is trimmed after the swap, on a thread of its own
# (slots.trim_slot); deleting fewer costs the next apply a few milliseconds at most
TRIM_MIN = 4096


class KernelFilter:
    """Owns the XDP program and its pinned maps for one interface."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self._prog: program.Program | None = None
        self._ifindex: int | None = None
        self._lock = threading.RLock()
        self._grace: GracePeriods | None = None
        # what each slot's tries and port range hold: read from the maps at the first write, not at load
        # (reading the 393,216-entry port table is ~0.1 s of a restart that may never write)
        self._slot_entries: dict[int, slots.SlotEntries] | None = {}
        self._names: dict[int, dict[int, str]] = {}  # slot -> rule index -> name
        self._krs: dict[int, KernelRuleSet] = {}  # slot -> what it holds, where known
        self._written: dict[int, int] = {}  # slot -> how many times it was written (a trim checks it is unchanged)
        self._writing = threading.RLock()  # slot writes and trims (taken inside _lock, or alone by a trim)
        self._trimmers: list[threading.Thread] = []  # trims of retired slots started (the last few)
        self._retired_rules: dict[str, RuleCounters] = {}
        self._retired_shadow: dict[str, ShadowCounters] = {}
        self._tables: dict[str, object] = {}

    # ------------------------------------------------------------------ load
    def cflags(self) -> list[str]:
        return loader.cflags(self.config)

    def _check_interface(self) -> None:
        if self.config.interface is not None:
            self._ifindex = attach.interface_index(self.config.interface)

    def load(self) -> LoadResult:
        """Load the program (compiled in a child process, or the pinned one
        of the same digest without compiling), adopt pinned maps and an
        attached program.

        Does not attach a program that is not attached yet: the caller first
        writes a rule set (apply) and then calls attach(), so the gate never
        opens with empty maps."""
        with self._lock:
            self._check_interface()
            held = loader.prepare_pin_dir(self.config)
            attached_id, mode = self._attached_prog()
            attached_tag = loader.attached_tidegate_tag(attached_id, self.config.interface)
            prog = self._prog = loader.load_program(self.config)
            self._tables = loader.open_tables(prog)
            self._grace = GracePeriods(bpfsys.GraceWaiter())
            if not held.empty:
                self._grace.begin()  # for a flip an agent before this one made just before it stopped
            fresh = not held.maps or not loader.maps_initialised(self._tables)
            if fresh:
                loader.init_maps(self._tables)
            else:
                loader.mark_state_layout(self._tables)
            # maps this load made (the pin dir held none) hold no rule set and no packet has read them: the
            # first apply neither reads the slots back (~70 ms, the port table's 393,216 entries) nor
            # waits for a grace period (~20 ms)
            self._slot_entries = {} if held.empty else None
            info = bpfsys.prog_info(prog.fd)
            new_id = info.id
            adopted = replaced = False
            if attached_id:
                if attached_id == new_id or attached_tag == bytes(info.tag):
                    adopted = True
                    if attached_id != new_id:  # the same instructions attached by an older agent: keep that one
                        loader.adopt_attached(prog, attached_id, self.config.pin_dir)
                        new_id = attached_id
                else:
                    attach.set_program(self._ifindex, self.config.interface, prog.fd, mode, replace=True)
                    replaced = True
            program.drop_other_pins(self.config.pin_dir, prog.digest)  # replaced or never attached
            log.info(
                "program loaded",
                extra={"program": "adopted attached" if adopted else prog.origin, "compiled": prog.compiled,
                       "compile_s": round(prog.compile_seconds, 3), "load_s": round(prog.seconds, 3),
                       "adopted": adopted, "replaced": replaced, "fresh": fresh, "prog_id": new_id},
            )  # fmt: skip
            return LoadResult(adopted, replaced, fresh, prog.compile_seconds, new_id, mode, prog.compiled,
                              prog.origin, prog.seconds)

    def remove_pins(self) -> None:
        loader.remove_pins(self.config.pin_dir)

    def close(self) -> None:
        """Release our file descriptors; the attached program and pins stay."""
        self.settle()
        with self._lock:
            if self._grace:
                self._grace.close()
                self._grace = None
            for t in self._tables.values():
                t.close()
            self._tables = {}
            if self._prog is not None:
                os.close(self._prog.fd)
                self._prog = None

    def _require_loaded(self) -> None:
        if self._prog is None:
            raise NotAttachedError("the XDP program is not loaded")

    @property
    def prog_fd(self) -> int:
        self._require_loaded()
        return self._prog.fd

    # ---------------------------------------------------------------- attach
    def _attached_prog(self) -> tuple[int | None, str | None]:
        return attach.attached_program(self._ifindex)

    def attach(self) -> str:
        """Attach in the configured mode; returns the mode in use."""
        with self._lock:
            self._require_loaded()
            if self.config.interface is None:
                raise InterfaceError("no interface configured (replay build)")
            pid, mode = self._attached_prog()
            if pid:
                return mode
            return attach.attach_in_mode(self._ifindex, self.config.interface, self._prog.fd, self.config.xdp_mode)

    def program_attached(self) -> bool:
        """Whether an XDP program is on the interface: one netlink query and
        no lock, so a long apply does not delay a health check."""
        return bool(self._attached_prog()[0])

    def ensure_attached(self) -> str | None:
        """Attach again if something removed the program (the interface was
        recreated, `ip link set dev IF xdp off`). Returns the mode when it
        re-attached, None when the program was attached already; raises
        InterfaceError while the interface does not exist."""
        with self._lock:
            self._require_loaded()
            if self.config.interface is None:
                return None
            self._check_interface()  # the index changes when the interface is recreated
            if self._attached_prog()[0]:
                return None
            return self.attach()

    def detach(self, remove_pins: bool = False) -> None:
        """Remove the program from the interface (and optionally the maps)."""
        with self._lock:
            if self._ifindex is None:
                try:
                    self._check_interface()
                except InterfaceError:
                    self._ifindex = None
            if self._ifindex is not None:
                pid, mode = self._attached_prog()
                if pid:
                    attach.set_program(self._ifindex, self.config.interface, -1, mode)
            if remove_pins:
                self.remove_pins()

    # -------------------------------------------------------------- rule sets
    def _sel(self) -> tuple[int, int]:
        return readers.selection(self._tables)

    def _set_sel(self, active: int, shadow: int) -> None:
        slots.write_selection(self._tables, self._grace, active, shadow)

    def state(self) -> FilterState:
        with self._lock:
            self._require_loaded()
            a, s = self._sel()
            pid, mode = self._attached_prog()
            info = (readers.slot_info(self._tables, a), readers.slot_info(self._tables, s))
            return FilterState(self.config.interface, bool(pid), mode, pid, *info, self.config.pin_dir)

    def active_slot(self) -> SlotInfo | None:
        """The active slot, its version and epoch, from the maps alone (state() also asks netlink)."""
        with self._lock:
            self._require_loaded()
            return readers.slot_info(self._tables, self._sel()[0])

    def active_version(self) -> int | None:
        info = self.active_slot()
        return info.version if info else None

    def shadow_version(self) -> int | None:
        with self._lock:
            self._require_loaded()
            info = readers.slot_info(self._tables, self._sel()[1])
            return info.version if info else None

    def bind_names(self, version: int, rule_set) -> None:
        """Tell the filter the rule names of a version already in the kernel
        (after an agent restart), so counters are reported by name. Once it
        knows both the active and the shadow set, it links them again: maps
        an older agent wrote have no shadow links (slots.link_shadow)."""
        with self._lock:
            krs = build_kernel_rule_set(rule_set)
            for slot in range(SLOTS):
                info = readers.slot_info(self._tables, slot)
                if info and info.version == version:
                    self._names[slot] = krs.rule_names
                    self._krs[slot] = krs
            active, shadow = self._sel()
            if active in self._krs and shadow in self._krs:
                slots.link_shadow(self._tables, shadow, active, self._krs)

    def _write_slot(self, slot: int, krs: KernelRuleSet, version: int) -> None:
        """Write a complete rule set into a slot no packet reads (once the
        grace periods of the flips so far have passed), after folding the
        counters of the set it held into the totals."""
        self._grace.wait()
        slots.harvest_slot(self._tables, slot, self._names.get(slot, {}), self._retired_rules, self._retired_shadow)
        if self._slot_entries is None:
            self._slot_entries = slots.index_slots(self._tables, self.config.max_cidrs)
        old = self._slot_entries.setdefault(slot, slots.SlotEntries())
        self._written[slot] = self._written.get(slot, 0) + 1
        slots.write_slot(self._tables, slot, krs, version, old)
        self._names[slot] = dict(krs.rule_names)
        self._krs[slot] = krs

    def _write_or_reread(self, slot: int, krs: KernelRuleSet, version: int) -> None:
        """_write_slot; on any failure (a bpf(2) error from a batch, an
        error from a single update) re-read what the slot holds and raise
        MapWriteError. The slot is not selected, so no packet saw it."""
        with self._writing:  # not while a trim changes the slots
            self._write_or_reread_slot(slot, krs, version)

    def _write_or_reread_slot(self, slot: int, krs: KernelRuleSet, version: int) -> None:
        try:
            self._write_slot(slot, krs, version)
        except Exception as e:
            self._names.pop(slot, None)
            self._krs.pop(slot, None)
            try:
                self._slot_entries = slots.index_slots(self._tables, self.config.max_cidrs)
            except Exception as again:  # noqa: BLE001 - report both
                raise MapWriteError(f"writing version {version} into rule-set slot {slot} failed ({e}), and "
                                    f"reading the slot back failed too ({again}); restart the agent") from e
            log.error("map write failed: the slot was read back from the kernel",
                      extra={"version": version, "slot": slot, "error": str(e)})  # fmt: skip
            raise MapWriteError(f"writing version {version} into the maps failed partway ({e}); the filter "
                                "keeps the rule set it had") from e

    def apply(self, rule_set, version: int) -> None:
        """Make rule_set the active set, atomically. Validates before writing:
        if building the kernel entries fails, no map is touched; if a write
        fails partway, MapWriteError and the active set stays."""
        krs = build_kernel_rule_set(rule_set)
        with self._lock:
            self._require_loaded()
            slot = slots.free_slot(self._tables)
            self._write_or_reread(slot, krs, version)
            retired, shadow = self._sel()
            if shadow != NO_SLOT:
                slots.link_shadow(self._tables, shadow, slot, self._krs)
            self._set_sel(slot, shadow)
            self._trim_later(retired, krs)

    # ---------------------------------------------------------------- trims
    def _trim_later(self, slot: int, active: KernelRuleSet) -> None:
        """Trim a slot just retired on a thread of its own (once the grace
        period after its flip has passed), if it holds TRIM_MIN entries."""
        held = self._slot_entries.get(slot) if self._slot_entries is not None and slot != NO_SLOT else None
        if held is None or sum(map(len, held.cidrs.values())) < TRIM_MIN:
            return
        retired = self._krs.get(slot)
        if retired is not None and same_cidrs(retired, active):  # the same set again: nothing to trim
            return
        t = threading.Thread(target=self._trim, args=(slot, self._written.get(slot, 0), active),
                             name="tidegate-trim", daemon=True)  # fmt: skip
        self._trimmers = [x for x in self._trimmers if x.is_alive()] + [t]
        t.start()

    def _trim(self, slot: int, written: int, active: KernelRuleSet) -> None:
        try:
            keep = slot_trie_entries(active, slot)  # outside the lock: it only reads the rule set
            self._grace.wait()  # the flip that retired the slot: no packet reads it after this
            # the write lock only: the filter's own lock stays free for reads (status, counters, the review)
            with self._writing:
                # only the slot as it was retired: not one rewritten since (a slot is selected only once
                # written), nor one selected again
                if (self._prog is None or self._slot_entries is None or self._written.get(slot, 0) != written
                        or slot in self._sel()):  # fmt: skip
                    return
                n = slots.trim_slot(self._tables, self._slot_entries[slot], keep)
            log.debug("retired slot trimmed", extra={"slot": slot, "deleted": n})
        except Exception as e:  # noqa: BLE001 - the slot is not selected: the next write reads it back
            with self._writing:
                self._slot_entries = None
            log.warning("trimming a retired rule-set slot failed: the next apply reads the slots back",
                        extra={"slot": slot, "error": str(e)})  # fmt: skip

    def settle(self) -> None:
        """Wait until the trims of retired slots under way (if any) have
        finished. Not while holding the filter's lock: a trim takes it."""
        for t in list(self._trimmers):
            t.join()

    def load_shadow(self, rule_set, version: int) -> None:
        """Replace the shadow set. If the write fails partway
        (MapWriteError), no shadow set is loaded afterwards."""
        krs = build_kernel_rule_set(rule_set)
        with self._lock:
            self._require_loaded()
            active, shadow = self._sel()
            if shadow != NO_SLOT:
                self._set_sel(active, NO_SLOT)
            slot = slots.free_slot(self._tables)
            self._write_or_reread(slot, krs, version)
            if active != NO_SLOT:
                slots.link_shadow(self._tables, slot, active, self._krs)
            self._set_sel(active, slot)

    def clear_shadow(self) -> None:
        with self._lock:
            self._require_loaded()
            active, _ = self._sel()
            self._set_sel(active, NO_SLOT)

    def promote_shadow(self, version: int | None = None) -> int:
        """Make the shadow set the active one. Its entries of its own carry
        over; the state it kept in the active set's entries (bpf/layout.h
        struct tg_shadow) does not: those sources and prefixes start with
        fresh buckets.
        version: the store's number for the promoted set, if it gets a new one."""
        with self._lock:
            self._require_loaded()
            active, shadow = self._sel()
            if shadow == NO_SLOT:
                raise KernelError("no shadow rule set is loaded")
            if version is not None:
                slots.set_version(self._tables, shadow, version)
            self._set_sel(shadow, NO_SLOT)
            return readers.slot_info(self._tables, shadow).version

    # --------------------------------------------------------------- reading
    def counters(self) -> Counters:
        with self._lock:
            self._require_loaded()
            return readers.read_counters(self._tables, self._names, self._retired_rules)

    def read_sources(self, max_entries: int | None = None, columns: tuple[str, ...] | None = None) -> SourceTable:
        """Snapshot the per-source LRU with one batched read (bounded by the
        map size or max_entries); `columns`: only those fields."""
        with self._lock:
            self._require_loaded()
            n = min(self.config.max_sources, max_entries or self.config.max_sources)
            return readers.read_sources(self._tables, n, columns)

    def slot_names(self, slot: int) -> dict[int, str]:
        """Rule index -> name for the set in a slot (empty if unknown)."""
        return dict(self._names.get(slot, {}))

    def rule_name(self, slot: int, idx: int) -> str:
        return self._names.get(slot, {}).get(idx, f"rule{idx}")

    def clear_sources(self) -> None:
        with self._lock:
            self._require_loaded()
            self._tables["tg_state"].clear()

    def map_digest(self, include_state: bool = True) -> str:
        """sha256 over every map's content, for 'nothing changed' checks
        (after any trim under way: the maps as they stay)."""
        self.settle()
        with self._lock:
            self._require_loaded()
            return readers.map_digest(self._tables, self.config.max_cidrs, include_state)

    # --------------------------------------------------- replay and test use
    def test_run(self, frame: bytes, repeat: int = 1) -> tuple[int, int]:
        """BPF_PROG_TEST_RUN: (XDP verdict, ns per run)."""
        self._require_loaded()
        return bpfsys.test_run(self._prog.fd, frame, repeat)

    def set_clock(self, ns: int) -> None:
        """Set the time a replay build's program reads (tg_clock)."""
        t = self._tables.get("tg_clock")
        if t is None:
            raise KernelError("set_clock needs a replay build (FilterConfig(replay_clock=True))")
        t[t.Key(0)] = t.Leaf(ns)
