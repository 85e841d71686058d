"""Secrets stay on the host: the CLI reads the token file on its own only
for a loopback --server, and never sends a bearer token in clear text to
any other address. Against a real agent listening on the lab's host-end
address (not loopback, --insecure) and on loopback."""

from __future__ import annotations

import os
import subprocess

import pytest

from .conftest import BASE_RULES, BIN

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def remote(start_agent):
    """An agent on a non-loopback address without TLS (what --insecure allows)."""
    return start_agent("htok", BASE_RULES, ["--insecure"], host="lab")


def tidegate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60,
                          env={**base, "TIDEGATE_AUTHOR": "token-rule", **(env or {})})  # fmt: skip


def denied(agent) -> int:
    return len(agent.api.ListAudit(limit=1000, action="auth-denied").entries)


def test_no_token_is_sent_in_clear_text_to_a_non_loopback_address(remote):
    assert not remote.host.startswith("127.")
    token_file = str(remote.state_dir / "tokens")
    admin = remote.token("admin")
    denied0 = denied(remote)
    versions0 = remote.api.ListVersions(limit=100)
    # a token given on purpose, three ways: refused before any connection, naming TLS
    for how in (["--token", admin], ["--token-file", token_file]):
        r = tidegate("--server", remote.server, *how, "rollback", "--reason", "x")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "refusing to send the API token in clear text" in r.stderr and "TLS" in r.stderr, r.stderr
        assert admin not in r.stderr + r.stdout
    r = tidegate("--server", remote.server, "status", env={"TIDEGATE_TOKEN": admin})
    assert r.returncode == 2 and "TLS" in r.stderr, r.stderr
    r = tidegate("status", env={"TIDEGATE_SERVER": remote.server, "TIDEGATE_TOKEN": admin})
    assert r.returncode == 2 and "TLS" in r.stderr, r.stderr
    # nothing reached the agent: no refused call was audited, no version was made
    assert denied(remote) == denied0
    assert remote.api.ListVersions(limit=100) == versions0

    # the token file in the environment (as the lab prints it) is not read for a remote server:
    # the call goes out without a token and is refused, and the error says remote agents need TLS
    r = tidegate("--server", remote.server, "status", env={"TIDEGATE_TOKEN_FILE": token_file})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "UNAUTHENTICATED" in r.stderr and "not a loopback address" in r.stderr and "TLS" in r.stderr
    assert denied(remote) == denied0 + 1  # it arrived without credentials


def test_the_token_file_is_read_on_its_own_for_loopback(start_agent):
    local = start_agent("htol", BASE_RULES)
    token_file = str(local.state_dir / "tokens")
    for server in (local.server, f"localhost:{local.port}"):
        r = tidegate("--server", server, "-o", "json", "status", env={"TIDEGATE_TOKEN_FILE": token_file})
        assert r.returncode == 0, r.stdout + r.stderr
        assert '"attached": true' in r.stdout
    # and a token may be given on purpose on loopback
    r = tidegate("--server", local.server, "--token", local.token("read"), "status")
    assert r.returncode == 0, r.stderr
