"""tidegate(1) in roff, generated from the CLI's own --help texts (the
parser of every verb), so the man page says what --help says.

    python3 packaging/manpage.py > tidegate.1
"""

from __future__ import annotations

import datetime
import os
import re
import time

from tidegate import __version__
from tidegate.cli.main import VERBS, build_parser


def _roff(text: str) -> str:
    out = []
    for line in text.rstrip().splitlines():
        line = line.replace("\\", "\\e")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _verb_parsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def manpage() -> str:
    os.environ.setdefault("COLUMNS", "80")
    parser = build_parser()
    # SOURCE_DATE_EPOCH keeps the build reproducible
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    date = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d")
    parts = [f'.TH TIDEGATE 1 "{date}" "tidegate {__version__}" "User Commands"',
             ".SH NAME", "tidegate \\- XDP edge filter with safe rule changes",
             ".SH SYNOPSIS", ".nf", _roff(parser.format_usage().removeprefix("usage: ")), ".fi",
             ".SH DESCRIPTION", ".nf", _roff(parser.format_help().split("\n", 1)[1]), ".fi",
             ".SH VERBS"]  # fmt: skip
    for name, sp in _verb_parsers(parser).items():
        if name not in VERBS:
            continue
        text = re.sub(r"^usage: ", "", sp.format_help())
        parts += [f".SS {name}", ".nf", _roff(text), ".fi"]
    parts += [".SH FILES", ".nf", "/etc/tidegate/rules.yaml       the rule set (conffile)",
              "/etc/tidegate/IFACE.env        tidegate-agent@IFACE.service's settings",
              "/var/lib/tidegate/IFACE/       version store, tokens and program-cache/ (the compiled",
              "                               XDP program, loaded without compiling) of one agent",
              "/usr/share/tidegate/rules.schema.json   JSON Schema of rule-set files", ".fi",
              ".SH SEE ALSO", "systemctl(1), ip(8), bpftool(8)"]  # fmt: skip
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(manpage(), end="")
