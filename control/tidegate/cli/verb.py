"""The verb registry: one object per verb, holding its help, its arguments
and its handler together.

A verb is declared once, next to its body, in the module of its theme:

    @verb("rollback", "make the previous (or a given) version active again",
          "Swaps the kernel back to ...",
          "tidegate rollback --reason 'too tight, users blocked'",
          arg("--to", type=int, default=0, metavar="VERSION", help="..."),
          REASON)
    def rollback(args, out) -> int:
        ...

`cli/main.py` builds the parser, the top-level help and the man page
(packaging/manpage.py) from VERBS; adding a verb is that one decorated
function (plus its gRPC method when it needs one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from tidegate.client import Client

# exit codes shared by every verb (cli/main.py documents them)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ROLLED_BACK, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CHECK_REFUSED = 5  # whatif / validate --against-agent: over budget, or a canary would be dropped
EXIT_WARNINGS = 6  # validate --strict: valid, with warnings


class LocalError(Exception):
    """Bad local input: exit 2, one line."""


@dataclass(frozen=True)
class Arg:
    """One add_argument call: its flags (or positional name), its keywords,
    and optionally a completer for the shell (see cli/completion.py)."""

    flags: tuple[str, ...]
    options: dict[str, Any]
    completer: Callable | None = None

    def add_to(self, parser) -> None:
        action = parser.add_argument(*self.flags, **self.options)
        if self.completer is not None:
            action.completer = self.completer


def arg(*flags: str, completer: Callable | None = None, **options) -> Arg:
    return Arg(flags, options, completer)


def reason(help: str = "why (required; recorded in the audit log)") -> Arg:
    return arg("--reason", "-r", default="", help=help)


def force(help: str = "override the blast-radius check (audited)") -> Arg:
    return arg("--force", action="store_true", help=help)


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str  # one line: the top-level help's verb list
    description: str  # `tidegate VERB --help`
    examples: str  # one command a line
    handler: Callable[..., int]  # (args, out) -> exit code
    theme: str  # the module it lives in: changes, observation, history, offline, delegated
    args: tuple[Arg, ...] = field(default=())
    remote: bool = True  # talks to the agent (its help lists the ENVIRONMENT)
    connects: bool = True  # takes the connection options (--server, TLS, token)
    own_parser: bool = False  # hands its arguments to another program's parser (agent, fleet)


VERBS: dict[str, Verb] = {}


def verb(name: str, summary: str, description: str, examples: str, *args: Arg, remote: bool = True,
         connects: bool | None = None, own_parser: bool = False):  # fmt: skip
    """Registers the decorated function as the handler of verb NAME."""

    def register(handler: Callable[..., int]) -> Callable[..., int]:
        if name in VERBS:
            raise ValueError(f"verb {name!r} is declared twice")
        VERBS[name] = Verb(name, summary, description, examples, handler, handler.__module__.rsplit(".", 1)[-1],
                           tuple(args), remote, remote if connects is None else connects, own_parser)  # fmt: skip
        return handler

    return register


# ------------------------------------------------- shared by the verbs
def client_of(args):
    """The gRPC client for the connection options in ARGS."""
    return Client(args.server, args.timeout, args.ca, args.cert, args.key, token=args.token,
                  token_file=args.token_file, server_name=args.server_name)  # fmt: skip


def read_reply(args, out, method: str, request: str, **fields):
    """The agent's reply to one call of METHOD with a REQUEST message of FIELDS, or None when
    `-o json` (or yaml) has printed it whole."""
    cl = client_of(args)
    reply = cl.call(method, getattr(cl.pb, request)(**fields))
    return None if out.as_json(reply) else reply


def read_file(path: str) -> str:
    """A rule-set file's text (- for standard input); LocalError with one line otherwise."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LocalError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LocalError(f"{path}: is a directory, not a rule-set file") from None
    except PermissionError:
        raise LocalError(f"{path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise LocalError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise LocalError(f"{path}: cannot read: {e.strerror}") from None
