"""tidegate — the operators' command line.

    tidegate [--server ADDR] [-o table|json] [--timeout S] VERB [ARGS]

Every verb except `agent`, `validate`, `replay`, `lab`, `detach`, `certs`,
`completion` and `version` is a gRPC call to the agent (package tidegate.v1);
the CLI never touches kernel maps itself (`detach` is the one explicit
exception: it removes the program and pins of an interface whose agent is
stopped). Tables are for people; `-o json` prints one JSON document (one
object per line for `watch`) with the .proto's snake_case field names, every
field present and numbers as JSON numbers.

Exit codes:
  0  success
  1  the agent refused or failed the operation (INVALID_ARGUMENT,
     FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, ...; also a verb the
     agent does not implement yet)
  2  usage error or bad local input (unknown option, missing or unreadable
     file, invalid rule set in `validate`)
  3  the agent cannot be reached (one line on stderr, never a traceback)
  4  a guarded apply was rolled back by the agent
  5  `whatif`, `validate --against-agent`: the agent's check would refuse the
     file (over the blast-radius budget, or a canary would be dropped)
  6  `validate --strict`: valid, with warnings
130  interrupted (Ctrl-C), except `watch`, where Ctrl-C is the normal way out (0)
`diff FILE` follows `diff(1)`: 0 same as the active version, 1 different, 2 error.
With -o json (or yaml), an error is one JSON object (YAML document) on stderr:
{"error": {"message", "code", "exit_code", "violations", "source"}}.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap

from tidegate import __version__
from tidegate.client import ClientError
from tidegate.cli import changes, delegated, history, observation, offline  # each registers its verbs
from tidegate.cli import completion
from tidegate.cli.options import CONNECTION_DEFAULTS, connection_options, output_option, parse_verb
from tidegate.cli.output import Output, error_document, field_lines, print_error, quiet_broken_pipe
from tidegate.cli.verb import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, VERBS, LocalError, Verb

# the top-level help lists the verbs by theme (the module each verb lives in)
THEMES = {
    delegated: "run the agent, or roll out across a fleet",
    observation: "see what the filter does",
    changes: "check and change the rules",
    history: "versions and who changed what",
    offline: "tools that need no agent",
}

EXIT_STATUS = """EXIT STATUS
  0    success
  1    the agent refused or failed the operation (its gRPC status is printed)
  2    usage error or bad local input (missing file, invalid rule set)
  3    the agent cannot be reached
  4    a guarded apply was rolled back by the agent
  5    whatif, validate --against-agent: the agent's check would refuse it (budget, canary)
  6    validate --strict: valid, with warnings
  130  interrupted (Ctrl-C); `watch` exits 0 on Ctrl-C
  diff FILE: 0 same as the active version, 1 different, 2 error"""

ENVIRONMENT = """ENVIRONMENT
  TIDEGATE_SERVER      agent address (default 127.0.0.1:50051)
  TIDEGATE_AUTHOR      recorded as the author of every change (default user@host)
  TIDEGATE_TOKEN       API token (instead of the token file)
  TIDEGATE_TOKEN_FILE  token file (default /var/lib/tidegate/tokens, readable by root); read on its
                       own only for a loopback --server. A token is never sent in clear text to
                       any other address: that is refused (exit 2); remote agents use mTLS
  TIDEGATE_CA, TIDEGATE_CERT, TIDEGATE_KEY
                       TLS: CA of the agent, client certificate and key (mTLS)
  NO_COLOR             no colour in `diff`"""


def _by_theme() -> list[tuple[str, list[Verb]]]:
    return [(title, [v for v in VERBS.values() if v.theme == module.__name__.rsplit(".", 1)[-1]])
            for module, title in THEMES.items()]  # fmt: skip


def _epilog(v: Verb) -> str:
    examples = "\n".join("  " + ln for ln in v.examples.splitlines())
    parts = [f"EXAMPLES\n{examples}", EXIT_STATUS]
    if v.remote:
        parts.append(ENVIRONMENT)
    return "\n\n".join(parts)


def _verb_parser(sub, v: Verb) -> None:
    sp = sub.add_parser(v.name, prog=f"tidegate {v.name}", allow_abbrev=False, epilog=_epilog(v),
                        description=f"tidegate {v.name} — {v.summary}\n\n{v.description}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    for a in v.args:
        a.add_to(sp)
    # usage shows the verb's own arguments; the connection options are listed under "global options"
    words = sp.format_usage().split()[1:]
    glob = ["[global options]"] if v.connects else []
    text = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" ", "\0"), " ".join(words[:2] + glob + words[2:]))
    sp.usage = textwrap.fill(text, 96, subsequent_indent=" " * 7, break_on_hyphens=False).replace("\0", " ")
    if v.connects:
        connection_options(sp, suppress=True)
    elif not v.own_parser:
        output_option(sp, suppress=True, help="table (default), json or yaml")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb, from the registry (cli/verb.py)."""
    themes = _by_theme()
    listing = "\n".join(f" {title}:\n" + "\n".join(f"  {v.name:<11} {v.summary}" for v in verbs)
                        for title, verbs in themes)  # fmt: skip
    p = argparse.ArgumentParser(
        prog="tidegate",
        allow_abbrev=False,
        usage="tidegate [--server ADDR] [-o table|json] [--timeout S] VERB [ARGS]",
        description="tidegate: an XDP edge filter with safe rule changes.\n\n"
        "The `tidegate` command is the operators' client: it talks to the agent over gRPC (loopback by\n"
        "default, mTLS for remote agents). `tidegate VERB --help` describes each verb.\n\n"
        f"VERBS\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="EXAMPLES\n"
        "  tidegate validate rules.yaml && tidegate whatif rules.yaml\n"
        "  tidegate apply rules.yaml --guard --reason 'raise api limit'\n"
        "  tidegate rollback --reason 'users blocked'\n"
        "  tidegate -o json counters\n\n" + EXIT_STATUS + "\n\n" + ENVIRONMENT,
    )
    p.add_argument("-V", "--version", action="version", version=f"tidegate {__version__}")
    connection_options(p, suppress=False)
    sub = p.add_subparsers(dest="verb", metavar="VERB", help=argparse.SUPPRESS)
    for _, verbs in themes:
        for v in verbs:
            _verb_parser(sub, v)
    return p


