"""Token file, audit author and --auth none on real files and the agent's
own start-up checks: a token file nobody can use stops the start with one
message naming it, the authenticated principal is always the author, and
--auth none stays on loopback unless --insecure says otherwise."""

from __future__ import annotations

import logging
import re
import os
import stat

import pytest

from tidegate.access import auth
from tidegate.daemon.options import build_parser, check_auth_mode as _check_auth_mode
from tidegate.api.service import _author
from tidegate.access.auth import Authorizer, TokenFileError, ensure_token_file, parse_tokens, token_for

GOOD = "# comment\nadmin " + "a" * 32 + "\n\nread " + "r" * 32 + "\n"


def write(path, data: bytes | str, mode: int = 0o600):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


# ------------------------------------------------------------ the token file
def test_first_start_creates_a_private_complete_file(tmp_path):
    path = tmp_path / "state" / "tokens"
    tokens = ensure_token_file(path)
    assert sorted(tokens.values()) == ["admin", "read"]
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert os.listdir(path.parent) == ["tokens"], "no temporary file is left behind"
    assert ensure_token_file(path) == tokens, "the next start reads the same tokens, it does not rewrite them"
    assert token_for(path, "admin") in tokens and tokens[token_for(path, "read")] == "read"


def test_new_file_and_its_rename_are_synced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):  # observe, then do the real thing
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ensure_token_file(tmp_path / "tokens")
    assert synced == [False, True], "the file's data, then the directory holding the rename"


def test_a_failed_write_leaves_no_token_file(tmp_path, monkeypatch):
    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(TokenFileError, match=f"cannot create token file {tmp_path / 'tokens'}: No space left"):
        ensure_token_file(tmp_path / "tokens")
    assert os.listdir(tmp_path) == [], "neither a partial token file nor the temporary one"


@pytest.mark.parametrize(
    "data, says",
    [
        (b"", "is empty or holds no tokens"),
        (b"# only a comment\n\n", "is empty or holds no tokens"),
        (b"\xff\xfe\x00\x01", "is damaged (not text)"),
        (b"admin\n", "is damaged at line 1"),
        (b"admin " + b"a" * 32 + b"\nroot xyz\n", "is damaged at line 2"),
        (b"admin two words\n", "is damaged at line 1"),
        (b"admin same\nread same\n", "gives one token two roles (line 2)"),
    ],
)
def test_damaged_files_are_refused_with_the_way_out(tmp_path, data, says):
    path = write(tmp_path / "tokens", data)
    with pytest.raises(TokenFileError) as e:
        ensure_token_file(path)
    msg = str(e.value)
    assert f"token file {path} {says}" in msg
    if "damaged" in says or "empty" in says:
        assert msg.endswith(f"move it aside (mv {path} {path}.bad) and a new one is created at the next start")
    assert path.read_bytes() == data, "never rewritten behind the operator's back"
    assert token_for(path) is None, "the CLI treats it as no token (and says which file it looked at)"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644])
