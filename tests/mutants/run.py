"""Named mutants: break one safety property at a time in a scratch copy of
the repository and check that the tests that claim it notice.

Each entry of tests/mutants/mutants.toml names a mutation (an exact text
found once in one file and what replaces it), the property it breaks and
the tests that must catch it. For every mutant this script writes the
mutated file into a scratch copy under /tmp (the real tree is never
touched), runs only those tests from the copy (PYTHONPATH points at the
copy's control/, so the agent subprocesses and BCC, which compiles bpf/
next to the package at load time, use the mutated code too), and reports:

  caught  a test failed on an assertion (what we want)
  missed  every selected test passed: the tests do not prove the property
  error   tests errored without failing (setup broke): not a proof either
  stale   the text to replace is not in the file exactly once: the code
          moved; update the mutant

Exit status 0 only if every mutant was caught.

    sudo .venv/bin/python tests/mutants/run.py [--only NAME ...] [--list] [--baseline] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = Path(__file__).with_name("mutants.toml")
EXCLUDE = (".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", "/mutants", "*.egg-info")


@dataclass
class Mutant:
    name: str
    property: str
    file: str
    find: str
    replace: str
    tests: list[str]
    env: dict = field(default_factory=dict)
    timeout: float = 1200


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    detail: str


def load(path: Path = SPEC) -> list[Mutant]:
    data = tomllib.loads(path.read_text())
    out = [Mutant(**m) for m in data["mutant"]]
    names = [m.name for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"{path}: duplicate mutant names: {sorted(dup)}")
    return out


def scratch_copy() -> Path:
    """The working tree (generated gRPC code included) copied under /tmp."""
    dest = Path(tempfile.mkdtemp(prefix="tidegate-mutants-"))
    argv = ["rsync", "-a", *(f"--exclude={e}" for e in EXCLUDE), f"{ROOT}/", f"{dest}/"]
    subprocess.run(argv, check=True)
    return dest


def env_for(copy: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env["PYTHONPATH"] = str(copy / "control")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def check_copy_is_used(copy: Path) -> None:
    """The copy's package, not the editable install of the real tree, is what
    the tests and the agent import; and BCC reads the copy's bpf/."""
    code = "import tidegate, tidegate.kernel.filter as k; print(tidegate.__file__); print(k.bpf_source_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy, {}), capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    if not all(p.startswith(str(copy)) for p in out):
        raise SystemExit(f"the scratch copy is not what gets imported: {out}")


SHOW_OUTPUT = False


def run_tests(copy: Path, tests: list[str], env: dict, timeout: float) -> tuple[str, str]:
    """(status, detail) of one pytest run from the copy."""
    xml = copy / ".mutant-junit.xml"
    if xml.exists():
        xml.unlink()
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--junitxml={xml}", *tests]
    try:
        r = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {timeout:.0f} s"
    if SHOW_OUTPUT:
        print("\n".join((r.stdout + r.stderr).strip().splitlines()[-40:]), flush=True)
    failed, errored, passed = [], [], 0
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            if case.find("failure") is not None:
                failed.append(name)
            elif case.find("error") is not None:
                errored.append(name)
            elif case.find("skipped") is None:
                passed += 1
    if failed:
        return "caught", ", ".join(failed)
    if errored or r.returncode not in (0, 1):
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        return "error", f"{', '.join(errored)} {' | '.join(tail)}".strip()
    if r.returncode == 0 and passed:
        return "missed", f"{passed} passed"
    return "error", f"pytest exit {r.returncode}, nothing ran"


def mutate(copy: Path, m: Mutant) -> str | None:
    """Write the mutation; return the original text (None if stale)."""
    path = copy / m.file
    text = path.read_text()
    if text.count(m.find) != 1:
        return None
    path.write_text(text.replace(m.find, m.replace, 1))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--baseline", action="store_true",
                    help="first run each mutant's tests unmutated: they must pass (a failing test proves nothing)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    ap.add_argument("--output", action="store_true", help="print the end of each pytest run's output")
    args = ap.parse_args(argv)
    global SHOW_OUTPUT
    SHOW_OUTPUT = args.output

    mutants = load()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}\n  breaks: {m.property}\n  in:     {m.file}\n  tests:  {' '.join(m.tests)}")
        return 0
    if os.geteuid() != 0 and any("tests/unit" not in t for m in mutants for t in m.tests):
        raise SystemExit("tests/mutants/run.py: kernel and e2e tests need root (sudo make mutants)")

    copy = scratch_copy()
    print(f"scratch copy: {copy}", flush=True)
    results: list[Result] = []
    t_all = time.monotonic()
    try:
        check_copy_is_used(copy)
        for i, m in enumerate(mutants, 1):
            env = env_for(copy, m.env)
            if args.baseline:
                t0 = time.monotonic()
                status, detail = run_tests(copy, m.tests, env, m.timeout)
                if status != "missed":  # "missed" here means: all passed, as they must unmutated
                    results.append(Result(m.name, "baseline-" + status, time.monotonic() - t0, detail))
                    print(f"[{i}/{len(mutants)}] {m.name}: unmutated tests do not pass: {detail}", flush=True)
                    continue
            original = mutate(copy, m)
            if original is None:
                results.append(Result(m.name, "stale", 0.0, f"text to replace is not in {m.file} exactly once"))
                print(f"[{i}/{len(mutants)}] {m.name}: stale", flush=True)
                continue
            t0 = time.monotonic()
            try:
                status, detail = run_tests(copy, m.tests, env, m.timeout)
            finally:
                (copy / m.file).write_text(original)
            results.append(Result(m.name, status, time.monotonic() - t0, detail))
            print(f"[{i}/{len(mutants)}] {m.name}: {status} in {results[-1].seconds:.0f} s: {detail}", flush=True)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    total = time.monotonic() - t_all
    width = max(len(r.name) for r in results) if results else 10
    print(f"\n{'mutant':<{width}}  status   seconds  caught by")
    for r in results:
        print(f"{r.name:<{width}}  {r.status:<7}  {r.seconds:7.1f}  {r.detail}")
    caught = sum(r.status == "caught" for r in results)
    print(f"\n{caught} of {len(results)} mutants caught in {total:.0f} s")
    return 0 if results and caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
