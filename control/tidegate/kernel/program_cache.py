"""A compiled program kept on disk, loaded again without BCC or LLVM.

When the compile child loads the program it also records what it loaded
(`record`): the instructions BCC handed to the kernel (`dump_func`), which
of them load a map's fd (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD) and which map
that is, each map's definition (type, key and value size, entries, flags,
name, pin path or none) and the tag the kernel gave the program. The agent
keeps that as <cache dir>/<program digest>.json (program.program_digest:
source, flags, BCC's version, kernel release, layouts), written whole or not at all.

A later start of the same digest with no program pinned (after `tidegate
detach`, a reboot, a new pin dir) loads it with the bpf syscalls alone
(`load`): it opens each pinned map, or creates and pins it as BCC's
BPF_TABLE_PINNED would, puts the map fds into the instructions and checks
that the kernel's tag (which leaves map fds out) is the recorded one, so
the program is the very one the compile made. Anything else raises
CacheError, and the caller drops the entry and compiles.

What it does not carry: BTF (BCC loads the program and its maps with type
information; a cached load has none, so `bpftool` dumps show raw bytes and
no source lines). The instructions, and so what the verifier checks, are
the same.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass

from tidegate.kernel import bpfsys

FORMAT = 1
KEEP = 3  # entries kept: this digest's and the two most recent others (a kernel or version rollback)
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
PSEUDO_MAP_FD = 1
PROG_TYPE_XDP = 6
_DEF_FIELDS = ("type", "key_size", "value_size", "max_entries", "flags")


class CacheError(Exception):
    """A cache entry that cannot be used (unreadable, damaged, or not the
    program the kernel would get): the caller drops it and compiles."""


@dataclass(frozen=True)
class MapDef:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pin: str | None  # where BPF_TABLE_PINNED pins it; None: made anew at each load

    def definition(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in _DEF_FIELDS)


def map_def(fd: int, pin: str | None) -> MapDef:
    mi = bpfsys.map_info(fd)
    return MapDef(mi.name.decode(errors="replace"), mi.type, mi.key_size, mi.value_size, mi.max_entries,
                  mi.map_flags, pin)  # fmt: skip


def map_loads(insns: bytes):
    """(instruction index, source register, imm) of each 64-bit immediate load."""
    if len(insns) % 8:
        raise CacheError(f"{len(insns)} bytes of instructions is not a whole number of instructions")
    i, n = 0, len(insns) // 8
    while i < n:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * 8)
        if code == LD_IMM64:
            yield i, regs >> 4, imm
            i += 2
        else:
            i += 1


# ------------------------------------------------------------ in the compile child
def record(insns: bytes, prog_fd: int, pin_dir: str, license: bytes, kern_version: int) -> dict:
    """What a load of these instructions needs (run where their map fds are open)."""
    maps: dict[str, MapDef] = {}
    relocs: list[list] = []
    names: dict[int, str] = {}
    pinned = _pinned_maps(pin_dir)  # map id -> where it is pinned (names in the kernel stop at 15 characters)
    for index, src, fd in map_loads(insns):
        if src == 0:
            continue  # a plain 64-bit constant
        if src != PSEUDO_MAP_FD:
            raise CacheError(f"instruction {index} loads a map value (source register {src}): not kept")
        if fd not in names:
            m = map_def(fd, pinned.get(bpfsys.map_info(fd).id))
            names[fd] = m.name
            maps[m.name] = m
        relocs.append([index, names[fd]])
    info = bpfsys.prog_info(prog_fd)
    entry = {
        "format": FORMAT, "prog_type": info.type, "name": info.name.decode(errors="replace"),
        "license": license.decode(), "kern_version": kern_version, "tag": bytes(info.tag).hex(),
        "insns": base64.b64encode(insns).decode(), "relocs": relocs, "maps": {n: m.__dict__ for n, m in maps.items()},
    }  # fmt: skip
    return entry


def map_fds(insns: bytes, entry: dict) -> dict[str, int]:
    """The fd each map of a record is loaded from in `insns` (the
    compile child's own fds), in the record's order of maps."""
    at = {index: fd for index, src, fd in map_loads(insns) if src == PSEUDO_MAP_FD}
    by_name: dict[str, int] = {}
    for index, name in entry["relocs"]:
        by_name.setdefault(name, at[index])
    return {name: by_name[name] for name in entry["maps"]}


def _pinned_maps(pin_dir: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(pin_dir):
        path = os.path.join(pin_dir, name)
        fd = bpfsys.obj_get(path)
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                is_map = "map_type:" in f.read()  # the program's own pin is there too
            if is_map:
                out[bpfsys.map_info(fd).id] = path
        finally:
            os.close(fd)
    return out


def _checksum(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------- on disk
def entry_path(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, f"{digest}.json")


def save(cache_dir: str, digest: str, entry: dict) -> str:
    """Write the entry of `digest` whole (tmp + rename); keep KEEP entries."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    path = entry_path(cache_dir, digest)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**entry, "digest": digest, "checksum": _checksum({**entry, "digest": digest})}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    others = sorted((p for p in os.scandir(cache_dir) if p.path != path), key=lambda p: p.stat().st_mtime,
                    reverse=True)  # fmt: skip
    for old in others[KEEP - 1:]:
        drop_path(old.path)
    return path


