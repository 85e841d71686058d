"""Which program the agent runs, found without compiling when possible.

A program is named by a digest of what decides its instructions: the
inlined source, the compile flags (pin dir, map sizes, build options) and
the kernel release. The compile child (compiler.py) pins the program it
loads at <pin dir>/prog_<digest>; a later start with the same digest opens
that pin (no compile, no BCC) and gets the maps from the program itself,
so the agent works on exactly the maps the program uses. With no pin but a
cache entry of the digest (program_cache.py: what an earlier compile
loaded, kept in the agent's state dir), it loads that without compiling.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tidegate.kernel import bpfsys, compiler, program_cache
from tidegate.kernel.compiler import compile_in_child
from tidegate.kernel.layout import LAYOUTS
from tidegate.kernel.pinned_maps import PinnedMap

log = logging.getLogger("tidegate.kernel.filter")

PROG_PIN_PREFIX = "prog_"


# the agent's view of the map layouts is part of what it can adopt
LAYOUTS_DIGEST = repr(sorted((n, k.__name__, v.__name__, p) for n, (k, v, p) in LAYOUTS.items()))


def compiler_version() -> str:
    """The version of the BCC that would compile (its version.py, read as text: importing bcc would
    load LLVM into the agent); "" without BCC."""
    spec = importlib.util.find_spec("bcc")
    try:
        return Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except OSError:
        return ""


def program_digest(source: str, cflags: list[str]) -> str:
    """What names a program: its inlined source, build options, the compiler, the kernel. A BCC
    upgrade compiles again instead of reusing what the older one made (pinned or cached)."""
    h = hashlib.sha256()
    for part in (source, "\0".join(cflags), compiler_version(), platform.release(), LAYOUTS_DIGEST):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def prog_pin_path(pin_dir: str, digest: str) -> str:
    return os.path.join(pin_dir, PROG_PIN_PREFIX + digest)


def program_pins(pin_dir: str) -> list[str]:
    """The program pins in a pin dir (names only)."""
    try:
        return sorted(n for n in os.listdir(pin_dir) if n.startswith(PROG_PIN_PREFIX) and "_tmp" not in n)
    except FileNotFoundError:
        return []


@dataclass
class Program:
    fd: int
    digest: str
    compiled: bool  # a compile child ran for this start
    compile_seconds: float
    child_pid: int | None = None
    origin: str = "compiled"  # pinned | cached | compiled: where this start got the program
    seconds: float = 0.0  # how long getting it took (open, load from the cache, or compile)


def _uses_pinned_maps(prog_fd: int, pin_dir: str) -> bool:
    """A pinned program is adoptable only if the maps it uses are the pinned
    ones (a pinned counter map made anew for a new size is not)."""
    ids = set(bpfsys.prog_map_ids(prog_fd))
    for name in os.listdir(pin_dir):
        if name.startswith(PROG_PIN_PREFIX) or name not in LAYOUTS:
            continue
        fd = bpfsys.obj_get(os.path.join(pin_dir, name))
        try:
            if bpfsys.map_info(fd).id not in ids:
                return False
        finally:
            os.close(fd)
    return True


def open_or_compile(source: str, cflags: list[str], pin_dir: str, cache_dir: str | None = None) -> Program:
    """The pinned program of this digest, the cached one, or a newly
    compiled one (in a child; compiler.CompileError when that fails)."""
    t0 = time.monotonic()
    digest = program_digest(source, cflags)
    path = prog_pin_path(pin_dir, digest)
    if os.path.exists(path):
        fd = bpfsys.obj_get(path)
        if _uses_pinned_maps(fd, pin_dir):
            took = time.monotonic() - t0
            log.info("program found pinned: not compiling", extra={"digest": digest, "pin": path, "s": round(took, 3)})
            compiler.cancel_ahead()
            _take_ahead(None, path)
            return Program(fd, digest, False, 0.0, origin="pinned", seconds=took)
        os.close(fd)
        log.warning("the pinned program does not use the pinned maps: compiling it again", extra={"pin": path})
        os.unlink(path)
    fd, res = _take_ahead(digest, path, cache_dir)
    if res is not None:  # compiled beside the agent's imports (compile_ahead), pinned now
        _compiled(digest, res)
        return Program(fd, digest, True, res["child_s"], res["pid"], seconds=time.monotonic() - t0)
    if cache_dir is not None:
        ahead = fd is not None
        if fd is None:
            fd = _load_cached(cache_dir, digest, path)
        if fd is not None:
            took = time.monotonic() - t0
            log.info("program loaded from the cache: not compiling", extra={
                "digest": digest, "cache": program_cache.entry_path(cache_dir, digest), "s": round(took, 3),
                "loaded_ahead": ahead})  # fmt: skip
            compiler.cancel_ahead()
            return Program(fd, digest, False, 0.0, origin="cached", seconds=took)
    log.info("compiling the program in a child process", extra={"digest": digest})
    res = compile_in_child(source, cflags, path)  # CompileError: the caller words it
    _compiled(digest, res)
    if cache_dir is not None:
        _keep(cache_dir, digest, res)
    return Program(bpfsys.obj_get(path), digest, True, res["child_s"], res["pid"], seconds=time.monotonic() - t0)


def compile_likely(pin_dir: str, cache_dir: str | None) -> bool:
    """A start that will most likely compile: no program pinned in its pin
    dir and nothing in its cache (a first start, or one after an upgrade
    removed both); cheap enough to ask before the agent's imports."""
    if program_pins(pin_dir):
        return False
    try:
        return cache_dir is None or not any(n.endswith(".json") for n in os.listdir(cache_dir))
    except FileNotFoundError:
        return True


