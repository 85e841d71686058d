"""A compiled program kept on disk and loaded again without compiling.

The real program is compiled once (in its child) with a cache dir; then,
with its program and maps unpinned (as `tidegate detach` leaves them), a
new load finds the cache entry: no compile child runs, BCC is not
imported, the kernel gives the program the compiled one's tag, the maps it
creates and pins have the definitions BCC gave them, and every verdict
case of test_verdicts.py comes out the same. A damaged entry is dropped
with one clear warning and the program compiled; a changed source (another
digest) is compiled."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tidegate.daemon import early
from tidegate.kernel import bpfsys, compiler, loader, program, program_cache
from tidegate.kernel.compiler import CompileError
from tidegate.kernel.filter import FilterConfig, KernelError, KernelFilter

from .conftest import ReplayFilter
from .test_verdicts import CASES, RULES

pytestmark = pytest.mark.kernel

DROPPED = "the cached program is not usable: dropped, compiling instead"
CASE_NAMES = list(CASES)[:8]  # deny, allow, buckets, prefixes, IPv6: enough to tell two programs apart


def _config(cache_dir) -> FilterConfig:
    # the replay build: its clock map is the one map BCC does not pin (a cached load makes it anew)
    return FilterConfig(interface=None, pin_name=f"test-pcache-{os.getpid()}", replay_clock=True,
                        max_sources=65536, cache_dir=str(cache_dir))  # fmt: skip


def _map_defs(kf: KernelFilter) -> dict[str, tuple]:
    """Each map of the loaded program as the kernel describes it (id aside)."""
    out = {}
    for map_id in bpfsys.prog_map_ids(kf.prog_fd):
        fd = bpfsys.map_fd_by_id(map_id)
        try:
            mi = bpfsys.map_info(fd)
            out[mi.name.decode()] = (mi.type, mi.key_size, mi.value_size, mi.max_entries, mi.map_flags)
        finally:
            os.close(fd)
    return out


def _verdicts(kf: KernelFilter) -> dict[str, list[tuple[str, str]]]:
    f = ReplayFilter(kf)
    out = {}
    for name in CASE_NAMES:
        f.apply(RULES)
        out[name] = [(s.verdict, s.reason) for ms, frame, _, _ in CASES[name] for s in [f.at(ms).send(frame)]]
    return out


def _unpinned(kf: KernelFilter) -> None:
    kf.close()
    kf.remove_pins()  # what `tidegate detach` leaves: no program, no maps


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The program compiled once with a cache dir: its entry, tag, maps and verdicts."""
    cache = tmp_path_factory.mktemp("pcache")
    kf = KernelFilter(_config(cache))
    res = kf.load()
    try:
        assert res.compiled and res.origin == "compiled"
        digest = kf._prog.digest
        tag, defs, verdicts = bpfsys.prog_tag(kf.prog_fd), _map_defs(kf), _verdicts(kf)
    finally:
        _unpinned(kf)
    entry = program_cache.entry_path(str(cache), digest)
    assert os.listdir(cache) == [os.path.basename(entry)], "the compile kept one entry, named by the digest"
    return {"cache": cache, "entry": entry, "digest": digest, "tag": tag, "defs": defs, "verdicts": verdicts}


@pytest.fixture
def compiles(monkeypatch):
    """The compile children started during a test."""
    seen: list = []
    real = program.compile_in_child
    monkeypatch.setattr(program, "compile_in_child", lambda *a: seen.append(a) or real(*a))
    return seen


