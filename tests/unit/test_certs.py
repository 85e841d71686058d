"""`tidegate certs`: the lab PKI. Names match their pattern in full, adding a
client leaves the CA and the server's files alone, and the files are written
so that nobody else on the host can plant or swap them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tidegate.access.certs import CertsError, make_lab_pki

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


@pytest.mark.parametrize("mode, uid, words", [
    (0o777, 0, "writable by group and others (mode 0777)"),
    (0o1777, 0, "writable by group and others (mode 1777)"),
    (0o775, 0, "writable by group (mode 0775)"),
    (0o757, 0, "writable by others (mode 0757)"),
    (0o755, 65534, "owned by uid 65534"),
], ids=["0777", "1777-like-tmp", "0775", "0757", "another-owner"])  # fmt: skip
def test_an_output_directory_another_user_can_write_is_refused(tmp_path, mode, uid, words):
    if os.geteuid() != 0 and uid != os.geteuid():
        pytest.skip("chown to another user needs root")
    out = tmp_path / "shared"
    out.mkdir()
    os.chmod(out, mode)
    os.chown(out, uid, -1)
    with pytest.raises(CertsError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        make_lab_pki(out, "edge1", ["alice"])
    assert str(out) in str(e.value)
    assert list(out.iterdir()) == [], "nothing was written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_links_are_not_followed(tmp_path, backend):
    """A link left where certs writes (a final name, or the temporary name an
    older version used) is replaced, never written through; a link where it
    reads (the CA, the role map) is refused."""
    out = tmp_path / "pki"
    out.mkdir(mode=0o700)
    make_lab_pki(out, "edge1", ["admin"], backend=backend)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    planted = ["alice.pem", "alice.key", "alice.pem.tmp", "alice.key.tmp", "roles.json.tmp"]
    for name in planted:
        (out / name).symlink_to(victim)
    make_lab_pki(out, "edge1", ["alice"], backend=backend)
    assert victim.read_bytes() == b"precious\n"
    for name in ("alice.pem", "alice.key"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 100
    _verify(out, "alice")

    for name in ("ca.key", "roles.json"):
        saved = (out / name).read_bytes()
        (out / name).unlink()
        (out / name).symlink_to(victim)
        with pytest.raises(CertsError, match=f"{name} is a symbolic link"):
            make_lab_pki(out, "edge1", ["bob"], backend=backend)
        assert victim.read_bytes() == b"precious\n" and not (out / "bob.pem").exists()
        (out / name).unlink()
        (out / name).write_bytes(saved)


def test_temporary_files_are_created_exclusively_and_without_following_links(tmp_path, monkeypatch):
    from tidegate.access import certs

    out = tmp_path / "pki"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    monkeypatch.setattr(certs.secrets, "token_hex", lambda n=None: "fixed")
    (out / ".ca.key.fixed.tmp").symlink_to(victim)  # exactly where the first temporary file goes
    with pytest.raises(CertsError, match=r"\.ca\.key\.fixed\.tmp"):
        make_lab_pki(out, "edge1", ["alice"])
    assert victim.read_bytes() == b"precious\n"
    (out / ".ca.key.fixed.tmp").unlink()
    (out / ".ca.key.fixed.tmp").write_bytes(b"left by a crash")  # a plain file there is not truncated either
    with pytest.raises(CertsError, match="already exists"):
        make_lab_pki(out, "edge1", ["alice"])
    assert (out / ".ca.key.fixed.tmp").read_bytes() == b"left by a crash"
