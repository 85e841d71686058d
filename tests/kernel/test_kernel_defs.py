"""bpf/kernel_defs.h against the kernel's own headers.

The program defines the packet headers, protocol numbers and clock
constants it uses (bpf/kernel_defs.h) instead of including <linux/ip.h> and
the like, which pull most of the kernel's internal headers into every
compile. Compiled both ways through the real compile child, the kernel must
give the two programs the same tag (a hash of the instructions, map fds
left out): a field, a packing or a constant that differs from the kernel's
changes an instruction.

The compile child also leaves out what BCC does by default but the
program's instructions do not depend on: debug info (-g0) and the kernel's
whole symbol table (kernel/compiler.py). Its program must be the one BCC
compiles with both."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tidegate.kernel import compiler, loader
from tidegate.kernel.filter import FilterConfig, bpf_source_dir, inline_source

pytestmark = pytest.mark.kernel

KERNEL_HEADERS = "".join(f"#include <linux/{h}.h>\n" for h in ("in", "if_ether", "ip", "ipv6", "jiffies"))


def _with_kernel_headers(source: str) -> str:
    ours = "/* --- kernel_defs.h --- */\n" + inline_source(bpf_source_dir() / "kernel_defs.h")
    assert source.count(ours) == 1, "the program includes kernel_defs.h once, in tidegate.c"
    return source.replace(ours, KERNEL_HEADERS)


def test_the_program_includes_no_kernel_internal_header():
    """Only uapi/linux/bpf.h (which BCC's own bpf.h already stands for); a
    <linux/...> header costs seconds of every compile."""
    source = loader.program_source()
    assert re.findall(r"^\s*#\s*include\s*<([^>]+)>", source, re.M) == ["uapi/linux/bpf.h"]


def test_kernel_defs_compile_to_the_instructions_of_the_kernel_headers():
    config = FilterConfig(interface=None, pin_name=f"test-kdefs-{os.getpid()}", max_sources=65536)
    loader.ensure_bpffs()
    os.makedirs(config.pin_dir, mode=0o700)
    try:
        source, flags = loader.program_source(), loader.cflags(config)
        ours = compiler.compile_in_child(source, flags, os.path.join(config.pin_dir, "prog_ours"))
        kernels = compiler.compile_in_child(_with_kernel_headers(source), flags,
                                            os.path.join(config.pin_dir, "prog_kernel"))  # fmt: skip
        assert ours["tag"] == kernels["tag"], "kernel_defs.h compiles to other instructions than the kernel's headers"
        assert ours["record"]["insns"] != "" and ours["prog_id"] != kernels["prog_id"]
    finally:
        loader.remove_pins(config.pin_dir)


# BCC as anyone would call it: debug info on, the host's /proc/kallsyms
_PLAIN_BCC = """
import json, sys
from bcc import BPF
args = json.loads(sys.stdin.readline())
b = BPF(text=sys.stdin.read(), cflags=args["cflags"])
fn = b.load_func(b"tidegate_xdp", BPF.XDP)
from tidegate.kernel import bpfsys
print(bpfsys.prog_tag(fn.fd))
"""


def _kallsyms_lines() -> int:
    with open("/proc/kallsyms", "rb") as f:
        return sum(1 for _ in f)


def test_the_compile_childs_shortcuts_change_no_instruction():
    config = FilterConfig(interface=None, pin_name=f"test-kshort-{os.getpid()}", max_sources=65536)
    loader.ensure_bpffs()
    os.makedirs(config.pin_dir, mode=0o700)
    symbols_before = _kallsyms_lines()
    try:
        source, flags = loader.program_source(), loader.cflags(config)
        assert "-g0" in flags, "the agent's build leaves debug info out"
        child = compiler.compile_in_child(source, flags, os.path.join(config.pin_dir, "prog_child"))
        assert child["short_kernel_symbols"] is True, "as root the child compiles with the short /proc/kallsyms"
        plain_flags = [f for f in flags if f != "-g0"]
        r = subprocess.run([sys.executable, "-c", _PLAIN_BCC], input=json.dumps({"cflags": plain_flags}) + "\n" + source,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True,
                           timeout=300, check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == child["tag"], "the compile child's program differs from BCC's default build"
    finally:
        loader.remove_pins(config.pin_dir)
    # the child's mounts stayed in its own namespace: the host's table is whole
    assert symbols_before > 1000 and abs(_kallsyms_lines() - symbols_before) < 100
