"""The `tidegate` command. `tidegate agent ...` first starts what its start
will need from the kernel (daemon/early.py: the compile, or the cached
program's load), so that it runs beside every import after it, the
command line's own (argparse, the verbs, gRPC) included; then, for every
verb, the command line (cli/main.py)."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["agent"]:
        from tidegate.daemon.early import start_ahead_once

        start_ahead_once(sys.argv[2:])
    from tidegate.cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
