"""What a caller types cannot slip past a name pattern or forge a log line:
rule names match their pattern in full ('web\\n' is not 'web'), and every
value the agent logs is quoted and escaped, so a reason holding a newline
stays inside its own line. A real agent, a real gRPC channel, the agent's
real log."""

from __future__ import annotations

import json
import re
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


FORGED = 'ts=2099-01-01T00:00:00Z level=error logger=tidegate.daemon.agent msg="forged"'
LINE = re.compile(r'^ts=\S+Z level=[a-z]+ logger=\S+ msg="(?:[^"\\]|\\.)*"( [A-Za-z_]+=("(?:[^"\\]|\\.)*"|[^\s"]+))*$')


@pytest.mark.parametrize("reason", [f"ok\n{FORGED}", "ok\n" + FORGED.replace(" ", "\t"), "a\rb\x1b[2Kc"],
                         ids=["newline", "newline-no-spaces", "control-chars"])  # fmt: skip
def test_a_reason_cannot_forge_a_log_line(agent, reason):
    api = agent.api
    before = agent.log()
    version = api.ApplyRuleSet(yaml=BASE_RULES, reason=reason, force=True).version
    api.Rollback(reason=f"back\n{FORGED}")
    new = agent.log()[len(before):]
    lines = new.splitlines()
    assert lines, "the agent logged the apply"
    for line in lines:
        assert LINE.match(line), f"not one well-formed log line: {line!r}"
        assert not line.startswith(FORGED[:30]) and "\t" not in line and "\r" not in line and "\x1b" not in line
    applied = [ln for ln in lines if 'msg="applied"' in ln and f"version={version}" in ln]
    assert len(applied) == 1
    assert f"reason={json.dumps(reason)}" in applied[0], "the reason is kept, quoted and escaped"
    assert api.GetVersion(number=version).info.reason == reason, "the store keeps it as given"