def test_a_cached_program_loads_without_compiling_and_is_the_compiled_one(compiled, compiles, caplog):
    caplog.set_level(logging.INFO, logger="tidegate.kernel.filter")
    compiler.start_ahead()  # a compile child started ahead on a wrong guess: ended unused
    ahead = compiler._ahead
    kf = KernelFilter(_config(compiled["cache"]))
    res = kf.load()
    try:
        assert compiles == [] and not res.compiled and res.origin == "cached", "a cached program was compiled"
        assert ahead.returncode == 0 and compiler._ahead is None, "the child started ahead was ended, unused"
        assert "bcc" not in sys.modules and "compiling the program in a child process" not in caplog.text
        assert "program loaded from the cache: not compiling" in caplog.text
        assert res.fresh_maps, "the maps were made anew (nothing was pinned)"
        assert bpfsys.prog_tag(kf.prog_fd) == compiled["tag"], "the kernel sees other instructions"
        assert bpfsys.prog_info(kf.prog_fd).name.decode() == "tidegate_xdp"
        # the maps this load created and pinned against those BCC created for the compile
        assert _map_defs(kf) == compiled["defs"]
        assert {"tg_cidrs4", "tg_state", "tg_clock"} <= compiled["defs"].keys()
        assert compiled["defs"]["tg_cidrs4"][4] == 1, "lpm_trie: BPF_F_NO_PREALLOC"
        assert compiled["defs"]["tg_state"][4] == 2, "lru_hash: BPF_F_NO_COMMON_LRU"
        pins = sorted(n for n in os.listdir(kf.config.pin_dir) if not n.startswith(program.PROG_PIN_PREFIX))
        assert pins == sorted(compiled["defs"].keys() - {"tg_clock"}), "pinned where BPF_TABLE_PINNED pins"
        assert program.program_pins(kf.config.pin_dir) == [program.PROG_PIN_PREFIX + compiled["digest"]]
        assert _verdicts(kf) == compiled["verdicts"]
        assert compiled["verdicts"]["deny list drops"] == [("drop", "deny")] * 2, "the cases do tell verdicts apart"
    finally:
        kf.close()

    # the program pinned now: the next load opens that pin, the cache is not read
    again = KernelFilter(_config(compiled["cache"]))
    try:
        assert again.load().origin == "pinned" and compiles == []
    finally:
        _unpinned(again)


