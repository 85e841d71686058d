"""Hostile callers against a real agent over a real gRPC channel: nothing a
caller sends crashes or stalls the agent, and nothing it sends changes the
kernel's rule-set maps, the active version or the store.

One agent serves the module, started with BASE_RULES; every test leaves it
as it found it.
"""

from __future__ import annotations

import grpc
import pytest

from tidegate.ruleset_yaml import MAX_DEPTH

from .conftest import BASE_RULES, Api, bpftool_dump, xdp_prog_id

pytestmark = pytest.mark.e2e

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
DEPTH_WORDS = f"depth limit of a rule set is {MAX_DEPTH}"


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("hapi", BASE_RULES)


@pytest.fixture(scope="module")
def reader(agent):
    api = Api(agent, role="read")
    yield api
    api.close()


class Unchanged:
    """What a refused call must leave as it was: the process, the attached
    program, the active version, the pinned rule-set maps, the versions."""

    def __init__(self, agent):
        self.agent = agent
        self.prog = xdp_prog_id(agent.lab.host_if)
        self.maps = bpftool_dump(agent.pin_dir)
        self.status = agent.api.GetStatus()
        self.versions = agent.api.ListVersions(limit=1000)
        assert self.prog and self.status.attached and self.status.active_version

    def check(self) -> None:
        a = self.agent
        assert a.proc.poll() is None, f"the agent died ({a.proc.returncode}):\n{a.log()[-3000:]}"
        st = a.api.GetStatus()
        assert st.attached and st.active_version == self.status.active_version
        assert st.shadow_version == self.status.shadow_version
        assert xdp_prog_id(a.lab.host_if) == self.prog
        assert bpftool_dump(a.pin_dir) == self.maps
        assert a.api.ListVersions(limit=1000) == self.versions


def nested(style: str, depth: int) -> str:
    """A rule-set text nested `depth` levels below `rules:`."""
    if style == "flow-seq":
        return "rules: " + "[" * depth + "]" * depth + "\n"
    if style == "flow-map":
        return "rules: " + "{a: " * depth + "1" + "}" * depth + "\n"
    if style == "block-seq":  # compact block sequences: "- - - x"
        return "rules:\n  " + "- " * depth + "x\n"
    if style == "block-map":  # one more space a level: the text grows with depth squared
        return "rules:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(depth)) + " " * (depth + 1) + "b: 1\n"
    raise ValueError(style)


STYLES = ("flow-seq", "flow-map", "block-seq", "block-map")
DEPTHS = (10, 100, 1_000, 10_000, 100_000)


def _depth_cases():
    for style in STYLES:
        for depth in DEPTHS:
            if style == "block-map" and depth > 2_000:  # 2,000 levels are 2 MB of indentation already
                continue
            yield style, depth


def test_deep_nesting_is_refused_with_the_depth_limit_and_changes_nothing(agent, reader):
    """The 100 KB text that used to kill the agent with SIGSEGV (libyaml's
    composer recursing 50,000 levels), and its relatives in every style,
    through the three calls that parse rule sets, from a read caller and an
    admin."""
    before = Unchanged(agent)
    cases = 0
    for style, depth in _depth_cases():
        text = nested(style, depth)
        v = reader.ValidateRuleSet(yaml=text, source="deep.yaml")
        assert not v.valid and len(v.violations) == 1, (style, depth, v)
        assert DEPTH_WORDS in v.violations[0].message and v.violations[0].line >= 1, (style, depth, v)
        e = reader.error("WhatIf", yaml=text, source="deep.yaml")
        assert e.code() == INVALID_ARGUMENT and DEPTH_WORDS in e.details(), (style, depth, e.details())
        assert DEPTH_WORDS in reader.violations(e)[0].message
        e = agent.api.error("ApplyRuleSet", yaml=text, source="deep.yaml", reason="deep", force=True)
        assert e.code() == INVALID_ARGUMENT and DEPTH_WORDS in e.details(), (style, depth, e.details())
        cases += 1
    assert cases == 18
    # the exact text from the report, one more time, then everything is checked
    v = reader.ValidateRuleSet(yaml="rules: " + "[" * 50_000 + "]" * 50_000)
    assert not v.valid and DEPTH_WORDS in v.violations[0].message
    before.check()


def test_legitimate_depth_still_validates(reader):
    """The limit is not in the way: a rule set as deep as rule sets get."""
    v = reader.ValidateRuleSet(yaml=BASE_RULES.replace("limit: {pps: 500, burst: 500}",
                                                       "limit: {pps: 500, burst: 500}\n    sources: ['0.0.0.0/0']"))
    assert v.valid, v
