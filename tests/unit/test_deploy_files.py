"""Static checks of what ships for operators: the Vagrantfile validates,
every shell script is shellcheck-clean, the systemd unit asks for the
capabilities BPF needs and no others."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _need(tool: str) -> None:
    if not shutil.which(tool):
        pytest.skip(f"{tool} is installed by `make install` (developer tools); not on this machine")


def test_vagrantfile_validates():
    _need("vagrant")
    r = subprocess.run(["vagrant", "validate"], cwd=ROOT / "vagrant", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shell_scripts_are_shellcheck_clean():
    _need("shellcheck")
    scripts = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("vagrant/*.sh"), ROOT / ".ci" / "run"])
    assert len(scripts) >= 5
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_systemd_unit_capabilities():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "tidegate-agent.service")
    svc = unit["Service"]
    caps = set(svc["CapabilityBoundingSet"].split())
    assert {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"} <= caps
    assert caps <= {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"}
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["StateDirectory"] == "tidegate" and svc["Restart"] == "on-failure"
