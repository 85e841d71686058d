"""Loading: which program and maps, from the pin directory or compiled.

The program (bpf/tidegate.c with its headers pasted in) is compiled by BCC
in a child process (program.py, compiler.py; BCC never loads into the
agent) or, when the same program is pinned already, opened without
compiling, or, when an earlier compile of it is kept in the cache dir
(program_cache.py), loaded from there without compiling. Its maps are pinned under /sys/fs/bpf/tidegate/<iface>/ and
outlive the agent; a new agent adopts them, and an attached program of the
same instructions, as they are.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tidegate.kernel import bpfsys, program
from tidegate.kernel.compiler import CompileError
from tidegate.kernel.errors import KernelError
from tidegate.kernel.layout import (
    DEBRUIJN,
    LAYOUTS,
    MAP_NAMES,
    MAX_CIDRS,
    MAX_SOURCES,
    NO_SLOT,
    PROG_NAME,
    RESIZABLE_COUNTERS,
    SOFT_STATE,
    STATE_LAYOUT,
    tg_ctl,
)
from tidegate.kernel.pinned_maps import PinnedMap

log = logging.getLogger("tidegate.kernel.filter")

PIN_ROOT = "/sys/fs/bpf/tidegate"


@dataclass
class FilterConfig:
    interface: str | None
    xdp_mode: str = "auto"  # auto | native | generic
    pin_root: str = PIN_ROOT
    max_sources: int = MAX_SOURCES
    max_cidrs: int = MAX_CIDRS  # per family trie, all three slots
    replay_clock: bool = False  # test/replay build: time comes from a map
    pin_name: str | None = None  # defaults to the interface name
    cache_dir: str | None = None  # compiled programs kept for the next start (program_cache.py); None: none

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
    origin: str = "compiled"  # where the program came from: pinned | cached | compiled (program.Program)
    load_seconds: float = 0.0  # getting it (opening the pin, loading the cached object, or compiling)


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


def cflags(config: FilterConfig) -> list[str]:
    flags = [
        f'-DTG_PIN_DIR="{config.pin_dir}"',
        f"-DTG_MAX_SOURCES={config.max_sources}",
        f"-DTG_MAX_CIDRS={config.max_cidrs}",
        "-Wno-unused-function",
        # no debug info: BCC asks clang for it (-g) to hand the kernel BTF and source lines, which
        # cost a sixth of the compile and change no instruction (tests/kernel/test_kernel_defs.py);
        # a cached load has none either (program_cache.py)
        "-g0",
    ]
    if config.replay_clock:
        flags.append("-DTG_REPLAY_CLOCK=1")
    return flags


@dataclass(frozen=True)
class PinDir:
    """What the pin dir held before a load."""

    maps: bool  # pinned maps an earlier load made (tg_state among them)
    empty: bool  # nothing at all: every map the load pins is new and empty, and no packet has read it


def prepare_pin_dir(config: FilterConfig) -> PinDir:
    """Mount bpffs if needed and make the pin dir; say what it held.
    Refuses maps of another size or layout."""
    ensure_bpffs()
    d = config.pin_dir
    os.makedirs(d, mode=0o700, exist_ok=True)
    if not os.path.exists(os.path.join(d, "tg_state")):
        return PinDir(maps=False, empty=not os.listdir(d))
    want = {"tg_state": config.max_sources, "tg_cidrs4": config.max_cidrs, "tg_cidrs6": config.max_cidrs}
    for name, entries in want.items():
        p = os.path.join(d, name)
        if not os.path.exists(p):
            continue
        info_entries = pinned_map_info(p).max_entries
        if info_entries != entries:
            raise KernelError(
                f"pinned map {p} holds {info_entries} entries but this agent is configured for "
                f"{entries}; run `tidegate detach --interface {config.interface}` to start over "
                "with the new size (this removes the filter while it runs)"
            )
    other_layout = _pinned_state_layout(d) != STATE_LAYOUT and not _program_pinned(config)
    for name in SOFT_STATE:
        # per-source buckets only: a program whose state entries have another layout gets a new
        # map (BCC would reuse the old one and the verifier refuse the program, or, at the same
        # size, the program would misread every entry); every source starts again with a full
        # bucket, the old program keeps its map until it is replaced
        p = os.path.join(d, name)
        key, value, _ = LAYOUTS[name]
        info = pinned_map_info(p) if os.path.exists(p) else None
        if info is not None and (other_layout or (info.key_size, info.value_size) != (ctypes.sizeof(key),
                                                                                       ctypes.sizeof(value))):
            log.warning("the pinned per-source state has another layout: it is made anew and every source "
                        "starts with a full bucket", extra={"map": p})  # fmt: skip
            os.unlink(p)
    for name, entries in RESIZABLE_COUNTERS.items():
        # counters only: a new program with more reasons gets a new map (BCC would silently reuse
        # the old, smaller one); the attached program keeps its own until the new one replaces it
        p = os.path.join(d, name)
        if os.path.exists(p) and pinned_map_info(p).max_entries != entries:
            log.warning("the pinned counter map has another size: it is made anew and its counts restart "
                        "from zero", extra={"map": p, "entries": entries})  # fmt: skip
            os.unlink(p)
    return PinDir(maps=True, empty=False)


def _pinned_state_layout(pin_dir: str) -> int | None:
    """tg_ctl.state_layout of the pinned maps: the tg_src layout their
    tg_state was made for (0 from agents before it was kept)."""
    p = os.path.join(pin_dir, "tg_ctl")
    if not os.path.exists(p):
        return None
    fd = bpfsys.obj_get(p)
    try:
        ctl = tg_ctl()
        bpfsys.map_lookup(fd, ctypes.c_uint32(0), ctl)
        return ctl.state_layout
    finally:
        os.close(fd)


def _program_pinned(config: FilterConfig) -> bool:
    """This build's program is pinned already: the maps it uses are of its
    layout whatever tg_ctl says (an agent that stopped before marking it)."""
    digest = program.program_digest(inline_source(bpf_source_dir() / "tidegate.c"), cflags(config))
    return os.path.exists(program.prog_pin_path(config.pin_dir, digest))


def mark_state_layout(tables: dict[str, PinnedMap]) -> None:
    """Record in tg_ctl the tg_src layout of the tg_state map in use; the
    selection word is written back as it is."""
    ctl = tables["tg_ctl"]
    leaf = ctl[ctl.Key(0)]
    if leaf.state_layout != STATE_LAYOUT:
        leaf.state_layout = STATE_LAYOUT
        ctl[ctl.Key(0)] = leaf


def pinned_map_info(path: str) -> bpfsys.MapInfo:
    """What the kernel says about a pinned map (sizes, entries)."""
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.map_info(fd)
    finally:
        os.close(fd)


def attached_tidegate_tag(attached_id: int | None, interface: str | None) -> bytes | None:
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
            f"interface {interface} already runs another XDP program "
            f"({name!r}, id {attached_id}); detach it first (`ip link set dev "
            f"{interface} xdp off`)"
        )
    return bytes(info.tag)


def program_source() -> str:
    return inline_source(bpf_source_dir() / "tidegate.c")


def load_program(config: FilterConfig) -> program.Program:
    """The pinned program of this build, or one compiled in a child."""
    try:
        return program.open_or_compile(program_source(), cflags(config), config.pin_dir, config.cache_dir)
    except (CompileError, bpfsys.BpfError, OSError) as e:
        raise KernelError(
            f"compiling/loading the XDP program failed: {e}. Kernel headers and BCC are set up by "
            "`make install`; a map layout change needs `tidegate detach` first"
        ) from e


def open_tables(prog: program.Program) -> dict[str, PinnedMap]:
    tables = program.open_maps(prog.fd)
    missing = [n for n in MAP_NAMES if n not in tables]
    if missing:
        raise KernelError(f"the loaded program lacks the maps {missing}; run `tidegate detach` first")
    return tables


def adopt_attached(prog: program.Program, attached_id: int, pin_dir: str) -> None:
    """Use the attached program (the same instructions, loaded by an older
    agent) instead of the one just opened, and pin it as this build's."""
    fd = bpfsys.prog_fd_by_id(attached_id)
    os.close(prog.fd)
    prog.fd = fd
    program.repin(fd, pin_dir, prog.digest)


def maps_initialised(tables: dict[str, PinnedMap]) -> bool:
    t = tables["tg_debruijn"]
    return not all(t[t.Key(i)].value == 0 for i in (1, 2))


def init_maps(tables: dict[str, PinnedMap]) -> None:
    """Fill the de Bruijn table and select no rule set."""
    t = tables["tg_debruijn"]
    for bit in range(64):
        idx = (((1 << bit) * DEBRUIJN) & 0xFFFFFFFFFFFFFFFF) >> 58
        t[t.Key(idx)] = t.Leaf(bit)
    ctl = tables["tg_ctl"]
    leaf = ctl.Leaf()
    leaf.sel = NO_SLOT | (NO_SLOT << 8)
    leaf.state_layout = STATE_LAYOUT
    ctl[ctl.Key(0)] = leaf


def remove_pins(pin_dir: str) -> None:
    if os.path.isdir(pin_dir):
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
        os.rmdir(pin_dir)
