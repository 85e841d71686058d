"""Starting and restarting a real agent: what it reads, what it refuses,
what it creates and what it reports while the filter is (not) attached.

- the --rules seed file is read only when it is used (store and kernel
  empty): a missing or broken one never stops a restart on a good store;
- the state dir's files (store, -wal, -shm, .bak, tokens) are private;
- a role map naming an unknown role stops the start with one clear line;
- gRPC health is NOT_SERVING while the filter is not attached.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import grpc
import pytest

from .conftest import BASE_RULES, BIN, PIN_ROOT, free_port, xdp_prog_id

pytestmark = pytest.mark.e2e

DROP_APP = BASE_RULES.replace("    limit: {pps: 500, burst: 500}", "    action: drop")


def _status(agent) -> tuple:
    st = agent.api.GetStatus()
    return st.attached, st.active_version


# -------------------------------------------------------- state-dir modes
def test_the_state_dir_files_are_private(start_agent):
    old = os.umask(0o022)  # what a shell or systemd (without UMask=) gives the agent
    try:
        agent = start_agent("umask", BASE_RULES)
        agent.api.ApplyRuleSet(yaml=DROP_APP, reason="write through the WAL", force=True)
        first = _modes(agent.state_dir)
        agent.stop()
        # an older store: the next start backs it up before the schema migration
        db = sqlite3.connect(agent.state_dir / "tidegate.db")
        db.execute("PRAGMA user_version = 0")
        db.close()
        agent.start()
        agent.api.ApplyRuleSet(yaml=BASE_RULES, reason="again", force=True)
    finally:
        os.umask(old)
    again = _modes(agent.state_dir)
    assert {"tidegate.db", "tidegate.db-wal", "tidegate.db-shm", "tokens"} <= first.keys(), first
    assert {"tidegate.db", "tidegate.db-wal", "tidegate.db-shm", "tidegate.db.bak", "tokens"} <= again.keys(), again
    for when, modes in (("first start", first), ("after a migration", again)):
        assert all(int(m, 8) & 0o077 == 0 for m in modes.values()), f"{when}: readable by others: {modes}"
    assert os.stat(agent.state_dir).st_mode & 0o077 == 0


def _modes(d) -> dict[str, str]:
    return {p.name: f"{os.stat(p).st_mode & 0o777:04o}" for p in d.iterdir()}
