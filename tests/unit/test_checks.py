"""validate's warnings (no default limit, deny inside allow, a rule an
earlier rule hides), --strict and -o json/yaml, through the real CLI
(offline: no agent)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _first_covering(deny, allow):
    """The definition: for each deny entry, the first allow entry containing it."""
    from tidegate.ruleset.checks import covers_net

    return [next((j for j, a in enumerate(allow) if covers_net(a, d)), None) for d in deny]


_NETS = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network((a >> (32 - p) << (32 - p), p)),
              st.sampled_from([0x0A000000, 0x0A010000, 0x0A010200, 0xC0000200, 0x0A0102FF]), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.ip_network((a >> (128 - p) << (128 - p), p)),
              st.sampled_from([0x20010DB8 << 96, (0x20010DB8 << 96) | (1 << 80), 0xFFFF0A000000]), st.integers(0, 128)),
)  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_NETS, max_size=12), st.lists(_NETS, max_size=12))
def test_deny_inside_allow_is_found_as_its_definition_says(deny, allow):
    """By prefix length, not pair by pair: the same first allow entry for
    each deny entry, IPv4 and IPv6 apart (an IPv4-mapped IPv6 network does
    not contain an IPv4 one)."""
    from tidegate.ruleset.checks import first_allow_around

    assert first_allow_around(deny, allow) == _first_covering(deny, allow)


def test_deny_inside_allow_of_a_long_list_names_the_first_allow_entry():
    allow = [f"10.{i // 256}.{i % 256}.0/24" for i in range(3000)] + ["10.0.0.0/8", "10.1.0.0/16"]
    text = (f"defaults: {{limit: {{pps: 10, burst: 10}}}}\nallow: {json.dumps(allow)}\n"
            'deny: ["10.1.2.0/25", "11.0.0.0/8", "10.200.0.0/16"]\nrules: []\n')  # fmt: skip
    ws = warnings(parse_rule_set(text), text)
    assert [(w.path, w.message.split(": ")[0]) for w in ws] == [
        ("deny[0]", "10.1.2.0/25 lies inside allow[258] 10.1.2.0/24"),
        ("deny[2]", "10.200.0.0/16 lies inside allow[3000] 10.0.0.0/8"),
    ]
