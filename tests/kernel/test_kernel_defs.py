"""bpf/kernel_defs.h against the kernel's own headers.

The program defines the packet headers, protocol numbers and clock
constants it uses (bpf/kernel_defs.h) instead of including <linux/ip.h> and
the like, which pull most of the kernel's internal headers into every
compile. Compiled both ways through the real compile child, the kernel must
give the two programs the same tag (a hash of the instructions, map fds
left out): a field, a packing or a constant that differs from the kernel's
changes an instruction."""

from __future__ import annotations

import os
import re

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
