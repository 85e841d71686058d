"""validate's warnings (no default limit, deny inside allow, a rule an
earlier rule hides), --strict and -o json/yaml, through the real CLI
(offline: no agent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures import rule_set
from tidegate.cli.verb import EXIT_WARNINGS
from tidegate.ruleset.checks import warnings
from tidegate.ruleset.parse import parse_rule_set

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "tidegate"

QUESTIONABLE = rule_set("questionable")


def codes(text: str) -> list[tuple[str, str, int | None]]:
    return [(w.code, w.path, w.line) for w in warnings(parse_rule_set(text), text)]


def test_each_warning_names_its_entry_and_line():
    assert codes(QUESTIONABLE) == [("no-defaults", "defaults.limit", None), ("deny-inside-allow", "deny[0]", 2),
                                   ("shadowed-rule", "rules[1]", 8)]  # fmt: skip


@pytest.mark.parametrize("earlier,later,hidden", [
    ("protocol: any", "protocol: udp\n    dst_ports: [53]", True),            # any protocol, any port
    ("protocol: udp\n    dst_ports: [53]", "protocol: udp\n    dst_ports: [53, 54]", False),  # 54 still reaches it
    ("protocol: udp\n    dst_ports: [\"50-60\"]", "protocol: udp\n    dst_ports: [53]", True),
    ("protocol: tcp", "protocol: udp", False),                               # other protocol
    ("protocol: any\n    dst_ports: [53]", "protocol: icmp", False),          # ICMP has no port
    ("protocol: udp\n    sources: [\"10.0.0.0/8\"]", "protocol: udp\n    sources: [\"10.2.0.0/16\"]", True),
    ("protocol: udp\n    sources: [\"10.0.0.0/8\"]", "protocol: udp", False),  # later matches all sources
    ("protocol: udp\n    sources: [\"0.0.0.0/0\", \"::/0\"]", "protocol: udp", True),
])  # fmt: skip
def test_shadowed_rule(earlier, later, hidden):
    text = (f"defaults:\n  limit: {{pps: 10}}\nrules:\n  - name: a\n    {earlier}\n"
            f"  - name: b\n    {later}\n")  # fmt: skip
    found = [(c, p, line) for c, p, line in codes(text) if c == "shadowed-rule"]
    line_b = text.splitlines().index("  - name: b") + 1
    assert found == ([("shadowed-rule", "rules[1]", line_b)] if hidden else [])


def test_examples_have_no_warnings():
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        assert codes(f.read_text()) == [], f


def run(*args: str, stdin: str | None = None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, input=stdin, timeout=60)


def test_validate_warns_and_strict_fails(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text(QUESTIONABLE)
    r = run("validate", str(f))
    assert r.returncode == 0 and "3 warnings" in r.stdout
    assert f"{f}:2: deny[0]: warning: 10.1.0.0/16 lies inside allow[0] 10.0.0.0/8" in r.stderr
    assert f"{f}:8: rules[1]: warning: rule 'http' never matches: rule 'web'" in r.stderr
    assert run("validate", "--strict", str(f)).returncode == EXIT_WARNINGS
    assert run("validate", "--strict", str(ROOT / "examples" / "edge-default.yaml")).returncode == 0


def test_structured_output_json_and_yaml_carry_the_warnings(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text(QUESTIONABLE)
    j = json.loads(run("-o", "json", "validate", str(f)).stdout)
    y = yaml.safe_load(run("validate", str(f), "-o", "yaml").stdout)
    assert j == y
    assert j["valid"] is True and [w["code"] for w in j["warnings"]] == ["no-defaults", "deny-inside-allow",
                                                                         "shadowed-rule"]  # fmt: skip


def test_errors_are_json_with_o_json(tmp_path):
    r = run("-o", "json", "diff", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and r.stdout == ""
    err = json.loads(r.stderr)["error"]
    assert err["exit_code"] == 2 and "no such file" in err["message"]
    r = run("-o", "json", "--server", "127.0.0.1:1", "--timeout", "2", "status")
    assert r.returncode == 3 and json.loads(r.stderr)["error"]["code"] == "UNREACHABLE"
    r = run("-o", "yaml", "--server", "127.0.0.1:1", "--timeout", "2", "whatif", str(ROOT / "examples" / "lab.yaml"))
    assert r.returncode == 3 and yaml.safe_load(r.stderr)["error"]["exit_code"] == 3
