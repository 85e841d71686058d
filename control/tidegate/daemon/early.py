"""What `tidegate agent` starts before importing the daemon.

The agent's own imports (gRPC, numpy, the kernel layer...) take most of a
second, on one core. What the start will need from the kernel side begins
beside them, without touching anything the start could leave behind:
- nothing pinned and nothing in the program cache (a first start): the
  compile child compiles and loads the program at once, on a bpf
  filesystem of its own, and hands it over by fd (program.compile_ahead);
  pinned only when the start gets to the kernel. With maps pinned, a pin
  dir outside /sys/fs/bpf, or no mount namespace allowed (the shipped
  systemd units), the child only loads BCC and LLVM and waits for the
  source (kernel/compiler.py);
- nothing pinned but this program cached (after a reboot or `tidegate
  detach`): a thread loads it against maps of its own, pinned only when the
  start gets to the kernel (program.load_ahead); the verifier's run is
  most of such a start.
"""

from __future__ import annotations

import argparse
import os

from tidegate.daemon.paths import DEFAULT_STATE_DIR
from tidegate.kernel import compiler, loader, program, program_cache
from tidegate.kernel.layout import MAX_SOURCES

PROGRAM_CACHE = "program-cache"  # <state-dir>/program-cache/<digest>.json (kernel/program_cache.py)


def cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, PROGRAM_CACHE)


_started: list = []  # what start_ahead_once started in this process


def start_ahead_once(argv: list[str]) -> str | None:
    """start_ahead, once per process: the `tidegate` command calls it
    before its own imports (cli/entry.py) and the agent verb again after
    them (for a caller that went straight to cli.main); the second call
    starts nothing and says what the first started."""
    if not _started:
        _started.append(start_ahead(argv))
    return _started[0]


def start_ahead(argv: list[str]) -> str | None:
    """Start what this start will likely need: "compiling", "compile",
    "cached" or None. Only the options that name the pin and state dirs
    and the program's build are read, and nothing is said about any other:
    the agent's parser does that."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--interface", "-i")
    p.add_argument("--pin-root", default=loader.PIN_ROOT)
    p.add_argument("--pin-name")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--max-sources", type=int, default=MAX_SOURCES)
    try:
        opts, _ = p.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return None
    if not opts.interface:
        return None  # the agent's parser says what is missing
    config = loader.FilterConfig(interface=opts.interface, pin_root=opts.pin_root, pin_name=opts.pin_name,
                                 max_sources=opts.max_sources, cache_dir=cache_dir(opts.state_dir))  # fmt: skip
    try:
        return _start_ahead(config)
    except (OSError, ValueError):
        return None  # a state or pin dir that is not one (a file, no access...): the start says so in its words


def _start_ahead(config: loader.FilterConfig) -> str | None:
    try:
        pinned = bool(os.listdir(config.pin_dir))
    except FileNotFoundError:
        pinned = False
    if program.compile_likely(config.pin_dir, config.cache_dir):
        if not pinned and config.pin_dir.startswith(compiler.BPF_ROOT + "/") and compiler.own_bpffs_allowed():
            program.compile_ahead(loader.program_source(), loader.cflags(config), config.pin_dir)
            return "compiling"
        compiler.start_ahead()
        return "compile"
    if pinned:
        return None  # a restart: the program is pinned (or a pin dir to look at closely: the load does)
    digest = program.program_digest(loader.program_source(), loader.cflags(config))
    if not os.path.exists(program_cache.entry_path(config.cache_dir, digest)):
        return None
    program.load_ahead(config.cache_dir, digest)
    return "cached"
