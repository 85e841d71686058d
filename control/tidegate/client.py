"""A small gRPC client for the CLI: channel and credentials, author
metadata, timeouts, and every failure turned into one clear line.

    cl = Client("127.0.0.1:50051")
    status = cl.call("GetStatus", cl.pb.GetStatusRequest())

Credentials, in this order:
- TLS when a CA, certificate or key is given (--ca/--cert/--key, or
  $TIDEGATE_CA/$TIDEGATE_CERT/$TIDEGATE_KEY): the agent's certificate is
  checked against the CA and the client certificate is presented (mTLS).
- A bearer token: --token or $TIDEGATE_TOKEN, else the first admin (then
  read) token in --token-file / $TIDEGATE_TOKEN_FILE /
  /var/lib/tidegate/tokens (readable by root only). The token file is read
  on its own only when the server is a loopback address, and a token is
  never sent in clear text to any other address: asking for that is an
  error that names TLS (exit 2).
Every call carries `tidegate-author`: $TIDEGATE_AUTHOR or user@host (under
sudo, the user who ran sudo).

Errors raise ClientError with the CLI's exit code: 3 when the agent cannot
be reached (refused, timed out, name not resolved, TLS handshake failed),
1 for any status the agent returned. Field-level validation errors come
from the trailing metadata key `tidegate-errors-bin` (ValidationErrors),
blast-radius figures from `tidegate-estimate-bin` (Estimate).
"""

from __future__ import annotations

import getpass
import os
import socket

from tidegate.access.auth import is_loopback, token_for

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TOKEN_FILE = "/var/lib/tidegate/tokens"
ERRORS_KEY = "tidegate-errors-bin"
ESTIMATE_KEY = "tidegate-estimate-bin"
EXIT_FAILED, EXIT_UNREACHABLE = 1, 3
# the agent's message limit both ways (admission.MAX_MESSAGE_BYTES: an 8 MiB rule set and the
# request's other fields): the largest rule set's canonical text comes back through GetVersion
MAX_MESSAGE_BYTES = (8 << 20) + (64 << 10)


class ClientError(Exception):
    """One failed call. exit_code: 1 the agent refused or failed, 3 unreachable.

    code is the gRPC status name ("NOT_FOUND", ...) or "UNREACHABLE"."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, violations=None, source: str = "",
                 estimate=None, code: str = "UNKNOWN", details: str = ""):  # fmt: skip
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.violations = list(violations or [])
        self.source = source
        self.estimate = estimate
        self.code = code
        self.details = details or message


def default_author() -> str:
    """$TIDEGATE_AUTHOR, else user@host; under sudo the person who ran sudo
    (the token file is root's, so operators typically run `sudo tidegate`,
    and "root" would say nothing about who made the change)."""
    if os.environ.get("TIDEGATE_AUTHOR"):
        return os.environ["TIDEGATE_AUTHOR"]
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and os.geteuid() == 0 and sudo_user != "root":
        return f"{sudo_user}@{socket.gethostname()} (sudo)"
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def find_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token or None, the file looked at)."""
    path = token_file or os.environ.get("TIDEGATE_TOKEN_FILE") or DEFAULT_TOKEN_FILE
    return token_for(path, "admin") or token_for(path, "read"), path


def server_host(server: str) -> str:
    """The host of a gRPC target: "edge1:50051", "[::1]:50051", "dns:///edge1:50051", "ipv4:127.0.0.1:1"."""
    target = server
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):
        return target[1:].partition("]")[0]
    host, sep, port = target.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return target
    return host