def _compiled(digest: str, res: dict) -> None:
    log.info("program compiled", extra={"digest": digest, "compile_s": res["compile_s"], "child_pid": res["pid"],
                                        "child_s": round(res["child_s"], 3), "started_ahead": res["ahead"],
                                        "compiled_ahead": "maps" in res, "tag": res["tag"],
                                        "short_kernel_symbols": res.get("short_kernel_symbols")})  # fmt: skip


@dataclass
class _Ahead:
    digest: str
    thread: threading.Thread
    box: list  # what it got: a program_cache.Unpinned, (Unpinned, the compile's result), or the exception


_ahead: _Ahead | None = None  # what load_ahead or compile_ahead started, not yet taken


def load_ahead(cache_dir: str, digest: str) -> None:
    """Load the cached program of `digest` in a thread, against maps of its
    own and with nothing pinned (program_cache.load_unpinned), while the
    agent imports its modules: the kernel's verifier, most of a start from
    the cache, runs beside them. Only for an empty pin dir; open_or_compile
    pins it when the start goes on, and a start that stops before leaves
    nothing behind."""
    global _ahead
    box: list = []

    def run() -> None:
        try:
            entry = program_cache.read(cache_dir, digest)
            if entry is not None:
                box.append(program_cache.load_unpinned(entry))
        except Exception as e:  # noqa: BLE001 - handed to the load, which tries again and says why
            box.append(e)

    t = threading.Thread(target=run, name="cached-program-ahead", daemon=True)
    t.start()
    _ahead = _Ahead(digest, t, box)


def compile_ahead(source: str, cflags: list[str], pin_dir: str) -> None:
    """Compile the program in a child beside the agent's imports, for a
    first start (an empty pin dir): the child pins on a bpf filesystem of
    its own (compiler.compile_unpinned) and hands the program and its new
    maps over by fd, pinned nowhere until open_or_compile pins them when the
    start goes on; a start that stops before leaves nothing behind."""
    global _ahead
    box: list = []

    def run() -> None:
        try:
            res, fds = compiler.compile_unpinned(source, cflags, pin_dir)
        except Exception as e:  # noqa: BLE001 - handed to the load, which compiles again and says why
            box.append(e)
            return
        try:
            entry = program_cache.entry_of(res["record"], "the compile child's record")
            box.append((program_cache.Unpinned(entry, fds[0], dict(zip(res["maps"], fds[1:]))), res))
        except Exception as e:  # noqa: BLE001 - as above
            for fd in fds:
                os.close(fd)
            box.append(e)

    t = threading.Thread(target=run, name="compile-ahead", daemon=True)
    t.start()
    _ahead = _Ahead(program_digest(source, cflags), t, box)