def _damage(entry: dict, how: str, text: str) -> str:
    if how == "truncated":
        return text[: len(text) // 2]
    if how == "bit flip":
        insns = bytearray(base64.b64decode(entry["insns"]))
        insns[40] ^= 0x01
        return json.dumps({**entry, "insns": base64.b64encode(bytes(insns)).decode()})
    # a well-formed entry whose instructions are not those of the recorded tag
    body = {k: v for k, v in entry.items() if k != "checksum"} | {"tag": "00" * 8}
    return json.dumps(body | {"checksum": program_cache._checksum(body)})


DAMAGE = [
    ("truncated", "unreadable"),
    ("bit flip", "checksum does not match"),
    ("wrong tag", "the kernel gave the cached program tag"),
]


@pytest.mark.parametrize("how, words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_cache_entry_is_refused_dropped_and_nothing_is_pinned(compiled, caplog, tmp_path, how, words):
    cache = tmp_path / "cache"
    cache.mkdir()
    text = open(compiled["entry"]).read()
    path = cache / os.path.basename(compiled["entry"])
    path.write_text(_damage(json.loads(text), how, text))
    pin_dir = _config(cache).pin_dir
    os.makedirs(pin_dir)
    prog_pin = program.prog_pin_path(pin_dir, compiled["digest"])
    try:
        assert program._load_cached(str(cache), compiled["digest"], prog_pin) is None
        warned = [r for r in caplog.records if r.getMessage() == DROPPED]
        assert len(warned) == 1 and words in warned[0].error, [r.__dict__.get("error") for r in warned]
        assert not path.exists(), "the damaged entry was dropped"
        assert program.program_pins(pin_dir) == [], "a refused program was pinned"
    finally:
        loader.remove_pins(pin_dir)


def test_a_damaged_cache_entry_falls_back_to_compiling(compiled, compiles, caplog, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    text = open(compiled["entry"]).read()
    (cache / os.path.basename(compiled["entry"])).write_text(_damage(json.loads(text), "bit flip", text))
    caplog.set_level(logging.INFO, logger="tidegate.kernel.filter")
    compiler.start_ahead()  # as `tidegate agent` does when a compile is likely: this one is used
    ahead = compiler._ahead
    kf = KernelFilter(_config(cache))
    res = kf.load()
    try:
        assert DROPPED in caplog.text and "compiling the program in a child process" in caplog.text
        assert len(compiles) == 1 and res.compiled and res.origin == "compiled"
        done = [r for r in caplog.records if r.getMessage() == "program compiled"]
        assert done[0].started_ahead and done[0].child_pid == ahead.pid and compiler._ahead is None
        assert bpfsys.prog_tag(kf.prog_fd) == compiled["tag"]
        assert program_cache.read(str(cache), compiled["digest"]) is not None, "the compile kept a good entry again"
    finally:
        _unpinned(kf)


def test_a_changed_source_is_compiled(compiled, caplog, tmp_path, monkeypatch):
    """Another digest has no entry: the load goes to the compile (stopped
    there: test_a_damaged_cache_entry_falls_back_to_compiling runs one) and
    the other digest's entry is left alone."""
    cache = tmp_path / "cache"
    shutil.copytree(compiled["cache"], cache)
    src = tmp_path / "bpf"
    shutil.copytree(loader.bpf_source_dir(), src)
    with open(src / "tidegate.c", "a") as f:
        f.write("\n/* a changed source: another digest */\n")
    monkeypatch.setenv("TIDEGATE_BPF_DIR", str(src))
    started: list = []

    def stop_at_the_compile(source, cflags, prog_pin):
        started.append(prog_pin)
        raise CompileError("stopped by the test")

    monkeypatch.setattr(program, "compile_in_child", stop_at_the_compile)
    caplog.set_level(logging.INFO, logger="tidegate.kernel.filter")
    kf = KernelFilter(_config(cache))
    try:
        with pytest.raises(KernelError, match="stopped by the test"):
            kf.load()
        assert len(started) == 1 and compiled["digest"] not in started[0], "the changed source was compiled"
        assert "from the cache" not in caplog.text and DROPPED not in caplog.text
        assert os.listdir(cache) == [os.path.basename(compiled["entry"])], "the other digest's entry was kept"
    finally:
        _unpinned(kf)


def test_a_pinned_map_of_another_definition_is_refused_and_a_missing_one_made_like_bcc(tmp_path):
    """BCC reuses a pinned map whatever its definition; a cached load refuses
    one that differs from what the compile used (the caller then compiles),
    and makes a missing one with the recorded definition and name."""
    pin_dir = f"/sys/fs/bpf/tidegate/test-pcache-map-{os.getpid()}"
    os.makedirs(pin_dir)
    try:
        want = program_cache.MapDef("tg_lru", 6, 4, 8, 2, 0, f"{pin_dir}/tg_lru")  # a per-CPU array of 2 u64
        fd = bpfsys.map_create(2, 4, 4, 64, 0, b"tg_lru")
        bpfsys.obj_pin(fd, want.pin)
        os.close(fd)
        with pytest.raises(program_cache.CacheError, match="the pinned map .*/tg_lru is .*'type': 2"):
            program_cache.open_or_create(want)
        os.unlink(want.pin)
        fd = program_cache.open_or_create(want)
        try:
            assert program_cache.map_def(fd, want.pin) == want and os.path.exists(want.pin)
        finally:
            os.close(fd)
        again = program_cache.open_or_create(want)  # now pinned: opened, the same map
        try:
            assert program_cache.map_def(again, want.pin) == want
        finally:
            os.close(again)
    finally:
        loader.remove_pins(pin_dir)


@pytest.mark.parametrize("pinned, cached, likely", [(False, False, True), (False, True, False), (True, False, False)])
def test_the_agent_starts_a_compile_child_ahead_only_when_a_compile_is_likely(tmp_path, pinned, cached, likely):
    """`tidegate agent` reads its pin and state dirs before its imports: a
    first start (nothing pinned or cached) has the compile child load BCC
    beside them; any other start starts none."""
    pin_dir, state = tmp_path / "pins" / "eth9", tmp_path / "state"
    pin_dir.mkdir(parents=True)
    if pinned:
        (pin_dir / f"{program.PROG_PIN_PREFIX}0").touch()
    if cached:
        (state / "program-cache").mkdir(parents=True)
        (state / "program-cache" / "0.json").write_text("{}")
    argv = ["--interface", "eth9", "--pin-root", str(tmp_path / "pins"), "--state-dir", str(state), "--listen", "x"]
    try:
        assert early.start_ahead(argv) == ("compile" if likely else None)
        assert (compiler._ahead is not None) is likely and program._ahead is None
    finally:
        compiler.cancel_ahead()


def test_a_cached_program_loaded_ahead_is_pinned_only_when_the_start_goes_on(compiled, compiles, caplog, tmp_path):
    """After a reboot or a detach `tidegate agent` loads the cached program
    in a thread beside its imports, against maps of its own and pinning
    nothing: a start that stops before the kernel leaves nothing behind; one
    that goes on pins those maps and the program, the compiled one."""
    cfg = _config(compiled["cache"])
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / early.PROGRAM_CACHE).symlink_to(compiled["cache"])
    argv = ["-i", "x", "--pin-name", cfg.pin_name, "--state-dir", str(tmp_path / "state"), "--max-sources", "65536"]
    assert early.start_ahead(argv) is None, "the agent's build (no replay clock) is not cached: nothing started"
    assert program._ahead is None and compiler._ahead is None
    program.load_ahead(cfg.cache_dir, compiled["digest"])
    program._take_ahead(None, "unused")  # a start that stopped first (or found its program pinned)
    assert not os.path.exists(cfg.pin_dir), "a program loaded ahead and not used pinned something"

    caplog.set_level(logging.INFO, logger="tidegate.kernel.filter")
    program.load_ahead(cfg.cache_dir, compiled["digest"])
    kf = KernelFilter(cfg)
    res = kf.load()
    try:
        assert compiles == [] and res.origin == "cached" and program._ahead is None
        loaded = [r for r in caplog.records if r.getMessage() == "program loaded from the cache: not compiling"]
        assert loaded[0].loaded_ahead is True
        assert bpfsys.prog_tag(kf.prog_fd) == compiled["tag"] and _map_defs(kf) == compiled["defs"]
        pins = sorted(n for n in os.listdir(kf.config.pin_dir) if not n.startswith(program.PROG_PIN_PREFIX))
        assert pins == sorted(compiled["defs"].keys() - {"tg_clock"})
        assert _verdicts(kf)["deny list drops"] == compiled["verdicts"]["deny list drops"]
    finally:
        _unpinned(kf)

    # a map pinned in between: what was loaded ahead is dropped whole, the pinned map is used
    program.load_ahead(cfg.cache_dir, compiled["digest"])
    os.makedirs(cfg.pin_dir)
    m = compiled["defs"]["tg_debruijn"]
    fd = bpfsys.map_create(*m[:4], m[4], b"tg_debruijn")
    bpfsys.obj_pin(fd, f"{cfg.pin_dir}/tg_debruijn")
    mine = bpfsys.map_info(fd).id
    os.close(fd)
    caplog.clear()
    kf = KernelFilter(cfg)
    res = kf.load()
    try:
        assert compiles == [] and res.origin == "cached" and "the program loaded ahead is not used" in caplog.text
        assert mine in bpfsys.prog_map_ids(kf.prog_fd), "the map pinned in between is the program's"
        assert bpfsys.prog_tag(kf.prog_fd) == compiled["tag"]
    finally:
        _unpinned(kf)


def _host_pins_named(fragment: str) -> list[str]:
    """What the host's bpf filesystem holds (pins and dirs) with `fragment` in its name."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(compiler.BPF_ROOT) for n in dirs + files if fragment in n]


def test_a_program_compiled_ahead_is_pinned_only_when_the_start_goes_on(compiled, compiles, caplog, tmp_path):
    """A first start (an empty pin dir) compiles beside the agent's imports,
    in a child whose bpf filesystem is its own: a start that stops before the
    kernel leaves nothing on the host's bpf filesystem; one that goes on pins
    the maps and program that child made and handed over: the compiled
    program, its maps, its verdicts, and its record kept in the cache."""
    cfg = _config(tmp_path / "cache")
    source, flags = loader.program_source(), loader.cflags(cfg)
    program.compile_ahead(source, flags, cfg.pin_dir)
    program._take_ahead(None, "unused")  # a start that stopped first
    try:
        assert not os.path.exists(cfg.pin_dir) and _host_pins_named(cfg.pin_name) == [], "compiled ahead, unused: pinned"
    except AssertionError:
        loader.remove_pins(cfg.pin_dir)  # what it left on the host
        raise

    caplog.set_level(logging.INFO, logger="tidegate.kernel.filter")
    program.compile_ahead(source, flags, cfg.pin_dir)
    kf = KernelFilter(cfg)
    res = kf.load()
    try:
        assert compiles == [] and res.compiled and res.origin == "compiled" and program._ahead is None
        done = [r for r in caplog.records if r.getMessage() == "program compiled"]
        assert len(done) == 1 and done[0].compiled_ahead is True and done[0].short_kernel_symbols is True
        assert bpfsys.prog_tag(kf.prog_fd) == compiled["tag"] and _map_defs(kf) == compiled["defs"]
        pins = sorted(n for n in os.listdir(cfg.pin_dir) if not n.startswith(program.PROG_PIN_PREFIX))
        assert pins == sorted(compiled["defs"].keys() - {"tg_clock"})
        assert program.program_pins(cfg.pin_dir) == [program.PROG_PIN_PREFIX + compiled["digest"]]
        assert program_cache.read(cfg.cache_dir, compiled["digest"]) is not None, "its record is the cache entry"
        assert _verdicts(kf) == compiled["verdicts"]
    finally:
        _unpinned(kf)


def test_a_first_start_on_the_bpf_filesystem_compiles_ahead_once(tmp_path):
    """`tidegate agent` with nothing pinned or cached under /sys/fs/bpf
    compiles before its imports; the agent verb asking again after them
    starts nothing more (cli/entry.py, then cli/delegated.py)."""
    name = f"test-early-{os.getpid()}"
    argv = ["-i", "x", "--pin-name", name, "--state-dir", str(tmp_path / "state"), "--max-sources", "65536"]
    try:
        assert early.start_ahead_once(argv) == "compiling"
        first = program._ahead
        assert first is not None and compiler._ahead is None
        assert early.start_ahead_once(argv) == "compiling" and program._ahead is first, "started twice"
    finally:
        program._take_ahead(None, "unused")
        early._started.clear()
    assert _host_pins_named(name) == [], "a compile ahead that no start used pinned something"

    # where a mount namespace of its own is refused (here: no CAP_SYS_ADMIN; the shipped systemd units:
    # RestrictNamespaces=, no @mount calls), the compile child only loads BCC and waits for the source
    ask = "import sys; from tidegate.daemon import early; print(early.start_ahead(sys.argv[1:]))"
    r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c", ask, *argv],
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True,
                       timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout.split()[-1:] == ["compile"], r.stdout + r.stderr
    assert compiler.own_bpffs_allowed(), "as root here, the compile's own mounts are allowed"


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(c) for c in f.read().split()]
    return kids


def _alive(pid: int) -> bool:
    """Running, sleeping or stopped: not gone and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_compile_ahead_ends_with_the_agent_it_compiles_for(tmp_path):
    """An agent killed during its first start's compile ahead takes the
    compile along: the child, stopped so that it could not end on its own,
    is killed with it, and nothing is pinned."""
    name = f"test-pdeath-{os.getpid()}"
    argv = ["-i", "x", "--pin-name", name, "--state-dir", str(tmp_path / "state"), "--max-sources", "65536"]
    ask = ("import sys, time; from tidegate.daemon import early; "
           "print(early.start_ahead(sys.argv[1:]), flush=True); time.sleep(120)")  # fmt: skip
    agent = subprocess.Popen([sys.executable, "-c", ask, *argv], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = None
    try:
        assert agent.stdout.readline().split() == ["compiling"]
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            # the child is in its own mount namespace once it has read its job (and asked to end with the agent)
            for pid in _children(agent.pid):
                try:
                    if os.readlink(f"/proc/{pid}/ns/mnt") != ours:
                        child = pid
                except FileNotFoundError:
                    pass
            time.sleep(0.005)
        assert child is not None, "no compile child in a mount namespace of its own"
        os.kill(child, signal.SIGSTOP)  # stopped, it could never finish on its own
        agent.kill()
        agent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the compile child outlived the agent that started it"
    finally:
        agent.kill()
        agent.wait(timeout=30)
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
    assert _host_pins_named(name) == []
