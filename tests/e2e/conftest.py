"""Fixtures for the end-to-end suites: a veth pair whose peer end sits in a
network namespace the test creates, a real `tidegate agent` subprocess on
the host end, a gRPC client with credentials, a /metrics scraper and a
bounded traffic sender that runs inside the namespace.

Every name (namespace, interfaces, pin directory) is derived from the test
process id and a counter, and teardown removes each by name: it SIGTERMs the
agent, detaches the program and unpins the maps the way `tidegate detach`
does, and deletes the veth pair and the namespace. Addresses come from
10.200.0.0/16 and exist only on the test's own veth pair.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.lab.veth import VethLab

from .harness import RULE_SET_MAPS, pinned_dump

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "tidegate"
PIN_ROOT = "/sys/fs/bpf/tidegate"
AUTHOR = "e2e-api"
_seq = itertools.count(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def new_lab(prefix: str) -> VethLab:
    """A veth pair with its peer in a fresh namespace, unique to this process."""
    n = next(_seq)
    # base 36 keeps pid and sequence short however many labs one run makes
    tag = f"{prefix}{_base36(os.getpid() % 1_000_000)}{_base36(n)}"
    assert len(tag) <= 12, f"prefix {prefix!r} too long for an interface name"  # tg<tag>h fits IFNAMSIZ
    subnet = f"10.200.{(os.getpid() * 7 + n * 31) % 250 + 2}"
    return VethLab(tag, subnet=subnet).create()


def xdp_prog_id(ifname: str) -> int | None:
    """The id of the XDP program attached to ifname, read with iproute2
    (independent of the agent)."""
    out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", ifname], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    xdp = json.loads(out)[0].get("xdp")
    return int(xdp["prog"]["id"]) if xdp and "prog" in xdp else None


def bpftool_dump(pin_dir: str, names=RULE_SET_MAPS) -> dict[str, str]:
    """Digests of what bpftool prints for the rule-set maps (read-only, while
    the agent owns them)."""
    return pinned_dump(pin_dir, names)


def send(lab: VethLab, *, src: str | None = None, src_net: str | None = None, sources: int = 1, dport: int = 9,
         count: int = 10, pps: float = 0.0, wait: bool = True, seed: int = 1):  # fmt: skip
    """Send `count` crafted Ethernet/IPv4/UDP frames (60 bytes) from inside the
    namespace to the host end, from `src` or from `sources` addresses spread
    over `src_net`. Bounded by count and a 60 s limit. Returns the sender's
    {"sent", "errors", "seconds"} (or the Popen with wait=False)."""
    argv = [sys.executable, "-m", "tidegate.lab.traffic", "--iface", lab.peer_if, "--dst-mac", lab.host_mac(),
            "--dst-ip", lab.host_ip, "--dport", str(dport), "--count", str(count), "--pps", str(pps),
            "--time-limit", "60", "--seed", str(seed)]  # fmt: skip
    argv += ["--src", src] if src else ["--src-net", src_net, "--sources", str(sources)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "control")}
    p = lab.popen_in_ns(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return p
    return finish(p)


def finish(p: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    res = json.loads(out)
    assert res["errors"] == 0, res
    return res


FRAME_BYTES = 60  # what send() puts on the wire: 14 + 20 + 8 + 18


class Api:
    """A gRPC client of one agent: the Filter stub, health and reflection,
    with the admin token (or another role's) and a tidegate-author."""

    def __init__(self, agent: "Agent", role: str = "admin", author: str = AUTHOR):
        from tidegate.v1 import tidegate_pb2 as pb
        from tidegate.v1 import tidegate_pb2_grpc as pbg

        self.pb = pb
        self.channel = grpc.insecure_channel(agent.server)
        self.stub = pbg.FilterStub(self.channel)
        self.md = [("tidegate-author", author)]
        token = agent.token(role)
        if token:
            self.md.append(("authorization", f"Bearer {token}"))

    def __getattr__(self, method: str):
        rpc = getattr(self.stub, method)

        def call(request=None, **fields):
            req = request if request is not None else _request_type(self.pb, method)(**fields)
            return rpc(req, metadata=self.md, timeout=60)

        return call

    def error(self, method: str, request=None, **fields) -> grpc.RpcError:
        """Call a method that must fail; return its RpcError."""
        try:
            getattr(self, method)(request, **fields)
        except grpc.RpcError as e:
            return e
        raise AssertionError(f"{method} succeeded but should have failed")

    def violations(self, err: grpc.RpcError) -> list:
        md = dict(err.trailing_metadata() or ())
        raw = md.get("tidegate-errors-bin")
        return list(self.pb.ValidationErrors.FromString(raw).violations) if raw else []

    def close(self) -> None:
        self.channel.close()


_REQUESTS = {
    "GetStatus": "GetStatusRequest", "ValidateRuleSet": "RuleSetText", "ApplyRuleSet": "ApplyRequest",
    "Rollback": "RollbackRequest", "ListVersions": "ListVersionsRequest", "GetVersion": "GetVersionRequest",
    "GetCounters": "GetCountersRequest", "TopSources": "TopSourcesRequest", "WatchCounters": "WatchRequest",
    "UpdateThresholds": "UpdateThresholdsRequest", "PromoteShadow": "PromoteRequest",
    "ClearShadow": "ClearShadowRequest", "ShadowReport": "ShadowReportRequest", "WhatIf": "RuleSetText",
    "GetReview": "GetReviewRequest", "ListAudit": "ListAuditRequest", "Insight": "InsightRequest",
}  # fmt: skip


def _request_type(pb, method: str):
    return getattr(pb, _REQUESTS[method])


class Agent:
    """A real `tidegate agent` subprocess on lab.host_if, with its own state
    dir, pin directory and ports. Ready when it logs msg="serving"."""

    def __init__(self, lab: VethLab, workdir: Path, rules: str | None = None, extra: list[str] | None = None,
                 host: str = "127.0.0.1"):  # fmt: skip
        self.lab = lab
        self.host = host
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.rules = rules
        self.extra = list(extra or [])
        self.port = free_port()
        self.metrics_port = free_port()
        self.pin_name = f"e2e-{lab.tag}"
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self._api: Api | None = None

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pin_dir(self) -> str:
        return f"{PIN_ROOT}/{self.pin_name}"

    def argv(self) -> list[str]:
        argv = [str(BIN), "agent", "--interface", self.lab.host_if, "--state-dir", str(self.state_dir),
                "--listen", self.server, "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--pin-name", self.pin_name, "--sample-interval", "1", *self.extra]  # fmt: skip
        if self.rules:
            argv += ["--rules", self.rules]
        return argv

    def start(self, timeout: float = 90) -> "Agent":
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()[offset:]}")
            if 'msg="serving"' in self.log()[offset:]:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"agent not serving after {timeout}s:\n{self.log()[offset:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self._api is not None:
            self._api.close()
            self._api = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def token(self, role: str) -> str | None:
        try:
            lines = (self.state_dir / "tokens").read_text().splitlines()
        except OSError:
            return None
        return next((ln.split()[1] for ln in lines if ln.startswith(f"{role} ")), None)

    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api(self)
        return self._api

    def scrape(self) -> dict[tuple, float]:
        """GET /metrics, parsed with prometheus_client's text parser:
        {(sample name, ((label, value), ...)): value}."""
        return parse_metrics(self.scrape_text())

    def scrape_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=20).read().decode()

    def cleanup_kernel(self) -> None:
        """What `tidegate detach --interface IF --pin-name P` does."""
        KernelFilter(FilterConfig(interface=self.lab.host_if, pin_root=PIN_ROOT, pin_name=self.pin_name)).detach(
            remove_pins=True
        )