def drop(cache_dir: str, digest: str) -> None:
    drop_path(entry_path(cache_dir, digest))


def drop_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class Entry:
    prog_type: int
    name: str
    license: str
    kern_version: int
    tag: str
    insns: bytes
    relocs: list[tuple[int, str]]
    maps: dict[str, MapDef]


def read(cache_dir: str, digest: str) -> Entry | None:
    """The entry of `digest`, None when there is none; CacheError when it
    cannot be read or does not hold together."""
    path = entry_path(cache_dir, digest)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable: {e}") from None
    try:
        if raw.get("format") != FORMAT or raw.get("digest") != digest:
            raise CacheError(f"{path}: format {raw.get('format')!r} of digest {raw.get('digest')!r}")
        if raw.get("checksum") != _checksum(raw):
            raise CacheError(f"{path}: its checksum does not match its content (damaged)")
    except AttributeError as err:
        raise CacheError(f"{path}: malformed: {type(err).__name__}: {err}") from None
    return entry_of(raw, path)


def entry_of(raw: dict, path: str) -> Entry:
    """The entry a record holds (read from `path`, or just made by the
    compile child); CacheError when it does not hold together."""
    try:
        maps = {n: MapDef(**m) for n, m in raw["maps"].items()}
        e = Entry(int(raw["prog_type"]), str(raw["name"]), str(raw["license"]), int(raw["kern_version"]),
                  str(raw["tag"]), base64.b64decode(raw["insns"], validate=True),
                  [(int(i), str(n)) for i, n in raw["relocs"]], maps)  # fmt: skip
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CacheError(f"{path}: malformed: {type(err).__name__}: {err}") from None
    loads = {i: src for i, src, _ in map_loads(e.insns)}
    for index, name in e.relocs:
        if loads.get(index) != PSEUDO_MAP_FD or name not in maps:
            raise CacheError(f"{path}: instruction {index} is not a load of map {name!r}")
    return e


# ------------------------------------------------------------------ loading
def load(e: Entry, prog_pin: str) -> int:
    """Load the entry's program against its maps and pin it at prog_pin;
    returns its fd. CacheError when the kernel refuses it or gives it
    another tag, or a pinned map has another definition."""
    fds: dict[str, int] = {}
    try:
        for name, m in e.maps.items():
            fds[name] = open_or_create(m)
        fd = _load_program(e, fds)
    finally:
        _close(fds.values())
    try:
        _pin_program(fd, prog_pin)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Unpinned:
    """A cached program loaded against maps of its own, nothing pinned:
    the process's exit frees all of it."""

    entry: Entry
    prog_fd: int
    map_fds: dict[str, int]

    def close(self) -> None:
        _close([self.prog_fd, *self.map_fds.values()])


