"""What a caller types cannot slip past a name pattern or forge a log line:
rule names match their pattern in full ('web\\n' is not 'web'), and every
value the agent logs is quoted and escaped, so a reason holding a newline
stays inside its own line. A real agent, a real gRPC channel, the agent's
real log."""

from __future__ import annotations

import json
import sqlite3

import grpc
import pytest

from .conftest import BASE_RULES, bpftool_dump

pytestmark = pytest.mark.e2e

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def agent(start_agent):
    return start_agent("nml", BASE_RULES)


def _versions(agent) -> list:
    db = sqlite3.connect(f"file:{agent.state_dir / 'tidegate.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT number, state, content FROM versions ORDER BY number").fetchall()
    finally:
        db.close()


def test_a_rule_name_with_a_newline_is_refused_by_the_server(agent):
    api = agent.api
    maps0, versions0 = bpftool_dump(agent.pin_dir), _versions(agent)
    active0 = api.GetStatus().active_version
    for name in ("web\n", "web\r\n", "\nweb", "we\nb"):
        text = BASE_RULES.replace("name: app", f"name: {json.dumps(name)}")
        assert f"name: {json.dumps(name)}" in text
        checked = api.ValidateRuleSet(yaml=text)
        assert not checked.valid, repr(name)
        assert [v.path for v in checked.violations] == ["rules[0].name"], checked.violations
        assert "not a valid rule name" in checked.violations[0].message
        for shadow in (False, True):
            err = api.error("ApplyRuleSet", yaml=text, reason="a name with a newline", shadow=shadow)
            assert err.code() == INVALID_ARGUMENT, repr(name)
            assert [v.path for v in api.violations(err)] == ["rules[0].name"]
        # the same rule set with the plain name is fine
        assert api.ValidateRuleSet(yaml=text.replace(f"name: {json.dumps(name)}", "name: web")).valid

    assert bpftool_dump(agent.pin_dir) == maps0, "nothing reached the kernel"
    assert _versions(agent) == versions0, "nothing reached the store"
    assert api.GetStatus().active_version == active0
