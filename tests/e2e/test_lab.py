"""`tidegate lab` with no arguments but a duration: it drops the flood,
delivers the legitimate stream, and removes everything it created."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from .harness import BIN

pytestmark = pytest.mark.e2e


def test_lab_drops_flood_passes_legit_and_cleans_up():
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF and network namespaces")
    r = subprocess.run([str(BIN), "lab", "--duration", "8", "--no-view"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("[")][-1]
    m = re.search(r"([\d,]+) packets, ([\d,]+) dropped; legitimate client: ([\d,]+) packets received \(([\d.]+)%", last)
    assert m, last
    packets, dropped, legit = (int(m.group(i).replace(",", "")) for i in (1, 2, 3))
    assert dropped > packets * 0.4, "the flood is mostly dropped"
    assert float(m.group(4)) >= 99.0, "the legitimate stream gets through"
    assert legit > 100
    assert "tg-lab" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert not os.path.exists("/sys/fs/bpf/tidegate/lab")
    assert subprocess.run(["ip", "link", "show", "tglabh"], capture_output=True).returncode != 0
