"""Rendering for the `tidegate` CLI: rich tables for people, one JSON
document for scripts, progress on stderr only when a person is watching.

JSON output is built from the protobuf messages field by field with the
.proto's own snake_case names: every field is present (zero values
included), 64-bit integers stay JSON numbers (protobuf's canonical JSON
mapping would turn them into strings), unset sub-messages and unset
`optional` fields are null, maps are objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterable

import yaml

NUMERIC_HINTS = ("pps", "packets", "drops", "dropped", "bytes", "share", "#", "sources", "rate", "prefix",
                 "blocked", "deny", "would drop", "newly", "version")  # fmt: skip


def message_to_dict(msg) -> dict[str, Any]:
    """A protobuf message as plain JSON-ready data with typed numbers."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            scalar = f.message_type.fields_by_name["value"].message_type is None
            out[f.name] = {k: v if scalar else message_to_dict(v) for k, v in value.items()}
        elif f.has_presence and not msg.HasField(f.name):  # an unset sub-message or `optional` field
            out[f.name] = None
        elif f.message_type is not None:
            if f.is_repeated:
                out[f.name] = [message_to_dict(x) for x in value]
            else:
                out[f.name] = message_to_dict(value)
        elif f.is_repeated:
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def fmt(x) -> str:
    """Cell text: thousands separators for numbers, two decimals for floats."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def per_second(now: float, before: float | None, seconds: float) -> float:
    """Rate between two counter readings; 0 without a previous reading."""
    if before is None or seconds <= 0:
        return 0.0
    return max(0.0, (now - before) / seconds)


def use_colour(stream=None) -> bool:
    stream = stream or sys.stdout
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def colour_diff(lines: Iterable[str], colour: bool) -> list[str]:
    """Unified-diff lines, green additions and red removals when colour is on."""
    out = []
    for ln in lines:
        if colour and ln.startswith("+") and not ln.startswith("+++"):
            ln = f"\x1b[32m{ln}\x1b[0m"
        elif colour and ln.startswith("-") and not ln.startswith("---"):
            ln = f"\x1b[31m{ln}\x1b[0m"
        elif colour and ln.startswith("@@"):
            ln = f"\x1b[36m{ln}\x1b[0m"
        elif colour and ln.startswith(("+++", "---")):
            ln = f"\x1b[1m{ln}\x1b[0m"
        out.append(ln)
    return out


class Output:
    """Where a verb's results go: stdout for results, stderr for notes,
    errors and progress."""

    def __init__(self, mode: str = "table"):
        from rich.console import Console  # lazy: rich only once a verb runs (`tidegate --help` stays fast)

        self.mode = mode
        # Piped tables are read by people later (less, a ticket): no wrapping at 80 columns.
        width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "200"))
        self.console = Console(highlight=False, width=width, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False)

    @property
    def is_json(self) -> bool:
        """Structured output for scripts: json, or yaml (the same document)."""
        return self.mode in ("json", "yaml")

    # ------------------------------------------------------------- JSON
    def json(self, data) -> None:
        """One JSON (or YAML) document on stdout."""
        if self.mode == "yaml":
            print(_yaml(data), end="", flush=True)
            return
        print(json.dumps(data, indent=2, sort_keys=True, default=str), flush=True)

    def as_json(self, msg) -> bool:
        """With -o json (or yaml): MSG, a protobuf message, as the one document; says whether it printed."""
        if self.is_json:
            self.json(message_to_dict(msg))
        return self.is_json

    def json_line(self, data) -> None:
        """One JSON object on one line (streams: `watch -o json`); with yaml, one document each."""
        if self.mode == "yaml":
            print("---\n" + _yaml(data), end="", flush=True)
            return
        print(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str), flush=True)

    # ------------------------------------------------------------ people
    def line(self, text: str = "") -> None:
        print(text, flush=True)

    def note(self, text: str) -> None:
        """A remark for the person at the terminal, on stderr."""
        print(text, file=sys.stderr, flush=True)

    def table(self, title: str, columns: list[str], rows: list[list], caption: str | None = None,
              empty: str | None = None) -> None:  # fmt: skip
        self.console.print(make_table(title, columns, rows, caption))
        if not rows and empty:
            self.console.print(f"  ({empty})")

    def kv(self, title: str, items: list[tuple[str, object]]) -> None:
        from rich.table import Table  # lazy: see Output.__init__

        t = Table(title=title, show_header=False, title_justify="left")
        t.add_column("key", style="bold")
        t.add_column("value")
        for k, v in items:
            t.add_row(k, fmt(v))
        self.console.print(t)

    def progress(self, text: str):
        """A spinner on stderr while something slow runs, only for a person at a terminal."""
        if not sys.stderr.isatty():
            return contextlib.nullcontext()
        return self.err.status(text, spinner="dots")


def make_table(title: str, columns: list[str], rows: list[list], caption: str | None = None):
    from rich.table import Table  # lazy: see Output.__init__

    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for c in columns:
        numeric = c.endswith(NUMERIC_HINTS) and c not in ("rule", "source")
        t.add_column(c, justify="right" if numeric else "left", overflow="fold")
    for r in rows:
        t.add_row(*[fmt(x) for x in r])
    return t


def _yaml(data) -> str:
    # through JSON first: the same values as -o json (numbers, strings for anything else)
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=True, allow_unicode=True)


def duration(seconds: float) -> str:
    """1d 2h 3m 4s, from the largest unit present."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def field_lines(violations, source: str) -> list[str]:
    """FILE:LINE: path: message, one per violation."""
    lines = []
    for v in violations:
        if source and v.line:
            lines.append(f"{source}:{v.line}: {v.path or '(document)'}: {v.message}")
        elif source:
            lines.append(f"{source}: {v.path or '(document)'}: {v.message}")
        else:
            lines.append(f"  {v.path or '(request)'}: {v.message}")
    return lines


def print_estimate(out: Output, est, stream=None) -> None:
    """The blast-radius estimate's summary and its five largest rules."""
    if est is None or not est.summary:
        return
    p = (lambda s: print(s, file=stream)) if stream else out.note
    p(f"blast radius: {est.summary}")
    for r in list(est.rules)[:5]:
        p(f"  rule {r.rule}: {r.sources_newly_dropped:,} sources, {r.newly_dropped_pps:,.0f} pps newly dropped")


# ------------------------------------------------------------ -o json errors
def error_document(message: str, exit_code: int, code: str = "", violations=(), source: str = "",
                   estimate=None) -> dict:  # fmt: skip
    doc = {"error": {"message": message, "code": code or ("USAGE" if exit_code == 2 else "FAILED"),
                     "exit_code": exit_code,
                     "violations": [{"path": v.path, "line": v.line or 0, "message": v.message} for v in violations],
                     "source": source}}  # fmt: skip
    if estimate is not None and getattr(estimate, "summary", ""):
        doc["error"]["estimate"] = estimate.summary
    return doc


def print_error(doc: dict, mode: str) -> None:
    """The error as one JSON object (or a YAML document) on stderr."""
    if mode == "yaml":
        sys.stderr.write(yaml.safe_dump(doc, sort_keys=True))
    else:
        print(json.dumps(doc, sort_keys=True), file=sys.stderr, flush=True)


def quiet_broken_pipe() -> None:
    """`tidegate -o json watch | head -1`: the reader left; don't complain at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
