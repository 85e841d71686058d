"""Start a real `tidegate agent` as a subprocess and know when it serves.

The one way `tidegate lab`, the end-to-end tests and the benchmarks start an
agent. Readiness is one check: the agent's gRPC health service answers
(SERVING when the filter is attached, NOT_SERVING when it runs loaded but not
attached, started without a rule set). It needs no token and no role, and it
is what a load balancer or orchestrator probe asks. A start that fails (the
agent exits, or does not answer within the timeout) raises AgentNotReady with
the tail of the agent's log.

The agent's stderr (its log) is appended to a file, so a restart keeps the
earlier lines and log() shows the whole history.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tidegate.access.auth import token_for
from tidegate.daemon.options import port_unavailable
from tidegate.kernel.filter import FilterConfig, KernelFilter

PIN_ROOT = "/sys/fs/bpf/tidegate"
ANSWERING = (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tidegate_executable() -> str:
    """The `tidegate` beside this Python (a venv, or /usr/bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "tidegate"
    return str(beside) if beside.exists() else (shutil.which("tidegate") or "tidegate")


class AgentNotReady(RuntimeError):
    """The agent exited or did not answer in time; the message carries its log tail."""


def port_free_or_raise(host: str, port: int) -> None:
    """Another agent listening there would answer the readiness check in this one's place."""
    if why := port_unavailable(host, port):
        raise AgentNotReady(f"{host}:{port} is taken ({why}): is another agent still running?")


class LoggedProcess:
    """A subprocess whose stderr is appended to `log_path`; stopped by a
    signal, then killed if it does not exit in time."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0  # where this start's lines begin in the log

    def spawn(self, argv: list[str], **popen_kw) -> subprocess.Popen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, **popen_kw)
        return self.proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        """The end of what this start logged."""
        return self.log()[self.log_offset :][-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send `sig`, wait up to `timeout`, then SIGKILL; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL)


class AgentProcess(LoggedProcess):
    """`tidegate agent` on `interface` with its own state dir, pin name and
    ports. `rules` is passed as --rules at every start; `extra` are more
    agent options. `credentials` (grpc.ChannelCredentials) are for the
    readiness check of an agent that serves TLS."""

    def __init__(self, interface: str, state_dir: Path, *, pin_name: str, rules: str | Path | None = None,
                 listen_host: str = "127.0.0.1", port: int | None = None, metrics_port: int | None = None,
                 metrics: bool = True, sample_interval: float = 1, extra: list[str] | tuple = (),
                 log_path: Path | None = None, credentials: grpc.ChannelCredentials | None = None,
                 exe: str | None = None):  # fmt: skip
        self.state_dir = Path(state_dir)
        super().__init__(log_path or self.state_dir.parent / "agent.log")
        self.interface = interface
        self.pin_name = pin_name
        self.rules = str(rules) if rules is not None else None
        self.host = listen_host
        self.port = port or free_port()
        self.metrics_port = (metrics_port or free_port()) if metrics else None
        self.sample_interval = sample_interval
        self.extra = list(extra)
        self.credentials = credentials
        self.exe = exe or tidegate_executable()
        self.server = f"{self.host}:{self.port}"
        self.pin_dir = f"{PIN_ROOT}/{pin_name}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "off"
        argv = [self.exe, "agent", "--interface", self.interface, "--state-dir", str(self.state_dir),
                "--listen", self.server, "--metrics-listen", metrics, "--pin-name", self.pin_name,
                "--sample-interval", f"{self.sample_interval:g}", *self.extra]  # fmt: skip
        if self.rules:
            argv += ["--rules", self.rules]
        return argv

    def start(self, wait: bool = True, timeout: float = 90, **popen_kw) -> "AgentProcess":
        port_free_or_raise(self.host, self.port)
        self.spawn(self.argv(), **popen_kw)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90) -> int:
        """Until the gRPC health check answers; its status (SERVING or NOT_SERVING)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AgentNotReady(f"the agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            status = self.health() if self.listening() else None
            if status in ANSWERING and self.proc.poll() is None:  # answered, and still this agent running
                return status
            if time.monotonic() > deadline:
                raise AgentNotReady(f"the agent did not answer in {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.01)  # the start-up figures read to ~10 ms

    def listening(self) -> bool:
        """Whether the agent's port takes a TCP connection yet. The wait asks
        this before each health check: a refused connect costs the kernel
        ~10 us, a gRPC channel ~1.5 ms of CPU over several threads, which on
        a 2-core host is taken from the start being waited for."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def health(self, service: str = "") -> int | None:
        """One gRPC health check; None when nothing answers."""
        channel = (grpc.secure_channel(self.server, self.credentials) if self.credentials
                   else grpc.insecure_channel(self.server))  # fmt: skip
        try:
            req = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(req, timeout=2).status
        except grpc.RpcError:
            return None
        finally:
            channel.close()

    def token(self, role: str = "admin") -> str | None:
        """The token of `role` the agent wrote into its state dir."""
        return token_for(self.state_dir / "tokens", role)

    def remove_kernel_objects(self) -> None:
        """What `tidegate detach --interface IF --pin-name P` does: the program off, the pins gone."""
        KernelFilter(FilterConfig(interface=self.interface, pin_root=PIN_ROOT, pin_name=self.pin_name)).detach(
            remove_pins=True
        )
