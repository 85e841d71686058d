"""End-to-end harness: a veth pair into a namespace, a real agent
subprocess on the host end, the real CLI and a real gRPC channel.

Everything is named after the test process id and removed by name."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.lab.veth import VethLab

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "tidegate"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@dataclass
class AgentProc:
    lab: VethLab
    state_dir: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pin_name(self) -> str:
        return f"e2e-{self.lab.tag}"

    def env(self) -> dict:
        return {**os.environ, "TIDEGATE_SERVER": self.server, "TIDEGATE_TOKEN_FILE": str(self.state_dir / "tokens"),
                "TIDEGATE_AUTHOR": "e2e-test"}  # fmt: skip

    def start(self, rules: str | None = None, wait: bool = True) -> "AgentProc":
        self.log_path = self.state_dir.parent / f"agent-{self.lab.tag}.log"
        argv = [str(BIN), "agent", "--interface", self.lab.host_if, "--state-dir", str(self.state_dir),
                "--listen", self.server, "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--pin-name", self.pin_name, "--sample-interval", "1", *self.extra]  # fmt: skip
        if rules:
            argv += ["--rules", rules]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with grpc.insecure_channel(self.server) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                # the agent answers only once it has attached what it attaches at start: SERVING, or
                # NOT_SERVING when it runs without a rule set (loaded, not attached)
                if r.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"agent not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def cli(self, *args: str, check: bool = True, json_out: bool = False, timeout: float = 120):
        argv = [str(BIN)] + (["-o", "json"] if json_out else []) + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        if json_out and r.returncode == 0:
            return json.loads(r.stdout)
        return r

    def cleanup_kernel(self) -> None:
        KernelFilter(FilterConfig(interface=self.lab.host_if, pin_name=self.pin_name)).detach(remove_pins=True)


def send(lab: VethLab, *args: str, wait: bool = True, timeout: float = 60):
    argv = [sys.executable, "-m", "tidegate.lab.traffic", "--iface", lab.peer_if, "--dst-mac", lab.host_mac(),
            "--dst-ip", lab.host_ip, *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "control")}
    p = lab.popen_in_ns(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return p
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out)


def finish(p: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out)


# the maps that hold rule sets (per-source state and counters excluded)
RULE_SET_MAPS = ("tg_ctl", "tg_sets", "tg_rules", "tg_cidrs4", "tg_cidrs6", "tg_ports")


def pinned_dump(pin_dir: str, names=RULE_SET_MAPS) -> dict:
    """Map contents through bpftool, read while the agent owns the maps."""
    out = {}
    for n in names:
        r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pin_dir}/{n}"], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        # a digest, not the text: the port table alone prints ~55 MB
        out[n] = hashlib.sha256(r.stdout.encode()).hexdigest()
    return out