def test_files_others_can_reach_are_refused(tmp_path, mode):
    path = write(tmp_path / "tokens", GOOD, mode)
    with pytest.raises(TokenFileError) as e:
        ensure_token_file(path)
    assert str(e.value) == (
        f"token file {path} is accessible by group or others (mode {mode:04o}): it holds the admin token and must "
        f"be readable only by root (chmod 600 {path}; if others may have read it, move it aside instead and a new "
        "one is created at the next start)")
    os.chmod(path, 0o600)
    assert sorted(ensure_token_file(path).values()) == ["admin", "read"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_files_not_owned_by_root_are_refused(tmp_path):
    path = write(tmp_path / "tokens", GOOD)
    os.chown(path, 65534, -1)
    with pytest.raises(TokenFileError) as e:
        ensure_token_file(path)
    assert str(e.value) == (
        f"token file {path} is owned by uid 65534, not root: it holds the admin token, so only root may own it "
        f"(chown root {path}, or move it aside and a new one is created at the next start)")


def test_a_symlink_or_a_directory_is_not_a_token_file(tmp_path):
    real = write(tmp_path / "elsewhere", GOOD)
    (tmp_path / "tokens").symlink_to(real)
    with pytest.raises(TokenFileError, match=f"cannot read token file {tmp_path / 'tokens'}"):
        ensure_token_file(tmp_path / "tokens")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(TokenFileError, match="is not a regular file"):
        ensure_token_file(tmp_path / "dir")


def test_parse_tokens_reads_roles():
    assert parse_tokens(GOOD, "tokens") == {"a" * 32: "admin", "r" * 32: "read"}
    # the role is the first word; spaces around the token do not count
    assert parse_tokens("admin   " + "a" * 32 + "  \n  read " + "r" * 32, "t") == {"a" * 32: "admin", "r" * 32: "read"}


def test_token_for_is_the_admin_token_unless_asked(tmp_path):
    path = write(tmp_path / "tokens", GOOD)
    assert (token_for(path), token_for(path, "read"), token_for(path, "nobody")) == ("a" * 32, "r" * 32, None)


def test_authorizer_uses_the_checked_file(tmp_path):
    opts = build_parser().parse_args(["--interface", "lo", "--state-dir", str(tmp_path)])
    write(tmp_path / "tokens", GOOD, 0o644)
    with pytest.raises(TokenFileError):
        Authorizer.from_options(opts)
    os.chmod(tmp_path / "tokens", 0o600)
    a = Authorizer.from_options(opts)
    assert a.authorize(None, {"authorization": "Bearer " + "r" * 32}) == ("read", "token:read")
    assert a.authorize(None, {"authorization": "Bearer nope"}) == (None, "")
    assert auth.token_path(opts) == str(tmp_path / "tokens")


@pytest.mark.parametrize(
    "metadata",
    [{}, {"authorization": ""}, {"authorization": "Bearer "}, {"authorization": "Bearer nope"},
     {"authorization": "a" * 32}, {"authorization": "Basic " + "a" * 32}, {"authorization": "Bearer" + "a" * 32},
     {"authorization": "Basic  " + "a" * 32}, {"authorization": "Token: " + "a" * 32}],
)  # fmt: skip
def test_no_valid_token_is_no_role(metadata):
    a = Authorizer("token", tokens={"a" * 32: "admin", "r" * 32: "read"})
    assert a.authorize(None, metadata) == (None, "")
    assert a.authorize(None, {"authorization": "bearer  " + "a" * 32}) == ("admin", "token:admin")


class PeerCertificate:
    """What grpc's servicer context says about a TLS peer: its auth context."""

    def __init__(self, *names: bytes):
        self.names = list(names)

    def auth_context(self) -> dict:
        return {"x509_common_name": self.names} if self.names else {}


def test_certificate_names_map_to_roles_and_an_unmapped_name_reads():
    a = Authorizer("cert", role_map={"alice": "admin", "grafana": "read"})
    assert a.authorize(PeerCertificate(b"alice"), {}) == ("admin", "cert:alice")
    assert a.authorize(PeerCertificate(b"grafana"), {}) == ("read", "cert:grafana")
    assert a.authorize(PeerCertificate(b"mallory"), {}) == ("read", "cert:mallory"), "unmapped: read, never admin"
    assert a.authorize(PeerCertificate(b"Alice"), {}) == ("read", "cert:Alice")
    assert a.authorize(PeerCertificate(b"al\xffce"), {}) == ("read", "cert:al\ufffdce"), "not UTF-8: shown, not fatal"
    assert a.authorize(PeerCertificate(), {}) == (None, "")
    # a token is no substitute for a certificate once TLS decides
    assert a.authorize(PeerCertificate(), {"authorization": "Bearer " + "a" * 32}) == (None, "")


def test_auth_none_makes_everyone_admin():
    assert Authorizer("none").authorize(None, {}) == ("admin", "anonymous")


# ------------------------------------------------------------ audit author
@pytest.mark.parametrize(
    "principal, claimed, recorded",
    [
        ("token:admin", "", "token:admin"),
        ("token:admin", "alice@edge (sudo)", "token:admin (as alice@edge (sudo))"),
        ("cert:alice", "alice", "cert:alice"),
        ("cert:alice", "bob", "cert:alice (as bob)"),
        ("anonymous", "agent", "anonymous (as agent)"),
        ("token:read", "token:read", "token:read"),
        ("token:admin", "eve\n2024-01-01 apply ok admin", "token:admin (as eve?2024-01-01 apply ok admin)"),
    ],
)
def test_the_authenticated_principal_is_the_author(principal, claimed, recorded):
    assert _author(principal, claimed) == recorded


def test_author_is_bounded_and_keeps_the_principal():
    a = _author("cert:" + "c" * 60, "x" * 1000)
    assert len(a) == 200 and a.startswith("cert:" + "c" * 60 + " (as xxx") and a.endswith(")")


# ------------------------------------------------------------ --auth none
def opts_for(*argv):
    return build_parser().parse_args(["--interface", "lo", *argv])


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.0.0.1:50051", "[::]:50051"])
def test_auth_none_off_loopback_needs_insecure(listen, caplog):
    host = listen.rpartition(":")[0].strip("[]")
    with pytest.raises(SystemExit, match=f"refusing --auth none on {host}.*--insecure"):
        _check_auth_mode(opts_for("--listen", listen, "--auth", "none"), host)
    with caplog.at_level(logging.WARNING, logger="tidegate.daemon.options"):
        _check_auth_mode(opts_for("--listen", listen, "--auth", "none", "--insecure"), host)
    assert any("INSECURE: --auth none" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_auth_none_on_loopback_is_allowed_and_loud(host, caplog):
    with caplog.at_level(logging.WARNING, logger="tidegate.daemon.options"):
        _check_auth_mode(opts_for("--auth", "none"), host)
    assert [r.getMessage() for r in caplog.records if "--auth none" in r.getMessage()]


def test_token_auth_is_not_affected(caplog):
    with caplog.at_level(logging.WARNING, logger="tidegate.daemon.options"):
        _check_auth_mode(opts_for("--listen", "0.0.0.0:50051"), "0.0.0.0")
    assert not caplog.records


@pytest.mark.parametrize("content, says", [
    ('{"alice": "admn"}', "unknown role 'admn' for 'alice' (a role is read or admin)"),
    ('{"alice": "Admin"}', "unknown role 'Admin' for 'alice'"),
    ('{"alice": "admin", "grafana": null}', "unknown role None for 'grafana'"),
    ('{"alice": ["admin"]}', "unknown role ['admin'] for 'alice'"),
    ('["alice"]', "must be a JSON object of certificate name: role"),
    ('{"alice": "admin",}', "not JSON"),
], ids=["typo", "case", "null", "list-value", "list", "bad-json"])  # fmt: skip
def test_a_role_map_names_only_known_roles(tmp_path, content, says):
    path = tmp_path / "roles.json"
    path.write_text(content)
    with pytest.raises(auth.RoleMapError, match=re.escape(says)):
        auth.load_role_map(path)


def test_a_good_role_map_loads(tmp_path):
    path = tmp_path / "roles.json"
    path.write_text('{"alice": "admin", "grafana": "read"}')
    assert auth.load_role_map(path) == {"alice": "admin", "grafana": "read"}
    with pytest.raises(auth.RoleMapError, match="cannot read: No such file"):
        auth.load_role_map(tmp_path / "missing.json")


def test_new_tokens_never_start_with_a_dash(monkeypatch):
    """`tidegate --token TOKEN` must work for every token the agent writes: argparse reads a
    value starting with '-' as an option (a CI run met one: "argument --token: expected one argument")."""
    drawn = iter(["-starts-with-a-dash", "-again", "fine-token"])
    monkeypatch.setattr(auth.secrets, "token_urlsafe", lambda n: next(drawn))
    assert auth.new_token() == "fine-token"
    monkeypatch.undo()
    assert not any(auth.new_token().startswith("-") for _ in range(2000))
