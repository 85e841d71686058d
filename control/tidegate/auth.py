"""Who may do what: two roles, read and admin.

- Remote clients (mTLS): the role comes from the client certificate's
  common name through --role-map (JSON {"alice": "admin", "grafana": "read"});
  a valid certificate whose name is not in the map gets "read".
- Loopback clients: a bearer token (metadata `authorization: Bearer T`)
  from the token file, which the agent creates in its state dir on first
  start (`<state-dir>/tokens`, mode 0600, owned by root: only root can read
  the admin token). The CLI reads it from $TIDEGATE_TOKEN_FILE or
  /var/lib/tidegate/tokens. `--auth none` turns checks off (lab use only).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

ROLES = ("read", "admin")


def ensure_token_file(path: str | Path) -> dict[str, str]:
    """Create the token file if missing; return {token: role}."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# tidegate API tokens: <role> <token>; keep this file readable only by root\n")
            f.write(f"admin {secrets.token_urlsafe(24)}\n")
            f.write(f"read {secrets.token_urlsafe(24)}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    return read_token_file(p)


def read_token_file(path: str | Path) -> dict[str, str]:
    tokens = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, token = line.partition(" ")
        if role in ROLES and token.strip():
            tokens[token.strip()] = role
    return tokens


def token_for(path: str | Path, role: str = "admin") -> str | None:
    try:
        for token, r in read_token_file(path).items():
            if r == role:
                return token
    except OSError:
        return None
    return None


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
            role_map = json.loads(Path(opts.role_map).read_text()) if opts.role_map else {}
            return cls("cert", role_map=role_map)
        path = opts.token_file or os.path.join(opts.state_dir, "tokens")
        return cls("token", tokens=ensure_token_file(path))

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
