"""The agent's imports start no thread of their own: numpy's OpenBLAS would
start one per core that spins for a while after import (about 140 ms of
CPU per process on 2 cores, taken from the compile child at a first
start). tidegate/__init__.py caps it at one, the caller's own value kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONTROL = Path(__file__).resolve().parents[2] / "control"

COUNT_THREADS = (
    "import os, tidegate.daemon.main, tidegate.kernel.filter, numpy; "
    "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
)


def _run(env_extra: dict[str, str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env.update(env_extra, PYTHONPATH=str(CONTROL))
    out = subprocess.run([sys.executable, "-c", COUNT_THREADS], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    return int(out[0]), out[1]


def test_importing_the_agent_starts_no_blas_threads():
    threads, value = _run({})
    assert value == "1"
    assert threads == 1, f"{threads} threads after the agent's imports (OpenBLAS's per-core threads?)"


def test_an_operator_setting_for_blas_threads_is_kept():
    _, value = _run({"OPENBLAS_NUM_THREADS": "2"})
    assert value == "2"
