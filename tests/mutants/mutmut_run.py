"""mutmut on the pure logic the unit tests drive without a kernel.

mutmut (3.x) mutates a copy of the sources it finds under src/ and runs the
tests that cover each mutated function. tidegate's package lives in
control/, so this script lays out a scratch project under /tmp (src/tidegate
= a copy of control/tidegate, the selected unit tests, a [tool.mutmut]
section), marks every function outside the selection `# pragma: no mutate
block` in that copy, runs `mutmut run` there and reports the mutation score.
Survivors must be listed in tests/mutants/mutmut-equivalent.txt with a
one-line reason (name  # reason); any other survivor fails the run and is
printed with its diff. The real tree is never touched.

    .venv/bin/python tests/mutants/mutmut_run.py [--keep] [--max-children N]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("mutmut-equivalent.txt")

# module -> the functions and methods mutated (Class.method, Class.* for a whole class)
SELECTION = {
    "safety/estimate.py": ["estimate", "check", "_representative", "_mask_key"],
    "safety/guard.py": ["drop_share", "CounterHistory.between", "CounterHistory.take", "Guard.__init__",
                        "Guard._dropped_sources_before", "Guard._sources_cause", "Guard._covered", "Guard._run",
                        "Guard._roll_back"],
    "kernel/layout.py": ["mask_halves", "addr_halves", "halves_to_address", "network_key"],
    "kernel/entries.py": ["_contains", "bucket_params", "rule_params", "_is_any_source", "_build_kernel_rule_set",
                          "_inherit", "same_matching", "trie_family", "kernel_trie_entries", "kernel_port_entries",
                          "Classifier.*"],
    "access/auth.py": ["ensure_token_file", "parse_tokens", "token_for", "Authorizer.authorize"],
    # the field validators; _build and _rule (cross-field checks, mostly message text) are left out to
    # bound the run: every mutant there re-runs the hypothesis tests (their checks are judged by the
    # independent schema in test_hostile_rule_sets)
    "ruleset/parse.py": ["_int", "_limit", "_prefix_limit", "_network", "_networks", "_ports", "_str",
                         "_check_keys", "_want_map"],
}  # fmt: skip
TESTS = ["tests/unit/test_safety.py", "tests/unit/test_kernel_layout.py", "tests/unit/test_kernel_entries.py",
         "tests/unit/test_auth.py",
         "tests/unit/test_ruleset_errors.py", "tests/unit/test_hostile_rule_sets.py",
         # the parser's two paths for a list of networks, each against the other (ruleset/parse._networks)
         "tests/unit/test_trie_arrays.py", "tests/unit/test_yaml_flow_lists.py",
         "tests/unit/test_v4_networks.py",
         # the estimate over classes of folded sources (the real sampler, window and fold)
         "tests/unit/test_window_fold.py"]  # fmt: skip
# the hypothesis tests at 2% of their examples (at least 20): each mutant runs the tests covering its function
ENV = {"TIDEGATE_HYPOTHESIS_SCALE": "0.02"}
PYPROJECT = """\
[tool.mutmut]
source_paths = ["src"]
also_copy = ["bpf"]
only_mutate = [{only}]
pytest_add_cli_args_test_selection = [{tests}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
# a log line is not a safety property
do_not_mutate_patterns = ['^\\s*log\\.']
use_git_change_detection = false

[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"
filterwarnings = ["ignore::DeprecationWarning:bcc.*"]
"""


def selected(qualname: str, names: list[str]) -> bool:
    cls = qualname.split(".")[0]
    return qualname in names or f"{cls}.*" in names


def mark_unselected(path: Path, names: list[str]) -> int:
    """Append `# pragma: no mutate block` to the header line of every
    function or method not selected. Returns how many were marked."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    marks = []
    for node in tree.body:
        defs = [(node.name, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(node, ast.ClassDef):
            defs = [(f"{node.name}.{n.name}", n) for n in node.body if isinstance(n, (ast.FunctionDef,
                                                                                      ast.AsyncFunctionDef))]  # fmt: skip
        for qual, fn in defs:
            if selected(qual, names):
                continue
            # the header ends on the last line before the body that ends with ':' (a comment may follow)
            i = fn.body[0].lineno - 2
            while not re.search(r":\s*(#.*)?$", lines[i]):
                i -= 1
            lines[i] = re.sub(r"\s*#.*$", "", lines[i]) + "  # pragma: no mutate block"
            marks.append(qual)
    path.write_text("\n".join(lines) + "\n")
    return len(marks)


def layout(dest: Path) -> None:
    shutil.copytree(ROOT / "control" / "tidegate", dest / "src" / "tidegate",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(ROOT / "bpf", dest / "bpf")  # tests that read the C layout find it beside tests/
    (dest / "tests" / "unit").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", dest / "tests" / "conftest.py")
    # the rule sets the tests read by name (fixtures.rule_set), beside conftest.py as in the tree
    shutil.copytree(ROOT / "tests" / "fixtures", dest / "tests" / "fixtures", ignore=shutil.ignore_patterns("__pycache__"))
    for t in TESTS:
        shutil.copy(ROOT / t, dest / t)
    for module, names in SELECTION.items():
        mark_unselected(dest / "src" / "tidegate" / module, names)
    only = ", ".join(f'"src/tidegate/{m}"' for m in SELECTION)
    tests = ", ".join(f'"{t}"' for t in TESTS)
    (dest / "pyproject.toml").write_text(PYPROJECT.format(only=only, tests=tests))


def equivalent() -> dict[str, str]:
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition("#")
            out[name.strip()] = reason.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the scratch project")
    ap.add_argument("--max-children", type=int, default=2)
    args = ap.parse_args(argv)
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        raise SystemExit("mutmut is not installed: .venv/bin/pip install 'mutmut>=3.8,<4'")
    dest = Path(tempfile.mkdtemp(prefix="tidegate-mutmut-"))
    print(f"scratch project: {dest}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_") and k != "PYTHONPATH"}
    env.update(ENV)
    try:
        layout(dest)
        r = subprocess.run([str(mutmut), "run", "--max-children", str(args.max_children)], cwd=dest, env=env,
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
            return 2
        res = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=dest, env=env, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        status: dict[str, str] = {}
        for line in res.splitlines():
            name, _, st = line.strip().rpartition(": ")
            if name:
                status[name] = st
        counts: dict[str, int] = {}
        for st in status.values():
            counts[st] = counts.get(st, 0) + 1
        known = equivalent()
        survivors = sorted(n for n, st in status.items() if st in ("survived", "no tests", "suspicious", "timeout"))
        unexplained = [n for n in survivors if n not in known]
        stale = sorted(set(known) - set(survivors))
        by_module: dict[str, list[int]] = {}
        for n, st in status.items():
            mod = n.split(".x_")[0].split(".xǁ")[0]  # tidegate.safety.estimate.x_estimate__mutmut_3 -> tidegate.safety.estimate
            row = by_module.setdefault(mod, [0, 0])
            row[0] += 1
            row[1] += st == "killed"
        total = len(status)
        killed = counts.get("killed", 0)
        print(f"\nmutants: {total}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for mod, (n, k) in sorted(by_module.items()):
            print(f"  {mod}: {k}/{n} killed ({k / n:.1%})")
        print(f"mutation score: {killed}/{total} = {killed / max(total, 1):.1%} killed; "
              f"{len(survivors) - len(unexplained)} survivors listed as equivalent")  # fmt: skip
        for n in unexplained:
            diff = subprocess.run([str(mutmut), "show", n], cwd=dest, env=env, capture_output=True, text=True).stdout
            print(f"\nSURVIVED, not listed as equivalent: {n}\n{diff}")
        for n in stale:
            print(f"listed as equivalent but not a survivor (remove it from {EQUIVALENT.name}): {n}")
        return 1 if unexplained else 0
    finally:
        if args.keep:
            print(f"kept {dest}")
        else:
            shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
