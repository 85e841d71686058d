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
    scripts = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("vagrant/*.sh"), *ROOT.glob("packaging/*.sh"),
                      *(ROOT / "packaging" / "debian").glob("post*"), *(ROOT / "packaging" / "debian").glob("pre*"),
                      ROOT / ".ci" / "run"])  # fmt: skip
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


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def test_systemd_unit_hardening_and_bounds():
    """The sandboxing an edge host's root daemon can take, and bounds that
    still leave room for the agent at 1,048,576 tracked sources (1.47 GB peak
    resident plus 163 MB of map memory, measured: see the unit's comment)."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "tidegate-agent.service")
    svc = unit["Service"]
    assert svc["UMask"] == "0077"
    assert (svc["ProtectKernelTunables"], svc["ProtectKernelLogs"], svc["RestrictSUIDSGID"]) == ("yes",) * 3
    # ProtectKernelTunables makes /sys read-only: the pins need /sys/fs/bpf writable again
    assert "/sys/fs/bpf" in svc["ReadWritePaths"].split()
    assert _size(svc["MemoryMax"]) >= 2 * (1 << 30)
    assert 64 <= int(svc["TasksMax"]) <= 4096


def test_systemd_analyze_counts_the_hardening():
    _need("systemd-analyze")
    unit = ROOT / "deploy" / "tidegate-agent.service"
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    if "--offline" in r.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    lines = {ln.split()[1]: ln.split()[0] for ln in r.stdout.splitlines() if len(ln.split()) > 1}
    for setting in ("UMask=", "ProtectKernelTunables=", "ProtectKernelLogs=", "RestrictSUIDSGID=", "NoNewPrivileges="):
        assert lines.get(setting) == "✓", (setting, r.stdout[-3000:])


def _template() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "tidegate-agent@.service")
    return unit["Service"]


def test_template_unit_runs_as_the_service_user_with_the_measured_capabilities():
    from tidegate.daemon.privileges import AGENT_NEEDS

    svc = _template()
    assert (svc["User"], svc["Group"]) == ("tidegate", "tidegate")
    assert set(svc["CapabilityBoundingSet"].split()) == set(AGENT_NEEDS)
    assert set(svc["AmbientCapabilities"].split()) == set(AGENT_NEEDS)
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    # one agent per interface: its own env file, state dir and pin directory
    assert svc["EnvironmentFile"] == "/etc/tidegate/%i.env"
    assert svc["StateDirectory"] == "tidegate/%i"
    start = svc["ExecStart"]
    for arg in ("--interface %I", "--state-dir /var/lib/tidegate/%i", "--pin-name %i", "--rules ${RULES}"):
        assert arg in start, arg
    assert svc["ExecReload"] == "/bin/sh -c 'kill -HUP $MAINPID'"  # the shell's kill: no procps needed
    assert "/sys/fs/bpf/tidegate/%i" in svc["ReadWritePaths"]


def test_example_env_sets_every_variable_the_template_reads():
    import re

    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", _template()["ExecStart"])) - {"MAINPID"}
    env = dict(ln.split("=", 1) for ln in (ROOT / "deploy" / "example.env").read_text().splitlines()
               if ln and not ln.startswith("#"))  # fmt: skip
    assert used == set(env), (used, env)
    assert env["RULES"] == "/etc/tidegate/rules.yaml"


def test_template_unit_exposure_is_below_the_root_unit():
    _need("systemd-analyze")
    import tempfile

    def score(path: Path) -> float:
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        if "--offline" in r.stderr:
            pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
        return float(r.stdout.strip().splitlines()[-1].split("level for")[1].split(":")[1].split()[0])

    with tempfile.TemporaryDirectory() as d:
        inst = Path(d) / "tidegate-agent@eth0.service"
        inst.write_text((ROOT / "deploy" / "tidegate-agent@.service").read_text())
        assert score(inst) < score(ROOT / "deploy" / "tidegate-agent.service")
