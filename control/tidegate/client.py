"""A small gRPC client for the CLI: channel, credentials, author metadata,
and one clear error line instead of a traceback."""

from __future__ import annotations

import getpass
import os
import socket

import grpc

from .auth import token_for

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TOKEN_FILE = "/var/lib/tidegate/tokens"


class ClientError(Exception):
    """exit_code: 1 the agent refused/failed, 3 unreachable."""

    def __init__(self, message: str, exit_code: int = 1, violations=None, source: str = "", estimate=None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.violations = violations or []
        self.source = source
        self.estimate = estimate


def default_author() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return os.environ.get("TIDEGATE_AUTHOR") or f"{user}@{socket.gethostname()}"


class Client:
    def __init__(self, server: str, timeout: float = 30.0, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, token: str | None = None, token_file: str | None = None,
                 server_name: str | None = None):  # fmt: skip
        from .v1 import tidegate_pb2 as pb
        from .v1 import tidegate_pb2_grpc as pbg

        self.pb = pb
        self.server = server
        self.timeout = timeout
        if ca or cert:
            def read(p):
                with open(p, "rb") as f:
                    return f.read()

            creds = grpc.ssl_channel_credentials(read(ca) if ca else None, read(key) if key else None,
                                                 read(cert) if cert else None)  # fmt: skip
            opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(server, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(server)
        self.stub = pbg.FilterStub(self.channel)
        if token is None:
            path = token_file or os.environ.get("TIDEGATE_TOKEN_FILE") or DEFAULT_TOKEN_FILE
            token = os.environ.get("TIDEGATE_TOKEN") or token_for(path, "admin") or token_for(path, "read")
        self.metadata = [("tidegate-author", default_author())]
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))

    def call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.translate(e) from None

    def stream(self, method: str, request):
        try:
            yield from getattr(self.stub, method)(request, metadata=self.metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return
            raise self.translate(e) from None

    def translate(self, e: grpc.RpcError) -> ClientError:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not _from_agent(e):
            detail = (e.details() or "").lower()
            why = "connection refused" if "refused" in detail else ("timed out" if "deadline" in detail or
                                                                    code == grpc.StatusCode.DEADLINE_EXCEEDED
                                                                    else "unavailable")  # fmt: skip
            return ClientError(f"cannot reach the agent at {self.server} ({why}) — is `tidegate agent` running?", 3)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ClientError(f"the agent does not support this yet ({e.details()})", 1)
        violations, source, estimate = [], "", None
        for k, v in e.trailing_metadata() or ():
            if k == "tidegate-errors-bin":
                errs = self.pb.ValidationErrors.FromString(v)
                violations, source = list(errs.violations), errs.source
            elif k == "tidegate-estimate-bin":
                estimate = self.pb.Estimate.FromString(v)
        return ClientError(f"{code.name}: {e.details()}", 1, violations, source, estimate)


def _from_agent(e: grpc.RpcError) -> bool:
    # UNAVAILABLE raised by our own handlers would carry trailing metadata
    return bool(e.trailing_metadata())