def _own_parser(argv: list[str]) -> tuple[Verb, argparse.Namespace] | None:
    """`agent ...` and `[-o json|table] fleet ...` go to their own parsers untouched."""
    for v in VERBS.values():
        if v.own_parser and v.name in argv[:3]:
            i = argv.index(v.name)
            if argv[:i] in ([], ["-o", "json"], ["-o", "table"]):
                return v, argparse.Namespace(args=argv[i + 1:], output=argv[1] if i else "table")
    return None


def _report(e: ClientError, verb: str, fallback_source: str = "") -> None:
    if e.code == "UNIMPLEMENTED":
        print(f"tidegate: the agent does not support `{verb}` yet ({e.details})", file=sys.stderr)
        return
    message = e.message
    if e.violations:
        # the agent's text repeats the field errors; print them once, in the FILE:LINE form
        message = message.splitlines()[0]
    print(f"tidegate: {message}", file=sys.stderr)
    has_lines = any(v.line for v in e.violations)
    for line in field_lines(e.violations, e.source or (fallback_source if has_lines else "")):
        print(line, file=sys.stderr)
    if e.estimate is not None and e.estimate.summary:
        print(f"estimate: {e.estimate.summary}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "_ARGCOMPLETE" in os.environ:
        completion.complete(build_parser())  # the shell asks for completions: answers and exits
    own = _own_parser(argv)
    if own:
        verb, args = own
        return verb.handler(args, None)
    args = parse_verb(build_parser(), argv, "verb")
    if isinstance(args, int):
        return args
    for name, default in CONNECTION_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    out = Output(args.output)
    try:
        return VERBS[args.verb].handler(args, out)
    except ClientError as e:
        if out.is_json:
            print_error(error_document(e.message, e.exit_code, e.code, e.violations, e.source, e.estimate), out.mode)
        else:
            _report(e, args.verb, getattr(args, "file", "") or "")
        return e.exit_code
    except LocalError as e:
        if out.is_json:
            print_error(error_document(str(e), EXIT_USAGE), out.mode)
        else:
            print(f"tidegate: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tidegate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        quiet_broken_pipe()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
