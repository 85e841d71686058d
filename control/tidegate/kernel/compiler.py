"""Compile and load the XDP program in a short-lived child process.

BCC (and with it LLVM and clang, hundreds of MB) lives only in this child:
it compiles the program, loads it into the kernel against the pinned maps
(creating them on a first start), checks that the maps have the layouts the
agent reads them with (layout.LAYOUTS), pins the program, prints one
JSON line and exits: the program's id and tag, and what it loaded
(program_cache.record) for the agent to keep on disk, so that a later
start loads the same instructions without compiling. The agent then opens
the pinned program and maps by fd and never loads BCC itself.

    python -m tidegate.kernel.compiler < {"prog_pin": PATH, "cflags": [...]} NEWLINE inlined-source

The child can be started ahead (start_ahead): it loads BCC first and only
then reads its job, so that load overlaps the agent's own imports.

Or it compiles before the agent knows it will go on (compile_unpinned,
for a first start with an empty pin dir): in a mount namespace of its own
with a bpf filesystem of its own on /sys/fs/bpf, so the maps BCC creates
and pins, new ones as in an empty pin dir, are pinned where the host never
sees them. It hands the program's and the maps' fds over a unix socket
(SCM_RIGHTS) and exits; the agent pins them when its start gets to the
kernel (program.compile_ahead), and a start that stops before leaves
nothing behind. That child ends with the agent (_ends_with_parent): an
agent killed while it compiles takes the compile along.

BCC reads the whole of /proc/kallsyms (over 100,000 symbols, into a hash
table, and frees it again) at every compile, only to learn whether the
kernel has bpf_probe_read_kernel and bpf_probe_read_user: how to spell a
read of kernel memory, which this XDP program never does: about 0.2 s of
CPU per compile here (bench/compile_time.py). So the child compiles in a
mount namespace of its own where /proc/kallsyms names those two helpers
only (own_mounts); the instructions are the same
(tests/kernel/test_kernel_defs.py). Where it cannot (no CAP_SYS_ADMIN, or
the shipped systemd units: RestrictNamespaces=, no @mount system calls),
it compiles with the whole table, as BCC would.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tidegate.kernel import bpfsys, program_cache
from tidegate.kernel.layout import LAYOUTS, PROG_NAME
from tidegate.kernel.pinned_maps import layout_mismatch
from tidegate.lifetime import end_with_parent


class CompileError(Exception):
    pass


_ahead: subprocess.Popen | None = None  # a compile child started ahead (start_ahead), not yet given a source


BPF_ROOT = "/sys/fs/bpf"  # where compile_unpinned's child mounts a bpf filesystem of its own


def _spawn(pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    # the child imports this very package, wherever it was imported from (a bench's sys.path too)
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "tidegate.kernel.compiler"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)  # fmt: skip


def start_ahead() -> None:
    """Start the compile child now, before it is needed: it loads BCC and
    LLVM (a few hundred ms) while the agent imports its own modules, then
    waits for a source and does nothing else. The next compile_in_child
    uses it; cancel_ahead ends it unused (so does this process's exit)."""
    global _ahead
    if _ahead is None:
        _ahead = _spawn()


def cancel_ahead() -> None:
    """End a compile child started ahead that no compile needs: it reads
    an empty source and exits without touching the kernel."""
    global _ahead
    proc, _ahead = _ahead, None
    if proc is not None:
        proc.communicate(b"", timeout=60)


def compile_in_child(source: str, cflags: list[str], prog_pin: str, timeout: float = 300) -> dict:
    """Run the compile child (the one started ahead, if any); returns what
    it printed ({prog_id, tag, compile_s, pid, child_s, ahead: started ahead, record: the
    cache entry or None, record_error, short_kernel_symbols: compiled with the short
    /proc/kallsyms})."""
    global _ahead
    t0 = time.monotonic()
    ahead = _ahead is not None
    proc, _ahead = (_ahead or _spawn()), None
    res = _run(proc, {"prog_pin": prog_pin, "cflags": cflags}, source, timeout, t0)
    res["ahead"] = ahead
    return res


def compile_unpinned(source: str, cflags: list[str], pin_dir: str, timeout: float = 300) -> tuple[dict, list[int]]:
    """Compile and load the program in a child that pins nothing the host
    sees (a bpf filesystem of its own): its maps are all new, as in an empty
    pin dir. Returns what the child printed (as compile_in_child, with
    `maps`: the names of the maps it handed over) and the fds it handed
    over: the program's, then the maps' in that order. The caller owns
    them; the record says where each map pins (program_cache.pin_unpinned)."""
    if not pin_dir.startswith(BPF_ROOT + "/"):
        raise CompileError(f"{pin_dir} is not under {BPF_ROOT}: the child's own bpf filesystem would not hold it")
    t0 = time.monotonic()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        proc = _spawn(pass_fds=(theirs.fileno(),))
        job = {"pin_dir": pin_dir, "cflags": cflags, "handover_fd": theirs.fileno(), "parent": os.getpid()}
        theirs.close()
        res = _run(proc, job, source, timeout, t0)
        ours.setblocking(False)  # the child has exited: what it sent waits in the socket
        try:
            _, fds, _, _ = socket.recv_fds(ours, 16, len(res.get("maps", [])) + 1)
        except BlockingIOError:
            raise CompileError("the compile child handed over no program") from None
    finally:
        ours.close()
        theirs.close()
    if len(fds) != len(res["maps"]) + 1:
        for fd in fds:
            os.close(fd)
        raise CompileError(f"the compile child handed over {len(fds)} fds for a program and {len(res['maps'])} maps")
    res["ahead"] = True
    return res, fds


def _run(proc: subprocess.Popen, job: dict, source: str, timeout: float, t0: float) -> dict:
    try:
        out, err = proc.communicate((json.dumps(job) + "\n" + source).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CompileError(f"the compile child did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-12:]
        raise CompileError("\n".join(tail) or f"the compile child exited with {proc.returncode}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["pid"] = proc.pid
    res["child_s"] = time.monotonic() - t0
    return res


# the lines BCC looks up in /proc/kallsyms at a compile (b_frontend_action.cc); the addresses are never used
_SYMBOLS_BCC_ASKS_FOR = b"0000000000000001 T bpf_probe_read_kernel\n0000000000000001 T bpf_probe_read_user\n"
_CLONE_NEWNS, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x00020000, 0x1000, 0x4000, 0x40000


def own_bpffs_allowed() -> bool:
    """Whether a child of this process may have a mount namespace and a
    bpf filesystem of its own (compile_unpinned needs both): asked of a
    fork that tries and exits. Refused under the shipped systemd units
    (RestrictNamespaces=, no @mount system calls), without CAP_SYS_ADMIN,
    or in a container that forbids it; call it while this process has one
    thread (`tidegate agent` before its imports)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the fork tries, in a namespace gone with it, and exits
        try:
            own_mounts(own_bpffs=True)
            code = 0
        except BaseException:  # noqa: BLE001 - refused, whatever the reason: the answer is no
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0  # a fork killed by a system call filter (SIGSYS) too


def own_mounts(own_bpffs: bool) -> bool:
    """In a mount namespace of this process's own, show a /proc/kallsyms
    that holds only what BCC's compile asks of it, and with own_bpffs a
    new bpf filesystem on BPF_ROOT. True if the short /proc/kallsyms is
    shown; False (nothing changed) where the namespace or the mount is
    refused, except that own_bpffs raises OSError then (a compile that
    would pin on the host's). Mounts made here never reach the host's
    namespace (private propagation), and end with this process."""
    libc = ctypes.CDLL(None, use_errno=True)

    def refused(what: str) -> bool:
        if own_bpffs:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return False

    if libc.unshare(_CLONE_NEWNS) != 0:
        return refused("a mount namespace of its own")
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return refused("private mounts")  # a namespace of its own, but still the host's mounts' peer
    if own_bpffs and libc.mount(b"bpf", BPF_ROOT.encode(), b"bpf", 0, None) != 0:
        return refused(f"a bpf filesystem of its own on {BPF_ROOT}")
    fd, path = tempfile.mkstemp(prefix="tidegate-kallsyms-")
    try:
        os.write(fd, _SYMBOLS_BCC_ASKS_FOR)
        return libc.mount(path.encode(), b"/proc/kallsyms", None, _MS_BIND, None) == 0
    finally:
        os.close(fd)
        os.unlink(path)  # the bind mount keeps the file while this process lives


def _ends_with_parent(parent: int) -> bool:
    """A compile that pins nothing the host sees ends with the process it
    compiles for (SIGKILL when the thread that started it ends, which waits
    for it): a start that dies does not leave it compiling for nobody. No
    other compile child does: killed between its two pin steps it would
    leave a pin behind. False if that process has ended already."""
    if not end_with_parent(signal.SIGKILL):
        return True  # refused: it runs to its end, as before, and its handover finds no one
    return os.getppid() == parent


def _main() -> int:
    from bcc import BPF  # deliberately here: BCC (and LLVM) load only in the compile child, never in the agent
    from bcc.libbcc import lib

    job = sys.stdin.buffer.read()  # started ahead: BCC is loaded by the time the agent sends the job
    if not job:
        return 0  # cancelled: nothing to compile
    head, _, body = job.partition(b"\n")
    args = json.loads(head)
    cflags, source, handover = args["cflags"], body.decode(), args.get("handover_fd")

    if handover is not None and not _ends_with_parent(args["parent"]):
        return 0  # the start it compiles for has ended already: nothing to hand over
    short_symbols = own_mounts(own_bpffs=handover is not None)
    if handover is not None:
        os.makedirs(args["pin_dir"], mode=0o700)  # in the bpf filesystem of its own
    t0 = time.monotonic()
    b = BPF(text=source, cflags=cflags)
    fn = b.load_func(PROG_NAME.encode(), BPF.XDP)
    compile_s = time.monotonic() - t0
    for name in LAYOUTS:
        try:
            t = b[name.encode()]
        except KeyError:
            continue  # tg_clock outside replay builds
        why = layout_mismatch(name, t.Key, getattr(t, "sLeaf", t.Leaf))
        if why:
            print(why, file=sys.stderr)
            return 3
    info = bpfsys.prog_info(fn.fd)
    out = {"prog_id": info.id, "tag": bytes(info.tag).hex(), "compile_s": round(compile_s, 3), "record": None,
           "short_kernel_symbols": short_symbols}  # fmt: skip
    insns = b.dump_func(PROG_NAME.encode())
    license, kern_version = lib.bpf_module_license(b.module), lib.bpf_module_kern_version(b.module)
    if handover is not None:
        # the record says where each map pins: the agent pins them there, and it is the cache entry too
        out["record"] = program_cache.record(insns, fn.fd, args["pin_dir"], license, kern_version)
        maps = program_cache.map_fds(insns, out["record"])
        out["maps"] = list(maps)
        socket.send_fds(socket.socket(fileno=handover), [b"fds"], [fn.fd, *maps.values()])
        print(json.dumps(out))
        return 0
    prog_pin = args["prog_pin"]
    tmp = f"{prog_pin}_tmp{os.getpid()}"  # bpffs names take no dots
    bpfsys.obj_pin(fn.fd, tmp)
    os.replace(tmp, prog_pin)  # the pin appears whole or not at all
    try:
        out["record"] = program_cache.record(insns, fn.fd, os.path.dirname(prog_pin), license, kern_version)
    except Exception as e:  # noqa: BLE001 - the program is pinned and runs; only the next start compiles again
        out["record_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(_main())
    except Exception as e:  # noqa: BLE001 - one line for the agent's error message
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2)
