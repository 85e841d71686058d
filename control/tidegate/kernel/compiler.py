"""Compile and load the XDP program in a short-lived child process.

BCC (and with it LLVM and clang, hundreds of MB) lives only in this child:
it compiles the program, loads it into the kernel against the pinned maps
(creating them on a first start), checks that the maps have the layouts the
agent reads them with (layout.LAYOUTS), pins the program, prints one
JSON line and exits: the program's id and tag, and what it loaded
(program_cache.record) for the agent to keep on disk, so that a later
start loads the same instructions without compiling. The agent then opens
the pinned program and maps by fd and never loads BCC itself.

    python -m tidegate.kernel.compiler < JOB [JOB]
    JOB = {"prog_pin": PATH, "cflags": [...], "size": N, "ahead": BOOL} NEWLINE N bytes of inlined source

The child can be started ahead (start_ahead), while the agent imports its
own modules. Without a job it loads BCC and waits for one. With a job (a
first start: nothing pinned in the pin dir) it compiles and loads the
program at once, with its pins in a bpffs of its own (private_pins.py),
prints one line ({"ahead": "compiled", "prog_id"}) and waits for
the go: the same job again, sent by compile_in_child when
the start gets to the kernel. Then it pins the maps and the program where
BCC would have, and answers. A start that stops before (end of input)
leaves nothing pinned; a go for another program, or a pin dir that is no
longer empty, is answered {"ahead_unusable": why} and compiled by a new
child in the real bpffs.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tidegate.kernel import bpfsys, program_cache
from tidegate.kernel.private_pins import PrivateBpffs, Unusable
from tidegate.kernel.layout import LAYOUTS, PROG_NAME
from tidegate.kernel.pinned_maps import layout_mismatch


class CompileError(Exception):
    pass


_ahead: subprocess.Popen | None = None  # a compile child started ahead (start_ahead), not yet given the go
_ahead_job: bytes | None = None  # the job it was started with (compiling at once), None: waiting for one
_ahead_t0 = 0.0


def ahead_since() -> float | None:
    """Seconds since the compile child was started ahead with a program (it compiles since); None otherwise."""
    return round(time.monotonic() - _ahead_t0, 3) if _ahead is not None and _ahead_job is not None else None


def job(source: str, cflags: list[str], prog_pin: str, ahead: bool = False) -> bytes:
    body = source.encode()
    head = {"prog_pin": prog_pin, "cflags": cflags, "size": len(body), "ahead": ahead}
    return json.dumps(head).encode() + b"\n" + body


def _spawn() -> subprocess.Popen:
    # the child imports this very package, wherever it was imported from (a bench's sys.path too)
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "tidegate.kernel.compiler"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def start_ahead(source: str | None = None, cflags: list[str] | None = None, prog_pin: str | None = None) -> None:
    """Start the compile child now, before it is needed, while the agent
    imports its own modules. Without a program it loads BCC and LLVM and
    waits for one. With one (source, cflags, prog_pin: a pin dir with
    nothing pinned) it also compiles and loads it, pinned only in a bpffs
    of its own until compile_in_child gives the go. The next
    compile_in_child uses it; cancel_ahead ends it unused (so does this
    process's exit)."""
    global _ahead, _ahead_job, _ahead_t0
    if _ahead is not None:
        return
    _ahead, _ahead_t0 = _spawn(), time.monotonic()
    if source is not None:
        _ahead_job = job(source, cflags or [], prog_pin or "", ahead=True)
        try:  # the whole job fits in the pipe: no wait for the child to read it
            fcntl.fcntl(_ahead.stdin, fcntl.F_SETPIPE_SZ, max(len(_ahead_job), 1 << 16))
        except OSError:
            pass  # over the pipe size limit: the write waits for the child's read
        _ahead.stdin.write(_ahead_job)
        _ahead.stdin.flush()


def cancel_ahead() -> None:
    """End a compile child started ahead that no compile needs: it reads
    the end of its input and exits; what it compiled ahead, pinned only in
    its own bpffs, goes with it."""
    global _ahead, _ahead_job
    proc, compiling, _ahead, _ahead_job = _ahead, _ahead_job is not None, None, None
    if proc is None:
        return
    if compiling:
        proc.kill()  # no need to wait for a compile nobody will use
    proc.communicate(b"", timeout=300)


def _run(proc: subprocess.Popen, message: bytes, timeout: float) -> dict:
    try:
        out, err = proc.communicate(message, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CompileError(f"the compile child did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-12:]
        raise CompileError("\n".join(tail) or f"the compile child exited with {proc.returncode}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["pid"] = proc.pid
    return res


def compile_in_child(source: str, cflags: list[str], prog_pin: str, timeout: float = 300) -> dict:
    """Run the compile child (the one started ahead, if any); returns what
    it printed ({prog_id, tag, compile_s, pid, child_s, ahead: started ahead,
    compiled_ahead: compiling when the go came, record: the cache entry or None,
    record_error, unusable: why a compile ahead was not used})."""
    global _ahead, _ahead_job
    t0 = time.monotonic()
    ahead = _ahead is not None
    (proc, sent), _ahead, _ahead_job = ((_ahead, _ahead_job) if ahead else (_spawn(), None)), None, None
    message = job(source, cflags, prog_pin)
    res = _run(proc, message, timeout)
    unusable = res.get("ahead_unusable")
    if unusable is not None:  # compiled ahead for another program, or it could not be published: compile here
        res = _run(_spawn(), message, timeout)
        res["unusable"] = unusable
    res["child_s"] = time.monotonic() - t0
    res["ahead"] = ahead
    res["compiled_ahead"] = sent is not None and unusable is None
    return res


class _LayoutMismatch(Exception):
    pass


def _read_job(stream) -> dict | None:
    """The next job on the input; None at its end (cancelled)."""
    head = stream.readline()
    if not head:
        return None
    args = json.loads(head)
    body = stream.read(args["size"])
    if len(body) != args["size"]:
        raise ValueError(f"a job of {len(body)} source bytes, not the {args['size']} announced")
    args["source"] = body.decode()
    return args


def _build(BPF, args: dict):
    """Compile and load the job's program; its maps checked against LAYOUTS."""
    t0 = time.monotonic()
    b = BPF(text=args["source"], cflags=args["cflags"])
    fn = b.load_func(PROG_NAME.encode(), BPF.XDP)
    compile_s = time.monotonic() - t0
    for name in LAYOUTS:
        try:
            t = b[name.encode()]
        except KeyError:
            continue  # tg_clock outside replay builds
        why = layout_mismatch(name, t.Key, getattr(t, "sLeaf", t.Leaf))
        if why:
            raise _LayoutMismatch(why)
    return b, fn, compile_s


def _answer(lib, b, fn, compile_s: float, prog_pin: str) -> dict:
    info = bpfsys.prog_info(fn.fd)
    out = {"prog_id": info.id, "tag": bytes(info.tag).hex(), "compile_s": round(compile_s, 3), "record": None}
    try:
        out["record"] = program_cache.record(b.dump_func(PROG_NAME.encode()), fn.fd, os.path.dirname(prog_pin),
                                             lib.bpf_module_license(b.module), lib.bpf_module_kern_version(b.module))
    except Exception as e:  # noqa: BLE001 - the program is pinned and runs; only the next start compiles again
        out["record_error"] = f"{type(e).__name__}: {e}"
    return out


def _compile_ahead(BPF, lib, first: dict) -> dict | None:
    """Compile `first` in a bpffs of this process's own, then wait for the
    go; the answer, or None when the start ended before it."""
    try:
        private = PrivateBpffs(os.path.dirname(first["prog_pin"]))
        built = _build(BPF, first)
    except Exception as e:  # noqa: BLE001 - not compiled ahead: the agent compiles in the real bpffs and says why
        private, built = None, f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        print(json.dumps({"ahead": "not compiled", "why": built}), flush=True)
    else:
        print(json.dumps({"ahead": "compiled", "prog_id": bpfsys.prog_info(built[1].fd).id}), flush=True)
    go = _read_job(sys.stdin.buffer)
    if go is None:
        return None  # the start stopped: what was compiled goes with this process
    if private is None:
        return {"ahead_unusable": built}
    if any(go[k] != first[k] for k in ("prog_pin", "cflags", "source")):
        return {"ahead_unusable": "the start asked for another program"}
    b, fn, compile_s = built
    try:
        private.publish(fn.fd, go["prog_pin"])
    except (Unusable, OSError) as e:
        return {"ahead_unusable": str(e)}
    return _answer(lib, b, fn, compile_s, go["prog_pin"])


def _main() -> int:
    from bcc import BPF  # deliberately here: BCC (and LLVM) load only in the compile child, never in the agent
    from bcc.libbcc import lib

    first = _read_job(sys.stdin.buffer)  # started ahead without a job: BCC is loaded by the time it comes
    if first is None:
        return 0  # cancelled: nothing to compile
    if first.get("ahead"):
        out = _compile_ahead(BPF, lib, first)
        if out is not None:
            print(json.dumps(out))
        return 0
    prog_pin = first["prog_pin"]
    try:
        b, fn, compile_s = _build(BPF, first)
    except _LayoutMismatch as e:
        print(e, file=sys.stderr)
        return 3
    tmp = f"{prog_pin}_tmp{os.getpid()}"  # bpffs names take no dots
    bpfsys.obj_pin(fn.fd, tmp)
    os.replace(tmp, prog_pin)  # the pin appears whole or not at all
    print(json.dumps(_answer(lib, b, fn, compile_s, prog_pin)))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(_main())
    except Exception as e:  # noqa: BLE001 - one line for the agent's error message
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2)