def parse_metrics(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def start_agent(tmp_path_factory):
    """Factory: start_agent(prefix, rules_yaml=None, extra=[], host=None) ->
    Agent on a new veth lab (host "lab": gRPC listens on the lab's host-end
    address instead of loopback). Everything it started is removed at the
    end of the module."""
    started: list[Agent] = []
    labs: list[VethLab] = []

    def start(prefix: str, rules_yaml: str | None = None, extra: list[str] | None = None,
              wait: bool = True, host: str | None = None) -> Agent:  # fmt: skip
        work = tmp_path_factory.mktemp(f"agent-{prefix}")
        rules = None
        if rules_yaml is not None:
            rules = str(work / "rules.yaml")
            Path(rules).write_text(rules_yaml)
        lab = new_lab(prefix)
        labs.append(lab)
        agent = Agent(lab, work, rules, extra, host=lab.host_ip if host == "lab" else (host or "127.0.0.1"))
        started.append(agent)
        return agent.start() if wait else agent

    yield start
    for agent in started:
        agent.stop()
        try:
            agent.cleanup_kernel()
        except Exception as e:  # keep removing the rest
            print(f"cleanup of {agent.pin_name}: {e}", file=sys.stderr)
    for lab in labs:
        lab.remove()


@pytest.fixture(scope="module")
def make_lab():
    """Factory for bare veth labs (no agent), removed at the end of the module."""
    labs: list[VethLab] = []

    def make(prefix: str) -> VethLab:
        lab = new_lab(prefix)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        try:
            KernelFilter(FilterConfig(interface=lab.host_if, pin_root=PIN_ROOT, pin_name=f"e2e-{lab.tag}")).detach(
                remove_pins=True
            )
        finally:
            lab.remove()


# The rule set several e2e modules start from: an app rule (UDP 5555) and a
# sink (UDP 9) for floods, both far above the tests' legitimate rates.
BASE_RULES = """\
defaults:
  limit: {pps: 1000, burst: 2000}
rules:
  - name: app
    protocol: udp
    dst_ports: [5555]
    limit: {pps: 500, burst: 500}
  - name: sink
    protocol: udp
    dst_ports: [9]
    limit: {pps: 1000, burst: 1000}
"""
