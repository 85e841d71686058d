"""Checks a pipeline gates on, against a real agent: `whatif` and
`validate --against-agent` exit 5 when the agent's check would refuse the
file (over budget on the traffic seen, or a canary dropped), `diff FILE`
exits 1 when the file differs from the active version and 0 when it is
the same."""

from __future__ import annotations

import json
import time

import pytest

from tidegate.cli.verb import EXIT_CHECK_REFUSED

from .conftest import BASE_RULES, send

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]


@pytest.fixture(scope="module")
def agent(start_agent):
    a = start_agent("chk", BASE_RULES)
    a.tmp = a.workdir
    return a


def write(agent, name: str, text: str) -> str:
    p = agent.tmp / name
    p.write_text(text)
    return str(p)


def test_diff_file_against_the_active_version(agent):
    same = write(agent, "same.yaml", "# comments and order do not matter\n" + BASE_RULES)
    r = agent.cli("diff", same, check=False)
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    changed = write(agent, "changed.yaml", BASE_RULES.replace("pps: 500, burst: 500", "pps: 400, burst: 500"))
    r = agent.cli("diff", changed, check=False)
    assert r.returncode == 1, r.stderr
    assert "--- active version 1" in r.stdout and "+    limit: {pps: 400, burst: 500}" in r.stdout
    j = agent.cli("-o", "json", "diff", changed, check=False)
    assert j.returncode == 1 and json.loads(j.stdout)["identical"] is False
    bad = write(agent, "bad.yaml", "rules: 3\n")
    assert agent.cli("diff", bad, check=False).returncode == 2


def test_canary_dropped_exits_5_without_traffic(agent):
    f = write(agent, "canary.yaml", BASE_RULES + f'canaries: ["{agent.lab.peer_ip}"]\n'
              f'deny: ["{agent.lab.peer_ip}/32"]\n')  # fmt: skip
    r = agent.cli("whatif", f, check=False)
    assert r.returncode == EXIT_CHECK_REFUSED and "is on the deny list" in r.stdout, r.stdout + r.stderr
    r = agent.cli("validate", "--against-agent", f, check=False)
    assert r.returncode == EXIT_CHECK_REFUSED and "REFUSED" in r.stdout
    ok = write(agent, "ok.yaml", BASE_RULES)
    assert agent.cli("whatif", ok, check=False).returncode == 0
    assert agent.cli("validate", "--against-agent", ok, check=False).returncode == 0


def test_over_budget_exits_5_on_live_traffic(agent):
    p = send(agent.lab, src=agent.lab.peer_ip, dport=5555, count=600, pps=50, wait=False)
    try:
        time.sleep(6)
        tight = write(agent, "tight.yaml", BASE_RULES.replace("pps: 500, burst: 500", "pps: 2, burst: 2"))
        r = agent.cli("-o", "json", "whatif", tight, check=False)
        v = agent.cli("-o", "json", "validate", "--against-agent", tight, check=False)
    finally:
        p.kill()
        p.wait()
    assert r.returncode == EXIT_CHECK_REFUSED and json.loads(r.stdout)["within_budget"] is False
    assert v.returncode == EXIT_CHECK_REFUSED and json.loads(v.stdout)["estimate"]["within_budget"] is False
