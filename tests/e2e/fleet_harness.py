"""Real etcd for the fleet tests: one member or a three-member cluster on
free loopback ports with temporary data directories, started and stopped
(or SIGKILLed) by the test; and fleet agents on their own veth pairs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .conftest import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdMember:
    def __init__(self, name: str, data_dir: Path):
        self.name = name
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, cluster: str, token: str) -> None:
        argv = [ETCD, "--name", self.name, "--data-dir", str(self.data_dir), "--listen-client-urls", self.url,
                "--advertise-client-urls", self.url, "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url, "--initial-cluster", cluster,
                "--initial-cluster-token", token, "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500", "--logger", "zap",
                "--log-outputs", "stderr"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class EtcdCluster:
    """`size` members on loopback; `endpoints` is the comma list for --etcd."""

    def __init__(self, workdir: Path, size: int = 1, tag: str = "e"):
        self.workdir = workdir
        self.token = f"tg-{tag}-{os.getpid()}"
        self.members = [EtcdMember(f"{tag}{i}", workdir / f"{tag}{i}.etcd") for i in range(size)]
        self.cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self, timeout: float = 30) -> "EtcdCluster":
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                m.start(self.cluster, self.token)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        from tidegate.fleet.etcd import Etcd, EtcdUnavailable

        e = Etcd(self.endpoints, timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    e.put("/tidegate-test/ready", b"1")
                    return
                except EtcdUnavailable:
                    time.sleep(0.2)
        finally:
            e.close()
        logs = "\n".join(m.log_path.read_text()[-2000:] for m in self.members if m.log_path.exists())
        raise RuntimeError(f"etcd not ready after {timeout}s:\n{logs}")

    def leader(self) -> EtcdMember:
        from tidegate.fleet.etcd import Etcd

        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            e = Etcd(m.url, timeout=2)
            try:
                st = e.status()
                if st.get("leader") == st.get("header", {}).get("member_id"):
                    return m
            except Exception:
                pass
            finally:
                e.close()
        raise RuntimeError("no etcd leader")

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
