"""What every benchmark prints and saves: the machine, the commit, tables.

Shared by bench/packet_path.py and bench/veth_flood.py. Results go to
bench/results/<name>.json (everything measured, every run) and
bench/results/<name>.md (a short table and the commit measured).
"""

from __future__ import annotations

import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
CONTROL = REPO / "control"


def use_repo_package() -> None:
    """Import the working tree's `tidegate` package, not an installed one."""
    if str(CONTROL) not in sys.path:
        sys.path.insert(0, str(CONTROL))


def bytecode_as_installed(control: Path = CONTROL) -> None:
    """Compile the working tree's package (or that under another checkout's
    control/) to bytecode, as the Debian package ships it
    (packaging/build-deb.sh), so that a measured agent start reads .pyc
    files instead of compiling ~60 modules from source at each start
    (~0.1 s) where PYTHONDONTWRITEBYTECODE is set or the tree just changed."""
    compileall.compile_dir(str(control / "tidegate"), quiet=1, workers=0)


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this benchmark loads BPF programs and creates interfaces: run it as root")


def require_bcc() -> None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        sys.exit(
            "bcc is not importable from this Python. Run the bench with the project's venv "
            "(.venv/bin/python, made by `make install`) or Debian's /usr/bin/python3 (python3-bpfcc)."
        )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    info = {
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            info["clocksource"] = f.read().strip()
    except OSError:
        pass
    try:
        import bcc

        info["bcc"] = getattr(bcc, "__version__", "unknown")
    except ImportError:
        pass
    return info


def short_commit(path: Path | str) -> str:
    """The short commit of the checkout holding `path` (the label of an
    --against run), or the path itself outside a git checkout."""
    try:
        r = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h"], capture_output=True, text=True,
                           timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return str(path)
    return r.stdout.strip() or str(path)


def git_commit() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", "bpf", "control").splitlines()
             if len(line.split(maxsplit=1)) == 2]
    dirty = [d for d in dirty if not d.endswith(("/", ".egg-info"))]
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "bpf_commit": git("log", "-1", "--format=%H", "--", "bpf"),
            "uncommitted": dirty, "bpf_or_control_modified": bool(dirty)}


def median(xs):
    return statistics.median(xs) if xs else None


def pct(xs, p):
    """The p-th percentile of xs (nearest rank), None for no values."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (also readable as plain text on a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def save(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jp = RESULTS / f"{name}.json"
    mp = RESULTS / f"{name}.md"
    data = {"commit": git_commit(), **data}
    jp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    mp.write_text(markdown.rstrip() + "\n")
    return jp, mp


def header_lines(title: str, method: str) -> list[str]:
    m = machine()
    g = git_commit()
    lines = [
        f"# {title}",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M:%S %Z')} at commit `{g['commit'][:12]}` ({g['subject']}); "
        f"bpf/ as of `{g['bpf_commit'][:12]}`"
        + (f"; uncommitted changes (other engineers' work in progress): {', '.join(g['uncommitted'][:6])}"
           if g["uncommitted"] else "; no uncommitted changes in bpf/ or control/") + ".",
        f"Machine: kernel {m['kernel']}, {m['cpu']}, {m['nproc']} CPUs, clocksource {m.get('clocksource', '?')}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.",
        "",
        "Method: " + method,
        "",
    ]
    return lines
