"""Real etcd for the fleet tests: one member or a three-member cluster on
free loopback ports with temporary data directories, started and stopped
(or SIGKILLed) by the test, optionally serving clients over TLS with client
certificates required (--client-cert-auth)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tidegate.lab.launcher import LoggedProcess

from .conftest import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdPKI:
    """A lab CA made by tidegate.access.certs (`tidegate certs`) with a client certificate for the
    fleet (agents and driver), etcd's own certificate signed by it with
    openssl, and a client certificate from another CA (a stranger).

    etcd's certificate allows server *and* client auth: etcd's JSON gateway
    dials etcd itself with it, and with --client-cert-auth that dial must
    pass as a client."""

    def __init__(self, d: Path):
        from tidegate.access.certs import make_lab_pki

        self.dir = d
        make_lab_pki(d, "etcd", ["fleet"])
        make_lab_pki(d / "other", "other", ["stranger"])
        self.ca, self.cert, self.key = d / "ca.pem", d / "fleet.pem", d / "fleet.key"
        self.stranger = (d / "other" / "stranger.pem", d / "other" / "stranger.key")
        self.etcd_cert, self.etcd_key = d / "etcd.pem", d / "etcd.key"
        ext = d / "etcd.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "subjectAltName=IP:127.0.0.1,DNS:localhost\n")  # fmt: skip
        for argv in (["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                      str(self.etcd_key)],
                     ["req", "-new", "-key", str(self.etcd_key), "-subj", "/CN=etcd", "-out", str(d / "etcd.csr")],
                     ["x509", "-req", "-in", str(d / "etcd.csr"), "-CA", str(self.ca), "-CAkey", str(d / "ca.key"),
                      "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(self.etcd_cert)]):  # fmt: skip
            subprocess.run(["openssl", *argv], check=True, capture_output=True)

    def client_options(self) -> dict:
        """Keyword arguments for tidegate.fleet.etcd.Etcd."""
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


class EtcdMember(LoggedProcess):
    """One etcd on loopback, its log in <name>.log beside its data dir."""

    def __init__(self, name: str, data_dir: Path, pki: EtcdPKI | None = None):
        super().__init__(data_dir.parent / f"{name}.log")
        self.name = name
        self.data_dir = data_dir
        self.pki = pki
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"{'https' if pki else 'http'}://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"

    def start(self, cluster: str, token: str) -> None:
        argv = [ETCD, "--name", self.name, "--data-dir", str(self.data_dir), "--listen-client-urls", self.url,
                "--advertise-client-urls", self.url, "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url, "--initial-cluster", cluster,
                "--initial-cluster-token", token, "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500", "--logger", "zap",
                "--log-outputs", "stderr"]  # fmt: skip
        if self.pki:
            argv += ["--cert-file", str(self.pki.etcd_cert), "--key-file", str(self.pki.etcd_key),
                     "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca)]  # fmt: skip
        self.spawn(argv)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        return super().stop(sig, timeout)


class EtcdCluster:
    """`size` members on loopback; `endpoints` is the comma list for --etcd.
    With a `pki`, clients talk TLS and need a certificate of its CA."""

    def __init__(self, workdir: Path, size: int = 1, tag: str = "e", pki: EtcdPKI | None = None):
        self.workdir = workdir
        self.pki = pki
        self.token = f"tg-{tag}-{os.getpid()}"
        self.members = [EtcdMember(f"{tag}{i}", workdir / f"{tag}{i}.etcd", pki) for i in range(size)]
        self.cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def client(self, endpoints: str | None = None, timeout: float = 5.0):
        from tidegate.fleet.etcd import Etcd

        return Etcd(endpoints or self.endpoints, timeout=timeout, **(self.pki.client_options() if self.pki else {}))

    def cli_options(self) -> list[str]:
        """`tidegate fleet` options to reach it."""
        opts = ["--etcd", self.endpoints]
        if self.pki:
            opts += ["--etcd-ca", str(self.pki.ca), "--etcd-cert", str(self.pki.cert), "--etcd-key", str(self.pki.key)]
        return opts

    def agent_options(self) -> list[str]:
        """`tidegate agent` options to reach it."""
        opts = ["--fleet-etcd", self.endpoints]
        if self.pki:
            opts += ["--fleet-etcd-ca", str(self.pki.ca), "--fleet-etcd-cert", str(self.pki.cert),
                     "--fleet-etcd-key", str(self.pki.key)]  # fmt: skip
        return opts

    def start(self, timeout: float = 30) -> "EtcdCluster":
        for m in self.members:
            if not m.running():
                m.start(self.cluster, self.token)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        from tidegate.fleet.etcd import EtcdUnavailable

        e = self.client(timeout=2)
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
        for m in self.members:
            if not m.running():
                continue
            e = self.client(m.url, timeout=2)
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
