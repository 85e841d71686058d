"""What `tidegate agent` starts before importing the daemon.

The agent's own imports (gRPC, numpy, the kernel layer...) take most of a
second. When this start will most likely compile the program (nothing
pinned, nothing in the program cache), the compile child is started first,
so that its load of BCC and LLVM runs beside those imports; it touches
nothing until the agent hands it the source (kernel/compiler.py).
"""

from __future__ import annotations

import argparse
import os

from tidegate.daemon.options import DEFAULT_STATE_DIR
from tidegate.kernel import compiler, program
from tidegate.kernel.loader import PIN_ROOT

PROGRAM_CACHE = "program-cache"  # <state-dir>/program-cache/<digest>.json (kernel/program_cache.py)


def cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, PROGRAM_CACHE)


def compile_ahead(argv: list[str]) -> bool:
    """Start the compile child now if this start will likely compile. Only
    the options that name the pin and state dirs are read, and nothing is
    said about any other: the agent's parser does that."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--interface", "-i")
    p.add_argument("--pin-root", default=PIN_ROOT)
    p.add_argument("--pin-name")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    try:
        opts, _ = p.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return False
    if not opts.interface:
        return False  # the agent's parser says what is missing
    if program.compile_likely(os.path.join(opts.pin_root, opts.pin_name or opts.interface), cache_dir(opts.state_dir)):
        compiler.start_ahead()
        return True
    return False