def _grpc():
    """grpc, imported on first use: gRPC core's own log lines (TLS handshake
    failures...) would break the one-line errors, so they are off unless
    $GRPC_VERBOSITY asks for them; and `tidegate validate` starts faster."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc

    return grpc


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ClientError(f"cannot read the {what} {path}: {e.strerror}", 2, code="LOCAL") from None


class Client:
    def __init__(self, server: str = DEFAULT_SERVER, timeout: float = 30.0, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, token: str | None = None,
                 token_file: str | None = None, server_name: str | None = None):  # fmt: skip
        grpc = _grpc()
        from tidegate.v1 import tidegate_pb2 as pb
        from tidegate.v1 import tidegate_pb2_grpc as pbg

        self.pb = pb
        self.server = server
        self.timeout = timeout
        ca = ca or os.environ.get("TIDEGATE_CA")
        cert = cert or os.environ.get("TIDEGATE_CERT")
        key = key or os.environ.get("TIDEGATE_KEY")
        self.tls = bool(ca or cert or key)
        if (cert is None) != (key is None):
            raise ClientError("--cert and --key go together (the client certificate and its key)", 2, code="LOCAL")
        self.loopback = is_loopback(server_host(server))
        self.token_file = ""
        if token is None:
            token = os.environ.get("TIDEGATE_TOKEN")
        if token is None and token_file is not None and not self.tls:
            token, self.token_file = find_token(token_file)
        elif token is None and self.loopback and not self.tls:  # the token file, on its own: this host only
            token, self.token_file = find_token(None)
        if token and not (self.tls or self.loopback):
            raise ClientError(f"refusing to send the API token in clear text to {server} (not a loopback address): "
                              "a remote agent needs TLS (--ca, --cert, --key; see `tidegate certs`); or leave "
                              "--token, --token-file and $TIDEGATE_TOKEN out", 2, code="LOCAL")  # fmt: skip
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]  # fmt: skip
        if self.tls:
            creds = grpc.ssl_channel_credentials(_read(ca, "CA certificate") if ca else None,
                                                 _read(key, "client key") if key else None,
                                                 _read(cert, "client certificate") if cert else None)  # fmt: skip
            opts += [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(server, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(server, options=opts)
        self.stub = pbg.FilterStub(self.channel)
        self.metadata = [("tidegate-author", default_author())]
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))
        self.has_token = bool(token)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request, timeout: float | None = None):
        """A unary call; raises ClientError."""
        grpc = _grpc()
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.translate(e) from None

    def stream(self, method: str, request):
        """A server-streaming call as a generator; ends quietly when cancelled."""
        grpc = _grpc()
        call = getattr(self.stub, method)(request, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return
            raise self.translate(e) from None
        finally:
            call.cancel()

    # --------------------------------------------------------- errors
    def translate(self, e) -> ClientError:
        """A grpc.RpcError as a ClientError with the CLI's exit code."""
        grpc = _grpc()
        code = e.code()
        details = e.details() or ""
        trailers = e.trailing_metadata() or ()
        if code == grpc.StatusCode.UNAVAILABLE and not trailers:
            return self._unreachable(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not trailers:
            if not self._reachable():
                return self._unreachable(details or "timed out")
            return ClientError(f"the agent at {self.server} did not answer within {self.timeout:g} s "
                               "(raise --timeout?)", EXIT_FAILED, code=code.name, details=details)  # fmt: skip
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ClientError(f"the agent does not support this yet ({details})", EXIT_FAILED, code=code.name,
                               details=details)  # fmt: skip
        violations, source, estimate = [], "", None
        for k, v in trailers:
            if k == ERRORS_KEY:
                errs = self.pb.ValidationErrors.FromString(v)
                violations, source = list(errs.violations), errs.source
            elif k == ESTIMATE_KEY:
                estimate = self.pb.Estimate.FromString(v)
        message = f"{code.name}: {details}"
        if code == grpc.StatusCode.UNAUTHENTICATED and not self.tls and not self.has_token and self.loopback:
            message += (f" (no token: {self.token_file} is missing or unreadable — run as root, "
                        "or pass --token-file / $TIDEGATE_TOKEN)")  # fmt: skip
        elif code == grpc.StatusCode.UNAUTHENTICATED and not self.tls:
            message += (f" ({self.server} is not a loopback address: a remote agent needs TLS with a client "
                        "certificate, --ca/--cert/--key)")  # fmt: skip
        return ClientError(message, EXIT_FAILED, violations, source, estimate, code=code.name, details=details)

    def _reachable(self, wait: float = 0.5) -> bool:
        grpc = _grpc()
        try:
            grpc.channel_ready_future(self.channel).result(timeout=wait)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _unreachable(self, details: str) -> ClientError:
        d = details.lower()
        if "refused" in d:
            why = "connection refused"
        elif "handshake" in d or "ssl" in d or "certificate" in d or "tls" in d:
            why = "TLS handshake failed — check --ca, --cert, --key and --server-name"
        elif "dns" in d or "resolv" in d or "name or service" in d:
            why = "cannot resolve the name"
        elif "deadline" in d or "timed out" in d or "timeout" in d:
            why = "timed out"
        elif "unreachable" in d:
            why = "network unreachable"
        elif "reset" in d or "closed" in d or "socket" in d:
            why = "connection closed"
        else:
            why = "unavailable"
        hint = "" if why.startswith(("TLS", "cannot resolve")) else " — is `tidegate agent` running?"
        return ClientError(f"cannot reach the agent at {self.server} ({why}){hint}", EXIT_UNREACHABLE,
                           code="UNREACHABLE", details=details)  # fmt: skip
