"""`tidegate certs`: the lab PKI. Names match their pattern in full, adding a
client leaves the CA and the server's files alone, and the files are written
so that nobody else on the host can plant or swap them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tidegate.certs import CertsError, make_lab_pki

BACKENDS = ["cryptography", pytest.param("openssl", marks=pytest.mark.skipif(
    not shutil.which("openssl"), reason="the openssl command is not installed"))]  # fmt: skip
BIN = Path(sys.executable).parent / "tidegate"


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("server, client", [("edge1\n", "alice"), ("edge1", "alice\n"), ("edge1", "\nalice"),
                                            ("edge1", "al\nice"), ("edge1\r\n", "alice")])  # fmt: skip
def test_names_must_match_in_full(tmp_path, server, client):
    out = tmp_path / "pki"
    with pytest.raises(CertsError, match="is not a usable name"):
        make_lab_pki(out, server, [client])
    assert not out.exists() or not any(out.iterdir()), "nothing was written"


def _verify(d: Path, *names: str) -> None:
    if not shutil.which("openssl"):
        return
    r = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.pem"), *(str(d / f"{n}.pem") for n in names)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


KEPT = ("ca.pem", "ca.key", "server.pem", "server.key")


@pytest.mark.parametrize("backend", BACKENDS)
def test_adding_a_client_keeps_the_ca_and_the_server_files(tmp_path, backend):
    out = tmp_path / "pki"
    make_lab_pki(out, "edge1", ["alice"], backend=backend)
    before = _tree(out)
    made = make_lab_pki(out, None, ["bob"], role="read", backend=backend)
    after = _tree(out)
    assert {n: after[n] for n in KEPT} == {n: before[n] for n in KEPT}, "the CA and the server's files are untouched"
    assert after["alice.pem"] == before["alice.pem"] and after["alice.key"] == before["alice.key"]
    assert {"bob.pem", "bob.key"} <= after.keys() and sorted(made["kept"]) == sorted(str(out / n) for n in KEPT)
    # the same server name again (what the lab scripts run) keeps them too
    make_lab_pki(out, "edge1", ["carol"], backend=backend)
    assert {n: _tree(out)[n] for n in KEPT} == {n: before[n] for n in KEPT}
    _verify(out, "server", "alice", "bob", "carol")


def test_another_server_name_is_refused_while_the_server_files_exist(tmp_path):
    out = tmp_path / "pki"
    make_lab_pki(out, "edge1", ["alice"])
    before = _tree(out)
    with pytest.raises(CertsError, match=r"server\.pem is for 'edge1', not 'edge2'.*move server\.pem and server\.key"):
        make_lab_pki(out, "edge2", ["bob"])
    assert _tree(out) == before, "nothing was written"


def test_the_certs_verb_adds_a_client_without_touching_the_server(tmp_path):
    out = tmp_path / "pki"
    argv = [str(BIN), "certs", "--out", str(out)]
    r = subprocess.run([*argv, "--server-name", "edge1", "--client", "alice"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before = _tree(out)
    r = subprocess.run([*argv, "--client", "bob"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {n: _tree(out)[n] for n in KEPT} == {n: before[n] for n in KEPT}
    assert str(out / "bob.pem") in r.stdout.splitlines() and str(out / "server.pem") not in r.stdout.splitlines()
    _verify(out, "server", "alice", "bob")
