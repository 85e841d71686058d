"""Fixtures for the end-to-end suites (the harness is tests/e2e/harness.py):
a veth pair whose peer end sits in a network namespace the test creates, a
real `tidegate agent` subprocess on the host end, a gRPC client with
credentials, a /metrics scraper and a bounded traffic sender that runs
inside the namespace.

Teardown removes everything by name: it SIGTERMs the agent, detaches the
program and unpins the maps the way `tidegate detach` does, and deletes the
veth pair and the namespace. Addresses come from 10.200.0.0/16 and exist
only on the test's own veth pair.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fixtures import rule_set
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.lab.veth import VethLab

from . import harness
from .harness import AUTHOR, BIN, FRAME_BYTES, PIN_ROOT, RULE_SET_MAPS, Agent, Api, free_port, new_lab  # noqa: F401
from .harness import parse_metrics  # noqa: F401
from .harness import pinned_dump, remove_all, xdp_prog_id  # noqa: F401


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
    args = ["--dport", str(dport), "--count", str(count), "--pps", str(pps), "--time-limit", "60", "--seed", str(seed)]
    args += ["--src", src] if src else ["--src-net", src_net, "--sources", str(sources)]
    p = harness.send(lab, *args, wait=False)
    return finish(p) if wait else p


def finish(p: subprocess.Popen, timeout: float = 90) -> dict:
    res = harness.finish(p, timeout)
    assert res["errors"] == 0, res
    return res


@pytest.fixture(scope="module")
def start_agent(tmp_path_factory):
    """Factory: start_agent(prefix, rules_yaml=None, extra=[], host=None,
    credentials=None) -> Agent on a new veth lab (host "lab": gRPC listens on
    the lab's host-end address instead of loopback; credentials for the
    readiness check of an agent serving TLS). Everything it started is
    removed at the end of the module."""
    started: list[Agent] = []
    labs: list[VethLab] = []

    def start(prefix: str, rules_yaml: str | None = None, extra: list[str] | None = None,
              wait: bool = True, host: str | None = None, credentials=None) -> Agent:  # fmt: skip
        work = tmp_path_factory.mktemp(f"agent-{prefix}")
        rules = None
        if rules_yaml is not None:
            rules = str(work / "rules.yaml")
            Path(rules).write_text(rules_yaml)
        lab = new_lab(prefix)
        labs.append(lab)
        agent = Agent(lab, work, rules, extra, host=lab.host_ip if host == "lab" else (host or "127.0.0.1"),
                      credentials=credentials)  # fmt: skip
        started.append(agent)
        return agent.start() if wait else agent

    yield start
    remove_all(started, labs)


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
BASE_RULES = rule_set("base")
