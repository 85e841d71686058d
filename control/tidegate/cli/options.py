"""Options accepted before and after the verb (`tidegate -o json status` and
`tidegate status -o json`): the top-level parser gets them with their
defaults, each verb's parser gets them with SUPPRESS so that a value given
before the verb is not reset by the verb's own default. `tidegate fleet`
uses the same helpers for its options."""

from __future__ import annotations

import argparse
import os
import sys

from tidegate.client import DEFAULT_SERVER

OUTPUTS = ("table", "json", "yaml")

# the connection options' defaults, for verbs that do not take them (main fills them in)
CONNECTION_DEFAULTS = {"server": DEFAULT_SERVER, "output": "table", "timeout": 30.0, "ca": None, "cert": None,
                       "key": None, "server_name": None, "token": None, "token_file": None}  # fmt: skip


def _default(value, suppress: bool):
    return argparse.SUPPRESS if suppress else value


def output_option(p, suppress: bool, choices: tuple[str, ...] = OUTPUTS,
                  help: str = "table for people (default), json or yaml for scripts (errors too, on stderr)"):  # fmt: skip
    """-o/--output; SUPPRESS on a verb's parser (the top-level value stands)."""
    p.add_argument("-o", "--output", choices=choices, default=_default("table", suppress), help=help)


def connection_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The connection and output options, as the group "global options"."""
    g = p.add_argument_group("global options")
    g.add_argument("--server", metavar="ADDR", default=_default(os.environ.get("TIDEGATE_SERVER", DEFAULT_SERVER),
                   suppress), help="agent address host:port (default $TIDEGATE_SERVER or 127.0.0.1:50051)")  # fmt: skip
    output_option(g, suppress)
    g.add_argument("--timeout", type=float, metavar="S", default=_default(30.0, suppress),
                   help="seconds per call (default 30)")  # fmt: skip
    g.add_argument("--ca", metavar="PEM", default=_default(None, suppress),
                   help="CA that signed the agent's certificate (TLS)")  # fmt: skip
    g.add_argument("--cert", metavar="PEM", default=_default(None, suppress), help="client certificate (mTLS)")
    g.add_argument("--key", metavar="PEM", default=_default(None, suppress), help="client private key (mTLS)")
    g.add_argument("--server-name", metavar="NAME", default=_default(None, suppress),
                   help="name expected in the agent's certificate (default: the host in --server)")  # fmt: skip
    g.add_argument("--token", default=_default(None, suppress), help="API token (prefer $TIDEGATE_TOKEN: arguments "
                   "show in ps); never sent in clear text to a non-loopback --server")  # fmt: skip
    g.add_argument("--token-file", metavar="FILE", default=_default(None, suppress),
                   help="token file (default $TIDEGATE_TOKEN_FILE or /var/lib/tidegate/tokens, read on its own "
                   "only for a loopback --server)")  # fmt: skip


def parse_verb(parser: argparse.ArgumentParser, argv: list[str], dest: str) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code when there is nothing to run: 0 after --help, 2 after a
    usage error or without a verb (the help goes to stderr). `dest`: the subparsers' dest."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code not in (0, None) else 0
    if not getattr(args, dest):
        parser.print_help(sys.stderr)
        return 2
    return args