def _take_ahead(digest: str | None, prog_pin: str, cache_dir: str | None = None) -> tuple[int | None, dict | None]:
    """The program load_ahead loaded or compile_ahead compiled, pinned now,
    if it is of `digest` and its pins are free, with the compile's result
    (None for a cached load); (None, None) otherwise (what it got is
    closed). A compile's record is kept in cache_dir first: if its pins are
    taken, the cached load after this uses it against the pinned maps."""
    global _ahead
    if _ahead is None:
        return None, None
    ahead, _ahead = _ahead, None
    ahead.thread.join()
    got = ahead.box[0] if ahead.box else None
    res = None
    if isinstance(got, tuple):
        got, res = got
    if not isinstance(got, program_cache.Unpinned):
        if got is not None and digest is not None:
            log.info("what was started ahead is not used", extra={"error": f"{type(got).__name__}: {got}"})
        return None, None  # none, or an error the load below meets again and logs
    if ahead.digest != digest:
        got.close()
        return None, None
    if res is not None and cache_dir is not None:
        _keep(cache_dir, digest, res)
    try:
        return program_cache.pin_unpinned(got, prog_pin), res
    except (program_cache.CacheError, bpfsys.BpfError, OSError) as e:
        log.info("the program loaded ahead is not used: loading it again", extra={"error": str(e)})
        return None, None


def _load_cached(cache_dir: str, digest: str, prog_pin: str) -> int | None:
    """The program of the cache entry of `digest`, loaded and pinned; None
    when there is no entry or it cannot be used (then it is dropped)."""
    try:
        entry = program_cache.read(cache_dir, digest)
        if entry is None:
            return None
        return program_cache.load(entry, prog_pin)
    except (program_cache.CacheError, bpfsys.BpfError, OSError) as e:
        log.warning("the cached program is not usable: dropped, compiling instead",
                    extra={"digest": digest, "error": str(e)})  # fmt: skip
        program_cache.drop(cache_dir, digest)
        return None


def _keep(cache_dir: str, digest: str, res: dict) -> None:
    """Keep what the compile child loaded for the next start of this digest."""
    if res.get("record") is None:
        log.warning("the compiled program is not kept: the next start compiles again",
                    extra={"error": res.get("record_error", "nothing recorded")})  # fmt: skip
        return
    try:
        path = program_cache.save(cache_dir, digest, res["record"])
    except OSError as e:
        log.warning("the compiled program is not kept: the next start compiles again", extra={"error": str(e)})
    else:
        log.info("compiled program kept for the next start", extra={"cache": path})


def repin(fd: int, pin_dir: str, digest: str) -> None:
    """Pin fd as the program of `digest` (adopting an attached program that
    an agent without program pins left)."""
    path = prog_pin_path(pin_dir, digest)
    tmp = f"{path}_tmp{os.getpid()}"  # bpffs names take no dots
    bpfsys.obj_pin(fd, tmp)
    os.replace(tmp, path)


def drop_other_pins(pin_dir: str, digest: str) -> None:
    """Unpin programs of other digests (replaced ones): the kernel frees them
    once nothing else holds them. Called by the one agent of a pin dir."""
    keep = PROG_PIN_PREFIX + digest
    for name in os.listdir(pin_dir):
        # and pins a compile child left half-way (killed before its rename)
        if name.startswith(PROG_PIN_PREFIX) and name != keep:
            try:
                os.unlink(os.path.join(pin_dir, name))
            except FileNotFoundError:
                pass


def open_maps(prog_fd: int) -> dict[str, PinnedMap]:
    """The program's maps by name, opened from its map ids."""
    out: dict[str, PinnedMap] = {}
    for map_id in bpfsys.prog_map_ids(prog_fd):
        fd = bpfsys.map_fd_by_id(map_id)
        name = bpfsys.map_info(fd).name.decode(errors="replace")
        if name in LAYOUTS and name not in out:
            out[name] = PinnedMap(name, fd)
        else:
            os.close(fd)
    return out
