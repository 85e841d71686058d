"""Who may do what: two roles, read and admin.

- Remote clients (mTLS): the role comes from the client certificate's
  common name through --role-map (JSON {"alice": "admin", "grafana": "read"});
  a valid certificate whose name is not in the map gets "read".
- Loopback clients: a bearer token (metadata `authorization: Bearer T`)
  from the token file, which the agent creates in its state dir on first
  start (`<state-dir>/tokens`, mode 0600, owned by root: only root can read
  the admin token). The CLI reads it from $TIDEGATE_TOKEN_FILE or
  /var/lib/tidegate/tokens. The agent refuses to start on a token file that
  is damaged, empty, not root's or readable by anyone else.
- `--auth none` turns checks off (lab use only; the agent says so loudly and
  refuses it on a non-loopback address without --insecure).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path

ROLES = ("read", "admin")


class TokenFileError(Exception):
    """The token file exists but cannot be trusted or used; the message names
    the file and what to do, and the agent stops with it at start."""


def ensure_token_file(path: str | Path) -> dict[str, str]:
    """Create the token file if missing; return {token: role}. An existing
    file must be root's, 0600 and parse: anything else stops the agent,
    because reading it as "no tokens" would answer every call with a bare
    UNAUTHENTICATED and nobody would know why."""
    p = Path(path)
    if not p.exists():
        try:
            _write_new_token_file(p)
        except OSError as e:
            raise TokenFileError(f"cannot create token file {p}: {e.strerror}") from None
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise TokenFileError(f"cannot read token file {p}: {e.strerror}") from None
    try:
        # fstat of the open file, not a second lookup of the path, is what gets read
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"token file {p} is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenFileError(f"token file {p} is owned by uid {st.st_uid}, not root: it holds the admin "
                                 f"token, so only root may own it (chown root {p}, or move it aside and a new "
                                 "one is created at the next start)")  # fmt: skip
        if st.st_mode & 0o077:
            raise TokenFileError(f"token file {p} is accessible by group or others (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}): it holds the admin token and must be "
                                 f"readable only by root (chmod 600 {p}; if others may have read it, move it "
                                 "aside instead and a new one is created at the next start)")  # fmt: skip
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise TokenFileError(f"cannot read token file {p}: {e.strerror}") from None
    finally:
        os.close(fd)
    return parse_tokens(data, p)


def new_token() -> str:
    """A random API token (192 bits) that never starts with '-': an operator passes it as
    `--token TOKEN`, and a leading dash would make the CLI's parser read it as an option."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def _write_new_token_file(p: Path) -> None:
    """Atomically: a crash leaves either no token file or a complete one,
    never an empty file that would lock every client out."""
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# tidegate API tokens: <role> <token>; keep this file readable only by root\n")
            f.write(f"admin {new_token()}\n")
            f.write(f"read {new_token()}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)


def parse_tokens(data: bytes | str, path: str | Path) -> dict[str, str]:
    """{token: role} from `<role> <token>` lines; a line that is neither that,
    blank nor a comment makes the whole file unusable (TokenFileError)."""
    moved = f"move it aside (mv {path} {path}.bad) and a new one is created at the next start"
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise TokenFileError(f"token file {path} is damaged (not text): {moved}") from None
    tokens: dict[str, str] = {}
    for n, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, token = line.partition(" ")
        token = token.strip()
        if role not in ROLES or not token or " " in token:
            raise TokenFileError(f"token file {path} is damaged at line {n} (want '<read|admin> <token>'): {moved}")
        if tokens.get(token, role) != role:
            raise TokenFileError(f"token file {path} gives one token two roles (line {n}): {moved}")
        tokens[token] = role
    if not tokens:
        raise TokenFileError(f"token file {path} is empty or holds no tokens: {moved}")
    return tokens


def is_loopback(host: str) -> bool:
    """An address only this host can reach: a loopback IP, or "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | Path) -> dict[str, str]:
    return parse_tokens(Path(path).read_bytes(), path)


def token_path(opts) -> str:
    return opts.token_file or os.path.join(opts.state_dir, "tokens")


def token_for(path: str | Path, role: str = "admin") -> str | None:
    try:
        for token, r in read_token_file(path).items():
            if r == role:
                return token
    except (OSError, TokenFileError):  # the CLI then says which file it looked at
        return None
    return None


class RoleMapError(Exception):
    """The --role-map file cannot be used; the agent does not start on it."""


def load_role_map(path: str | Path) -> dict[str, str]:
    """{certificate common name: role}. Every role must be one of ROLES: a
    typo ('admn') would otherwise give that client a role nothing grants."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise RoleMapError(f"cannot read: {e.strerror}") from None
    except ValueError as e:
        raise RoleMapError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RoleMapError('must be a JSON object of certificate name: role, e.g. {"alice": "admin"}')
    for name, role in data.items():
        if role not in ROLES:
            raise RoleMapError(f"unknown role {role!r} for {name!r} (a role is {' or '.join(ROLES)})")
    return data


class Authorizer:
    def __init__(self, mode: str, tokens: dict[str, str] | None = None, role_map: dict[str, str] | None = None):
        self.mode = mode  # none | token | cert
        self.tokens = tokens or {}
        self.role_map = role_map or {}

    @classmethod
    def from_options(cls, opts) -> "Authorizer":
        if getattr(opts, "auth", "token") == "none":
            return cls("none")
        if opts.tls_cert:
            try:
                role_map = load_role_map(opts.role_map) if opts.role_map else {}
            except RoleMapError as e:
                raise SystemExit(f"tidegate agent: --role-map {opts.role_map}: {e}") from None
            return cls("cert", role_map=role_map)
        return cls("token", tokens=ensure_token_file(token_path(opts)))

    def authorize(self, context, metadata: dict) -> tuple[str | None, str]:
        """(role or None when unauthenticated, who)."""
        if self.mode == "none":
            return "admin", "anonymous"
        if self.mode == "cert":
            ac = context.auth_context()
            names = ac.get("x509_common_name") or []
            if not names:
                return None, ""
            cn = names[0].decode(errors="replace")
            return self.role_map.get(cn, "read"), f"cert:{cn}"
        auth = metadata.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        role = self.tokens.get(token) if token else None
        return role, (f"token:{role}" if role else "")
