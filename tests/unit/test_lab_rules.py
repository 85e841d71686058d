"""The lab's rule set ships in the package and examples/lab.yaml is that
same file (a link), not a second copy that could drift."""

from pathlib import Path

from tidegate.lab.run import lab_rules_text
from tidegate.ruleset.parse import parse_rule_set

ROOT = Path(__file__).resolve().parents[2]


def test_the_lab_rule_set_is_package_data_and_examples_shows_the_same_file():
    text = lab_rules_text()
    assert (ROOT / "examples" / "lab.yaml").read_text() == text
    rs = parse_rule_set(text, source="lab.yaml")
    assert [r.name for r in rs.rules] == ["app", "sink"]