def load_unpinned(e: Entry) -> Unpinned:
    """The entry's program loaded (verified, tag checked) against new maps,
    none pinned: what a start with an empty pin dir can do before it is
    sure to go on (pin_unpinned then pins it all)."""
    fds: dict[str, int] = {}
    try:
        for name, m in e.maps.items():
            fds[name] = open_or_create(MapDef(**{**m.__dict__, "pin": None}))
        return Unpinned(e, _load_program(e, fds), fds)
    except BaseException:
        _close(fds.values())
        raise


def pin_unpinned(u: Unpinned, prog_pin: str) -> int:
    """Pin u's maps where BPF_TABLE_PINNED pins them and its program at
    prog_pin; returns the program's fd (u's other fds are closed).
    CacheError, with nothing of u left pinned, when a map is pinned there
    already (the pin dir is no longer the empty one u was made for)."""
    done: list[str] = []
    try:
        for name, m in u.entry.maps.items():
            if m.pin is not None:
                try:
                    bpfsys.obj_pin(u.map_fds[name], m.pin)
                except bpfsys.BpfError as err:
                    raise CacheError(f"pinning map {name} at {m.pin}: {err}") from None
                done.append(m.pin)
        _pin_program(u.prog_fd, prog_pin)
    except BaseException:
        for path in done:
            drop_path(path)
        u.close()
        raise
    _close(u.map_fds.values())
    return u.prog_fd


def _load_program(e: Entry, fds: dict[str, int]) -> int:
    code = bytearray(e.insns)
    for index, name in e.relocs:
        struct.pack_into("<i", code, index * 8 + 4, fds[name])
    try:
        fd = bpfsys.prog_load(e.prog_type, bytes(code), e.license.encode(), e.name.encode(), e.kern_version)
    except bpfsys.BpfError as err:
        raise CacheError(f"the kernel refused the cached program: {err}") from None
    tag = bpfsys.prog_tag(fd)
    if tag != e.tag:
        os.close(fd)
        raise CacheError(f"the kernel gave the cached program tag {tag}, the compiled one had {e.tag}")
    return fd


def _pin_program(fd: int, prog_pin: str) -> None:
    tmp = f"{prog_pin}_tmp{os.getpid()}"  # bpffs names take no dots
    bpfsys.obj_pin(fd, tmp)
    os.replace(tmp, prog_pin)


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def open_or_create(m: MapDef) -> int:
    """The pinned map (of the same definition), or a new one, pinned where
    BPF_TABLE_PINNED pins it; an unpinned map is always new."""
    if m.pin is not None:
        try:
            fd = bpfsys.obj_get(m.pin)
        except bpfsys.BpfError as err:
            if err.errno != errno.ENOENT:
                raise CacheError(f"opening the pinned map {m.pin}: {err}") from None
        else:
            got = map_def(fd, m.pin)
            if got.definition() != m.definition():
                os.close(fd)
                raise CacheError(f"the pinned map {m.pin} is {dict(zip(_DEF_FIELDS, got.definition()))}, "
                                 f"the compiled program used {dict(zip(_DEF_FIELDS, m.definition()))}")  # fmt: skip
            return fd
    try:
        fd = bpfsys.map_create(m.type, m.key_size, m.value_size, m.max_entries, m.flags, m.name.encode())
    except bpfsys.BpfError as err:
        raise CacheError(f"creating map {m.name}: {err}") from None
    if m.pin is not None:
        try:
            bpfsys.obj_pin(fd, m.pin)
        except bpfsys.BpfError as err:
            os.close(fd)
            raise CacheError(f"pinning map {m.name} at {m.pin}: {err}") from None
    return fd
