"""The end-to-end harness: a veth pair into a namespace the test creates, a
real `tidegate agent` subprocess on the host end (started and probed by
tidegate.lab.launcher, the launcher `tidegate lab` and the benchmarks use),
the real CLI, a real gRPC channel and a /metrics scraper.

Every name (namespace, interfaces, pin directory) is derived from the test
process id and a counter, and everything is removed by name."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc

from tidegate.lab.launcher import PIN_ROOT, AgentProcess, free_port, tidegate_executable
from tidegate.lab.veth import VethLab
from tidegate.v1 import tidegate_pb2 as pb
from tidegate.v1 import tidegate_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(tidegate_executable())
AUTHOR = "e2e-api"
FRAME_BYTES = 60  # what the sender puts on the wire: 14 + 20 + 8 + 18
_seq = itertools.count(1)

__all__ = ["PIN_ROOT", "free_port"]  # re-exported for the tests


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


def send(lab: VethLab, *args: str, wait: bool = True, timeout: float = 60):
    """Run the bounded sender (tidegate.lab.traffic) in the namespace with
    `args`; its JSON result, or the Popen with wait=False."""
    p = lab.sender(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out)


def finish(p: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out)


def deny_drops(agent) -> int:
    """Packets the agent's kernel program dropped for the deny list (`tidegate counters`)."""
    c = agent.cli("counters", json_out=True)
    return int(dict((r["reason"], r["packets"]) for r in c["reasons"]).get("deny", 0))


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


def parse_metrics(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Api:
    """A gRPC client of one agent: the Filter stub, with the admin token (or
    another role's) and a tidegate-author."""

    def __init__(self, agent: "Agent", role: str = "admin", author: str = AUTHOR):
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
            req = request if request is not None else getattr(pb, _REQUESTS[method])(**fields)
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
        return list(pb.ValidationErrors.FromString(raw).violations) if raw else []

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


class Agent(AgentProcess):
    """A real `tidegate agent` on lab.host_if with its state dir, log and
    rule file in `workdir`, pin name e2e-<tag>, its own ports, sampling
    every second. `host` is where gRPC listens (loopback by default)."""

    def __init__(self, lab: VethLab, workdir: Path, rules: str | None = None, extra: list[str] | None = None,
                 host: str = "127.0.0.1", credentials: grpc.ChannelCredentials | None = None):  # fmt: skip
        super().__init__(lab.host_if, Path(workdir) / "state", pin_name=f"e2e-{lab.tag}", rules=rules,
                         listen_host=host, extra=list(extra or []), log_path=Path(workdir) / "agent.log",
                         credentials=credentials)  # fmt: skip
        self.lab = lab
        self.workdir = Path(workdir)
        self._api: Api | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self._api is not None:
            self._api.close()
            self._api = None
        return super().stop(sig, timeout)

    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api(self)
        return self._api

    def env(self) -> dict:
        """The environment the CLI runs with against this agent."""
        return {**os.environ, "TIDEGATE_SERVER": self.server, "TIDEGATE_TOKEN_FILE": str(self.state_dir / "tokens"),
                "TIDEGATE_AUTHOR": "e2e-test"}  # fmt: skip

    def cli(self, *args: str, check: bool = True, json_out: bool = False, timeout: float = 120):
        argv = [str(BIN)] + (["-o", "json"] if json_out else []) + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        if json_out and r.returncode == 0:
            return json.loads(r.stdout)
        return r

    def scrape(self) -> dict[tuple, float]:
        """GET /metrics, parsed with prometheus_client's text parser:
        {(sample name, ((label, value), ...)): value}."""
        return parse_metrics(self.scrape_text())

    def scrape_text(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=20).read().decode()

    def cleanup_kernel(self) -> None:
        """What `tidegate detach --interface IF --pin-name P` does."""
        self.remove_kernel_objects()


def remove_all(agents: list[Agent], labs: list[VethLab]) -> None:
    """Stop the agents, take their programs and pins away, delete the labs."""
    for agent in agents:
        agent.stop()
        try:
            agent.cleanup_kernel()
        except Exception as e:  # keep removing the rest
            print(f"cleanup of {agent.pin_name}: {e}", file=sys.stderr)
    for lab in labs:
        lab.remove()
