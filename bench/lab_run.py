"""The set-up the agent benchmarks share: their rule sets (files in
bench/rules/) and a temporary directory holding the rule set next to a fresh
veth lab, named after the benchmark and its process id.

    tmp, lab = lab_with_rules("ua", "10.210.1", rule_set("app-and-flooded"))

remove_all() takes down what a run made: its senders, the agent and its
kernel objects, the lab and the directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from report import use_repo_package

use_repo_package()

from tidegate.client import Client  # noqa: E402
from tidegate.lab.launcher import AgentProcess  # noqa: E402
from tidegate.lab.veth import VethLab  # noqa: E402

RULE_SETS = Path(__file__).resolve().parent / "rules"


def rule_set(name: str) -> str:
    """The text of bench/rules/<name>.yaml."""
    return (RULE_SETS / f"{name}.yaml").read_text()


def lab_with_rules(tag: str, subnet: str, rules: str) -> tuple[Path, VethLab]:
    """tmp/rules.yaml holding `rules`, and VethLab <tag><pid> on <subnet>.1/.2, created."""
    tmp = Path(tempfile.mkdtemp(prefix=f"tg-bench-{tag}-"))
    (tmp / "rules.yaml").write_text(rules)
    return tmp, VethLab(f"{tag}{os.getpid() % 10000}", subnet=subnet).create()


def lab_agent(tmp: Path, lab: VethLab, name: str, **options) -> AgentProcess:
    """The agent (not started yet) on the lab's host end: state in tmp/state,
    started with tmp/rules.yaml, pin name bench-<name>; `options` as AgentProcess takes them."""
    return AgentProcess(lab.host_if, tmp / "state", pin_name=f"bench-{name}", rules=tmp / "rules.yaml", **options)


def admin_client(agent: AgentProcess, timeout: float) -> Client:
    """A tidegate client of `agent` with the admin token it wrote."""
    return Client(agent.server, timeout=timeout, token_file=str(agent.state_dir / "tokens"))


def remove_all(tmp: Path, lab: VethLab, agent: AgentProcess | None = None,
               procs: list[subprocess.Popen] | tuple = ()) -> None:  # fmt: skip
    """Kill the senders still running, stop the agent and take its program and
    pins away, delete the lab and the directory."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    if agent is not None:
        agent.stop(timeout=20)
        agent.remove_kernel_objects()
    lab.remove()
    shutil.rmtree(tmp, ignore_errors=True)
