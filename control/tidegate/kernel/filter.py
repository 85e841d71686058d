"""The kernel layer: the one owner of tidegate's BPF program and maps.

`KernelFilter` has bpf/tidegate.c compiled with BCC in a child process
(program.py, compiler.py; BCC never loads into this process), pins its maps under
/sys/fs/bpf/tidegate/<iface>/, attaches the program (native, generic, or
auto with a fallback), writes rule sets into the maps with an atomic swap,
reads counters and per-source state, and detaches. Everything above this
module talks to it through this narrow interface and never touches a map.

Rule-set slots (see bpf/tidegate.c): three copies of every rule-set map;
`sel` names the active and the shadow slot. An apply writes the free slot,
flips `sel`, then waits for an RCU grace period so the retired slot is idle
before anything rewrites it.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tidegate.kernel import bpfsys
from tidegate.kernel import program
from tidegate.kernel.compiler import CompileError
from tidegate.kernel.layout import (
    DROP_REASONS,
    NO_SLOT,
    REASONS,
    RULE_IDX,
    SLOTS,
    KernelRuleSet,
    PORT_RANGE,
    build_kernel_rule_set,
    halves_to_address,
    kernel_port_entries,
    kernel_trie_entries,
    same_matching,
)

log = logging.getLogger("tidegate.kernel.filter")

PIN_ROOT = "/sys/fs/bpf/tidegate"
PROG_NAME = "tidegate_xdp"
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# IFLA_XDP_ATTACHED: pyroute2 reports a number or (newer releases) a name
XDP_ATTACHED = {0: None, 1: "native", 2: "generic", 3: "offload", 4: "multi",
                "none": None, "xdp": "native", "drv": "native", "skb": "generic", "hw": "offload", "multi": "multi",
                "xdpdrv": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}
BPF_NOEXIST = 1

# map name -> is it per rule-set slot (cleared/rewritten on apply)
MAP_NAMES = (
    "tg_ctl",
    "tg_sets",
    "tg_rules",
    "tg_cidrs4",
    "tg_cidrs6",
    "tg_ports",
    "tg_state",
    "tg_stats",
    "tg_rule_stats",
    "tg_lru",
    "tg_debruijn",
)
_DEBRUIJN = 0x022FDD63CC95386D
# pinned maps that only count: when their size changes (a new reason), they are made anew
RESIZABLE_COUNTERS = {"tg_stats": len(REASONS)}


class KernelError(Exception):
    """A kernel operation failed; the message says what and what to do."""


class InterfaceError(KernelError):
    """The interface does not exist or cannot take an XDP program."""


class NotAttachedError(KernelError):
    """The filter is not loaded/attached."""


class MapWriteError(KernelError):
    """Writing a rule set into the maps failed partway. The selection was not
    changed (packets still see the sets they saw), and what the written slot
    holds has been read back from the kernel, so the next write of that slot
    starts from what is really there."""


def bpf_source_dir() -> Path:
    env = os.environ.get("TIDEGATE_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "bpf"


def inline_source(path: Path, _depth: int = 0) -> str:
    """The program with its local headers pasted in.

    BCC rewrites map method calls (tg_state.lookup(...)) only in the main
    source text, not in included files; the headers stay split by concern
    on disk and are joined here."""
    if _depth > 8:
        raise KernelError(f"include nesting too deep at {path}")
    out = []
    for line in path.read_text().splitlines(keepends=True):
        m = re.match(r'\s*#include\s+"([^"]+)"', line)
        if m:
            out.append(f"/* --- {m.group(1)} --- */\n")
            out.append(inline_source(path.parent / m.group(1), _depth + 1))
        else:
            out.append(line)
    return "".join(out)


def ensure_bpffs(root: str = "/sys/fs/bpf") -> None:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == root and parts[2] == "bpf":
                return
    os.makedirs(root, exist_ok=True)
    rc = os.system(f"mount -t bpf bpf {root} 2>/dev/null")
    if rc != 0:
        raise KernelError(f"{root} is not a bpf filesystem and mounting it failed (are you root?)")


@dataclass
class FilterConfig:
    interface: str | None
    xdp_mode: str = "auto"  # auto | native | generic
    pin_root: str = PIN_ROOT
    max_sources: int = 1 << 20
    max_cidrs: int = 3 * 131072  # per family trie, all three slots
    replay_clock: bool = False  # test/replay build: time comes from a map
    pin_name: str | None = None  # defaults to the interface name

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.pin_root, self.pin_name or self.interface or "unbound")


@dataclass
class LoadResult:
    adopted: bool  # program was already attached and kept as is
    replaced: bool  # an older tidegate program was replaced atomically
    fresh_maps: bool
    compile_seconds: float
    prog_id: int
    mode: str | None
    compiled: bool = True  # a compile child ran (False: the pinned program of the same digest was used)


@dataclass
class RuleCounters:
    pass_packets: int = 0
    pass_bytes: int = 0
    drop_packets: int = 0
    drop_bytes: int = 0
    drop_rate: int = 0
    drop_prefix: int = 0
    drop_blocked: int = 0
    drop_deny: int = 0


@dataclass
class ShadowCounters:
    packets: int = 0
    would_drop: int = 0
    would_drop_new: int = 0  # would drop where the active set passed
    would_drop_bytes: int = 0


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
    count: int = 0

    def address(self, i: int) -> str:
        return str(halves_to_address(int(self.addr_hi[i]), int(self.addr_lo[i])))


@dataclass
class _SlotEntries:
    cidrs: dict = field(default_factory=lambda: {4: set(), 6: set()})  # family -> raw trie keys
    ports: set = field(default_factory=set)  # port-table indexes within the slot holding a mask


class KernelFilter:
    """Owns the XDP program and its pinned maps for one interface."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self._prog: program.Program | None = None
        self._ifindex: int | None = None
        self._lock = threading.RLock()
        self._grace: bpfsys.GraceWaiter | None = None
        self._slot_entries: dict[int, _SlotEntries] = {}
        self._names: dict[int, dict[int, str]] = {}  # slot -> rule index -> name
        self._krs: dict[int, KernelRuleSet] = {}  # slot -> what it holds, where known
        self._retired_rules: dict[str, RuleCounters] = {}
        self._retired_shadow: dict[str, ShadowCounters] = {}
        self._tables: dict[str, object] = {}

    # ------------------------------------------------------------------ load
    def cflags(self) -> list[str]:
        c = self.config
        flags = [
            f'-DTG_PIN_DIR="{c.pin_dir}"',
            f"-DTG_MAX_SOURCES={c.max_sources}",
            f"-DTG_MAX_CIDRS={c.max_cidrs}",
            "-Wno-unused-function",
        ]
        if c.replay_clock:
            flags.append("-DTG_REPLAY_CLOCK=1")
        return flags

    def _check_interface(self) -> None:
        if self.config.interface is None:
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.config.interface)
        if not idx:
            raise InterfaceError(f"interface {self.config.interface!r} does not exist (see `ip link`)")
        self._ifindex = idx[0]

    def _check_pinned_sizes(self) -> bool:
        """True if pinned maps exist. Refuses maps of another size or layout."""
        d = self.config.pin_dir
        path = os.path.join(d, "tg_state")
        if not os.path.exists(path):
            return False
        want = {
            "tg_state": self.config.max_sources,
            "tg_cidrs4": self.config.max_cidrs,
            "tg_cidrs6": self.config.max_cidrs,
        }
        for name, entries in want.items():
            p = os.path.join(d, name)
            if not os.path.exists(p):
                continue
            info_entries = _pinned_entries(p)
            if info_entries != entries:
                raise KernelError(
                    f"pinned map {p} holds {info_entries} entries but this agent is configured for "
                    f"{entries}; run `tidegate detach --interface {self.config.interface}` to start over "
                    "with the new size (this removes the filter while it runs)"
                )
        for name, entries in RESIZABLE_COUNTERS.items():
            # counters only: a new program with more reasons gets a new map (BCC would silently reuse
            # the old, smaller one); the attached program keeps its own until the new one replaces it
            p = os.path.join(d, name)
            if os.path.exists(p) and _pinned_entries(p) != entries:
                log.warning("the pinned counter map has another size: it is made anew and its counts restart "
                            "from zero", extra={"map": p, "entries": entries})  # fmt: skip
                os.unlink(p)
        return True

    def load(self) -> LoadResult:
        """Load the program (compiled in a child process, or the pinned one
        of the same digest without compiling), adopt pinned maps and an
        attached program.

        Does not attach a program that is not attached yet: the caller first
        writes a rule set (apply) and then calls attach(), so the gate never
        opens with empty maps."""
        with self._lock:
            self._check_interface()
            ensure_bpffs()
            os.makedirs(self.config.pin_dir, mode=0o700, exist_ok=True)
            existed = self._check_pinned_sizes()
            attached_id, mode = self._attached_prog()
            attached_tag = self._attached_tidegate_tag(attached_id)
            src = inline_source(bpf_source_dir() / "tidegate.c")
            try:
                prog = program.open_or_compile(src, self.cflags(), self.config.pin_dir)
            except (CompileError, bpfsys.BpfError, OSError) as e:
                raise KernelError(
                    f"compiling/loading the XDP program failed: {e}. Kernel headers and BCC are set up by "
                    "`make install`; a map layout change needs `tidegate detach` first"
                ) from e
            self._prog = prog
            self._tables = program.open_maps(prog.fd)
            missing = [n for n in MAP_NAMES if n not in self._tables]
            if missing:
                raise KernelError(f"the loaded program lacks the maps {missing}; run `tidegate detach` first")
            self._grace = bpfsys.GraceWaiter()
            fresh = not existed or self._debruijn_empty()
            if fresh:
                self._init_maps()
            self._index_slots()
            info = bpfsys.prog_info(prog.fd)
            new_id = info.id
            adopted = replaced = False
            if attached_id:
                if attached_id == new_id or attached_tag == bytes(info.tag):
                    adopted = True
                    if attached_id != new_id:  # the same instructions attached by an older agent: keep that one
                        self._adopt_attached(attached_id)
                        new_id = attached_id
                else:
                    self._attach_fd(prog.fd, mode, replace=True)
                    replaced = True
            program.drop_other_pins(self.config.pin_dir, prog.digest)  # replaced or never attached
            log.info(
                "program loaded",
                extra={"compiled": prog.compiled, "compile_s": round(prog.compile_seconds, 3), "adopted": adopted,
                       "replaced": replaced, "fresh": fresh, "prog_id": new_id},
            )  # fmt: skip
            return LoadResult(adopted, replaced, fresh, prog.compile_seconds, new_id, mode, prog.compiled)

    def _attached_tidegate_tag(self, attached_id: int | None) -> bytes | None:
        """The tag of the attached program; refuses another XDP program."""
        if not attached_id:
            return None
        fd = bpfsys.prog_fd_by_id(attached_id)
        try:
            info = bpfsys.prog_info(fd)
        finally:
            os.close(fd)
        name = info.name.decode(errors="replace")
        if name != PROG_NAME[:15]:
            raise KernelError(
                f"interface {self.config.interface} already runs another XDP program "
                f"({name!r}, id {attached_id}); detach it first (`ip link set dev "
                f"{self.config.interface} xdp off`)"
            )
        return bytes(info.tag)

    def _adopt_attached(self, attached_id: int) -> None:
        fd = bpfsys.prog_fd_by_id(attached_id)
        os.close(self._prog.fd)
        self._prog.fd = fd
        program.repin(fd, self.config.pin_dir, self._prog.digest)

    def _debruijn_empty(self) -> bool:
        t = self._tables["tg_debruijn"]
        return all(t[t.Key(i)].value == 0 for i in (1, 2))

    def _init_maps(self) -> None:
        t = self._tables["tg_debruijn"]
        for bit in range(64):
            idx = (((1 << bit) * _DEBRUIJN) & 0xFFFFFFFFFFFFFFFF) >> 58
            t[t.Key(idx)] = t.Leaf(bit)
        ctl = self._tables["tg_ctl"]
        leaf = ctl.Leaf()
        leaf.sel = NO_SLOT | (NO_SLOT << 8)
        ctl[ctl.Key(0)] = leaf

    def _index_slots(self) -> None:
        """Learn which trie and port-table entries each slot holds (after
        adoption), so the next write of a slot touches only what changes."""
        self._slot_entries = {s: _SlotEntries() for s in range(SLOTS)}
        for fam, name in ((4, "tg_cidrs4"), (6, "tg_cidrs6")):
            keys, _, n = self._read_trie(name)
            for i in range(n):
                slot = int.from_bytes(keys[i][4:8], "little")
                self._slot_entries.setdefault(slot, _SlotEntries()).cidrs[fam].add(keys[i])
        t = self._tables["tg_ports"]
        _, values, n = bpfsys.lookup_batch(t.map_fd, 4, 8, SLOTS * PORT_RANGE)
        for idx in values.view("<u8")[:n].nonzero()[0].tolist():
            self._slot_entries[idx // PORT_RANGE].ports.add(idx % PORT_RANGE)

    def _read_trie(self, name: str) -> tuple[list[bytes], list[bytes], int]:
        t = self._tables[name]
        ksz, vsz = ctypes.sizeof(t.Key), ctypes.sizeof(t.Leaf)
        keys, values, n = bpfsys.lookup_batch(t.map_fd, ksz, vsz, self.config.max_cidrs)
        kb, vb = keys.tobytes(), values.tobytes()
        return [kb[i * ksz:(i + 1) * ksz] for i in range(n)], [vb[i * vsz:(i + 1) * vsz] for i in range(n)], n

    # ---------------------------------------------------------------- attach
    def _attached_prog(self) -> tuple[int | None, str | None]:
        if self._ifindex is None:
            return None, None
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                link = ipr.get_links(self._ifindex)[0]
        except NetlinkError:
            return None, None  # the interface is gone (deleted, or recreated with a new index)
        xdp = link.get_attr("IFLA_XDP")
        if not xdp:
            return None, None
        raw = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
        mode = XDP_ATTACHED.get(raw.lower() if isinstance(raw, str) else raw)
        if mode is None and xdp.get_attr("IFLA_XDP_PROG_ID"):
            # an unknown name for the mode: tell it by which prog-id attribute is set
            mode = "multi"
        if mode == "multi":
            mode = "native" if xdp.get_attr("IFLA_XDP_DRV_PROG_ID") else "generic"
        pid = xdp.get_attr("IFLA_XDP_PROG_ID")
        if not pid:
            pid = xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or xdp.get_attr("IFLA_XDP_SKB_PROG_ID")
        return (pid or None), mode

    def _attach_fd(self, fd: int, mode: str | None, replace: bool = False) -> None:
        """Attach (fd >= 0) or detach (fd -1) over netlink; with replace the
        kernel swaps the attached program for this one in one step."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        flags = XDP_FLAGS_SKB_MODE if mode == "generic" else XDP_FLAGS_DRV_MODE
        if not replace and fd >= 0:
            flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=self._ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})
        except NetlinkError as e:
            what = "attaching" if fd >= 0 else "detaching"
            raise KernelError(f"{what} XDP ({mode}) {'to' if fd >= 0 else 'from'} {self.config.interface} failed: "
                              f"{os.strerror(e.code)}") from e  # fmt: skip

    def attach(self) -> str:
        """Attach in the configured mode; returns the mode in use."""
        with self._lock:
            self._require_loaded()
            if self.config.interface is None:
                raise InterfaceError("no interface configured (replay build)")
            pid, mode = self._attached_prog()
            if pid:
                return mode
            want = self.config.xdp_mode
            if want == "auto":
                try:
                    self._attach_fd(self._prog.fd, "native")
                    return "native"
                except KernelError as e:
                    log.warning("native XDP failed, falling back to generic: %s", e)
                    self._attach_fd(self._prog.fd, "generic")
                    return "generic"
            if want not in ("native", "generic"):
                raise KernelError(f"xdp mode must be auto, native or generic, not {want!r}")
            self._attach_fd(self._prog.fd, want)
            return want

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
                self._check_interface_quiet()
            if self._ifindex is not None:
                pid, mode = self._attached_prog()
                if pid:
                    self._attach_fd(-1, mode)
            if remove_pins:
                self.remove_pins()

    def _check_interface_quiet(self) -> None:
        try:
            self._check_interface()
        except InterfaceError:
            self._ifindex = None

    def remove_pins(self) -> None:
        d = self.config.pin_dir
        if os.path.isdir(d):
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))
            os.rmdir(d)

    def close(self) -> None:
        """Release our file descriptors; the attached program and pins stay."""
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

    # -------------------------------------------------------------- rule sets
    def _sel(self) -> tuple[int, int]:
        ctl = self._tables["tg_ctl"]
        sel = ctl[ctl.Key(0)].sel
        return sel & 0xFF, (sel >> 8) & 0xFF

    def _set_sel(self, active: int, shadow: int) -> None:
        ctl = self._tables["tg_ctl"]
        leaf = ctl.Leaf()
        leaf.sel = (active & 0xFF) | ((shadow & 0xFF) << 8)
        try:
            ctl[ctl.Key(0)] = leaf  # one word: the old selection or the new one
        except Exception as e:
            raise MapWriteError(f"switching the rule-set selection failed ({e}); it is unchanged") from e
        # every packet that could have read the old selection has finished
        self._grace.wait()

    def _slot_info(self, slot: int) -> SlotInfo | None:
        if slot >= SLOTS:
            return None
        t = self._tables["tg_sets"]
        cfg = t[t.Key(slot)]
        return SlotInfo(slot, int(cfg.version), int(cfg.epoch))

    def state(self) -> FilterState:
        with self._lock:
            self._require_loaded()
            a, s = self._sel()
            pid, mode = self._attached_prog()
            return FilterState(
                self.config.interface, bool(pid), mode, pid, self._slot_info(a), self._slot_info(s), self.config.pin_dir
            )

    def active_version(self) -> int | None:
        with self._lock:
            self._require_loaded()
            info = self._slot_info(self._sel()[0])
            return info.version if info else None

    def shadow_version(self) -> int | None:
        with self._lock:
            self._require_loaded()
            info = self._slot_info(self._sel()[1])
            return info.version if info else None

    def bind_names(self, version: int, rule_set) -> None:
        """Tell the filter the rule names of a version already in the kernel
        (after an agent restart), so counters are reported by name."""
        with self._lock:
            krs = build_kernel_rule_set(rule_set)
            for slot in range(SLOTS):
                info = self._slot_info(slot)
                if info and info.version == version:
                    self._names[slot] = krs.rule_names
                    self._krs[slot] = krs

    def _free_slot(self) -> int:
        a, s = self._sel()
        for slot in range(SLOTS):
            if slot not in (a, s):
                return slot
        raise KernelError("no free rule-set slot")  # cannot happen with 3 slots

    def _next_epoch(self) -> int:
        t = self._tables["tg_sets"]
        return max(int(t[t.Key(s)].epoch) for s in range(SLOTS)) + 1

    def _write_slot(self, slot: int, krs: KernelRuleSet, version: int) -> None:
        """Write a complete rule set into a slot no packet reads."""
        self._harvest_slot(slot)
        sets, rules = self._tables["tg_sets"], self._tables["tg_rules"]
        ports = self._tables["tg_ports"]
        old = self._slot_entries.setdefault(slot, _SlotEntries())

        # Batched writes: one bpf(2) call per few thousand entries instead of
        # one per entry (the difference between ~10 ms and ~100 ms at 10,000)
        v4, v6 = kernel_trie_entries(krs, slot)
        for fam, name, new in ((4, "tg_cidrs4", v4), (6, "tg_cidrs6", v6)):
            fd = self._tables[name].map_fd
            stale = old.cidrs[fam] - new.keys()
            if stale:
                bpfsys.delete_batch(fd, b"".join(stale), len(stale))
            if new:
                bpfsys.update_batch(fd, b"".join(new), b"".join(new.values()), len(new))
            old.cidrs[fam] = set(new)

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
        cfg.epoch = self._next_epoch()
        cfg.flags = krs.flags
        cfg.any_src_mask = krs.any_src_mask
        for i, m in enumerate(krs.proto_mask):
            cfg.proto_mask[i] = m
        cfg.key4.hi, cfg.key4.lo = krs.key4.hi, krs.key4.lo
        cfg.key6.hi, cfg.key6.lo = krs.key6.hi, krs.key6.lo
        cfg.same_match_as = NO_SLOT
        sets[sets.Key(slot)] = cfg
        self._names[slot] = dict(krs.rule_names)
        self._krs[slot] = krs

    def _link_shadow(self, shadow: int, active: int) -> None:
        """Let the shadow slot reuse the active slot's classification if the
        two match alike (bpf/layout.h same_match_as). Called before a flip
        makes `active` active: until then the value names a slot that is not
        active, which the program ignores."""
        a, b = self._krs.get(active), self._krs.get(shadow)
        same = active if a is not None and b is not None and same_matching(a, b) else NO_SLOT
        sets = self._tables["tg_sets"]
        cfg = sets[sets.Key(shadow)]
        if cfg.same_match_as != same:
            cfg.same_match_as = same  # one byte differs: a concurrent reader sees old or new
            sets[sets.Key(shadow)] = cfg

    def _harvest_slot(self, slot: int) -> None:
        """Fold a retired slot's per-rule counters into the running totals,
        then zero them so the next rule set in this slot starts clean."""
        rs = self._tables["tg_rule_stats"]
        names = self._names.get(slot, {})
        for idx in range(RULE_IDX):
            key = rs.Key(slot * RULE_IDX + idx)
            name = names.get(idx)
            if name is not None:
                rc = self._retired_rules.setdefault(name, RuleCounters())
                sc = self._retired_shadow.setdefault(name, ShadowCounters())
                _add_rule_counts(rc, sc, rs.getvalue(key))
            rs[key] = rs.Leaf()  # per-CPU array of zeroed values

    def _write_or_reread(self, slot: int, krs: KernelRuleSet, version: int) -> None:
        """_write_slot; on any failure (a bpf(2) error from a batch, BCC's
        error from a single update) re-read what the slot holds and raise
        MapWriteError. The slot is not selected, so no packet saw it."""
        try:
            self._write_slot(slot, krs, version)
        except Exception as e:
            self._names.pop(slot, None)
            self._krs.pop(slot, None)
            try:
                self._index_slots()
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
            slot = self._free_slot()
            self._write_or_reread(slot, krs, version)
            _, shadow = self._sel()
            if shadow != NO_SLOT:
                self._link_shadow(shadow, slot)
            self._set_sel(slot, shadow)

    def load_shadow(self, rule_set, version: int) -> None:
        """Replace the shadow set. If the write fails partway
        (MapWriteError), no shadow set is loaded afterwards."""
        krs = build_kernel_rule_set(rule_set)
        with self._lock:
            self._require_loaded()
            active, shadow = self._sel()
            if shadow != NO_SLOT:
                self._set_sel(active, NO_SLOT)
            slot = self._free_slot()
            self._write_or_reread(slot, krs, version)
            if active != NO_SLOT:
                self._link_shadow(slot, active)
            self._set_sel(active, slot)

    def clear_shadow(self) -> None:
        with self._lock:
            self._require_loaded()
            active, _ = self._sel()
            self._set_sel(active, NO_SLOT)

    def promote_shadow(self, version: int | None = None) -> int:
        """Make the shadow set the active one (its state entries carry over).
        version: the store's number for the promoted set, if it gets a new one."""
        with self._lock:
            self._require_loaded()
            active, shadow = self._sel()
            if shadow == NO_SLOT:
                raise KernelError("no shadow rule set is loaded")
            if version is not None:
                sets = self._tables["tg_sets"]
                cfg = sets[sets.Key(shadow)]
                cfg.version = version
                sets[sets.Key(shadow)] = cfg
            self._set_sel(shadow, NO_SLOT)
            return self._slot_info(shadow).version

    # --------------------------------------------------------------- counters
    def counters(self) -> Counters:
        with self._lock:
            self._require_loaded()
            stats = self._tables["tg_stats"]
            reasons = {}
            for i, name in enumerate(REASONS):
                vals = stats.getvalue(stats.Key(i))
                reasons[name] = (sum(v.packets for v in vals), sum(v.bytes for v in vals))
            rules = {k: _copy(v) for k, v in self._retired_rules.items()}
            shadow: dict[str, ShadowCounters] = {}
            rs = self._tables["tg_rule_stats"]
            active, sslot = self._sel()
            for slot in range(SLOTS):
                names = self._names.get(slot, {})
                for idx, name in names.items():
                    vals = rs.getvalue(rs.Key(slot * RULE_IDX + idx))
                    rc = rules.setdefault(name, RuleCounters())
                    sc = ShadowCounters()
                    _add_rule_counts(rc, sc, vals)
                    if slot == sslot:
                        shadow[name] = sc
            lru = self._tables["tg_lru"]
            inserts = sum(lru.getvalue(lru.Key(0)))
            fails = sum(lru.getvalue(lru.Key(1)))
            return Counters(reasons, rules, shadow, int(inserts), int(fails))

    def read_sources(self, max_entries: int | None = None) -> SourceTable:
        """Snapshot the per-source LRU with one batched read (bounded by the
        map size or max_entries)."""
        import numpy as np

        with self._lock:
            self._require_loaded()
            t = self._tables["tg_state"]
            ksz, vsz = ctypes.sizeof(t.Key), ctypes.sizeof(t.Leaf)
            n = min(self.config.max_sources, max_entries or self.config.max_sources)
            keys, vals, count = bpfsys.lookup_batch(t.map_fd, ksz, vsz, n)
        kd = np.dtype(
            [("addr_hi", "<u8"), ("addr_lo", "<u8"), ("epoch", "<u4"), ("rule", "u1"), ("kind", "u1"), ("pad", "<u2")]
        )
        vd = np.dtype(
            [
                ("tokens", "<u8"),
                ("last_ns", "<u8"),
                ("byte_tokens", "<u8"),
                ("blocked_until", "<u8"),
                ("packets", "<u8"),
                ("bytes", "<u8"),
                ("drops", "<u8"),
                ("new_drops", "<u8"),
                ("first_ns", "<u8"),
            ]
        )
        assert kd.itemsize == ksz and vd.itemsize == vsz, "bpf/layout.h and kernel.py disagree"
        k = keys.view(kd)[:count]
        v = vals.view(vd)[:count]
        return SourceTable(
            k["addr_hi"], k["addr_lo"], k["epoch"], k["rule"], k["kind"],
            v["tokens"], v["last_ns"], v["blocked_until"], v["packets"], v["bytes"], v["drops"],
            v["new_drops"], v["first_ns"], time.monotonic_ns(), count,
        )  # fmt: skip

    def slot_names(self, slot: int) -> dict[int, str]:
        """Rule index -> name for the set in a slot (empty if unknown)."""
        return dict(self._names.get(slot, {}))

    def rule_name(self, slot: int, idx: int) -> str:
        return self._names.get(slot, {}).get(idx, f"rule{idx}")

    def clear_sources(self) -> None:
        with self._lock:
            self._require_loaded()
            self._tables["tg_state"].clear()

    # ------------------------------------------------------- test/replay use
    def test_run(self, frame: bytes, repeat: int = 1) -> tuple[int, int]:
        """BPF_PROG_TEST_RUN: (XDP verdict, ns per run)."""
        self._require_loaded()
        return bpfsys.test_run(self._prog.fd, frame, repeat)

    def set_clock(self, ns: int) -> None:
        t = self._tables.get("tg_clock")
        if t is None:
            raise KernelError("set_clock needs a replay build (FilterConfig(replay_clock=True))")
        t[t.Key(0)] = t.Leaf(ns)

    def map_digest(self, include_state: bool = True) -> str:
        """sha256 over every map's content, for 'nothing changed' checks."""
        with self._lock:
            self._require_loaded()
            h = hashlib.sha256()
            for name in MAP_NAMES:
                if name == "tg_state" and not include_state:
                    continue
                h.update(name.encode())
                if name == "tg_ports":
                    # 393,216 entries: one batched read, not a Python loop
                    _, values, _ = bpfsys.lookup_batch(self._tables[name].map_fd, 4, 8, SLOTS * PORT_RANGE)
                    h.update(values.tobytes())
                    continue
                if name in ("tg_cidrs4", "tg_cidrs6"):
                    keys, values, _ = self._read_trie(name)
                    items = sorted(zip(keys, values))
                else:
                    t = self._tables[name]
                    items = sorted((bytes(k), bytes(v)) for k, v in t.items())
                for kb, vb in items:
                    h.update(kb)
                    h.update(vb)
            return h.hexdigest()


def _pinned_entries(path: str) -> int:
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.map_info(fd).max_entries
    finally:
        os.close(fd)


def _copy(rc: RuleCounters) -> RuleCounters:
    return RuleCounters(**rc.__dict__)


def _add_rule_counts(rc: RuleCounters, sc: ShadowCounters, percpu_vals) -> None:
    for v in percpu_vals:
        rc.pass_packets += v.pass_pkts
        rc.pass_bytes += v.pass_bytes
        rc.drop_packets += v.drop_pkts
        rc.drop_bytes += v.drop_bytes
        rc.drop_rate += v.drop_rate
        rc.drop_prefix += v.drop_prefix
        rc.drop_blocked += v.drop_blocked
        rc.drop_deny += v.drop_deny
        sc.packets += v.shadow_pkts
        sc.would_drop += v.shadow_drop
        sc.would_drop_new += v.shadow_new_drop
        sc.would_drop_bytes += v.shadow_bytes_drop


