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
    r = subprocess.run([str(BIN), "lab", "--duration", "8", "--no-view"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("[")][-1]
    m = re.search(r"\[ *(\d+) s\] v1: ([\d,]+) packets, ([\d,]+) dropped; legitimate client: ([\d,]+) packets "
                  r"received \(([\d.]+)%", last)  # fmt: skip
    assert m, last
    elapsed = int(m.group(1))
    packets, dropped, legit = (int(m.group(i).replace(",", "")) for i in (2, 3, 4))
    assert float(m.group(5)) >= 99.0, "the legitimate stream gets through"
    assert legit > 100
    # examples/lab.yaml: the flood (20,000 spoofed sources of one /16, none over its own 50 pps) is held by
    # the /16 prefix limit, 500 pps with a burst of 1,000: whatever rate the sender reached, what passes of
    # it is the burst plus 500 pps for as long as it ran (at most the printed time, rounded, plus 0.5 s)
    flood = packets - round(legit * 100 / float(m.group(5)))
    flood_passed = flood - dropped
    assert flood > 2 * (1000 + 500 * (elapsed + 0.5)), f"the flood sender fell far behind: {last}"
    assert flood_passed <= 1000 + 500 * (elapsed + 0.5) + 50, f"more passed than the prefix limit allows: {last}"
    assert flood_passed >= 1000 + 500 * (elapsed - 3), f"less passed than the prefix limit allows: {last}"
    assert "tg-lab" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert not os.path.exists("/sys/fs/bpf/tidegate/lab")
    assert subprocess.run(["ip", "link", "show", "tglabh"], capture_output=True).returncode != 0


def test_lab_live_view_try_it_commands_and_ctrl_c():
    """The README's "try it" flow: the live view on a terminal, the printed
    commands run from another terminal against the lab's agent, then Ctrl-C
    removes everything."""
    import pty
    import select
    import signal
    import time

    master, slave = pty.openpty()
    p = subprocess.Popen([str(BIN), "lab"], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                         env={**os.environ, "COLUMNS": "120", "LINES": "60", "TERM": "xterm"})  # fmt: skip
    os.close(slave)
    screen = b""

    def read_until(pattern: bytes, timeout: float) -> bytes:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while pattern not in screen and time.monotonic() < deadline and p.poll() is None:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        assert pattern in screen, screen[-3000:].decode(errors="replace")
        return screen

    try:
        text = read_until(b"Ctrl-C stops", 120).decode(errors="replace")
        env_line = re.search(r"export (TIDEGATE_SERVER=\S+) (TIDEGATE_TOKEN_FILE=\S+)", text)
        assert env_line, text
        env = {**os.environ, **dict(kv.split("=", 1) for kv in env_line.groups())}
        read_until(b"top sources by drops", 60)  # the live view is drawing
        read_until(b"legitimate client:", 30)

        def cli(*argv):
            r = subprocess.run([str(BIN), "-o", "json", *argv], capture_output=True, text=True, env=env, timeout=60)
            return r.returncode, r.stdout + r.stderr

        code, out = cli("status")
        assert code == 0 and '"attached": true' in out, out
        code, out = cli("whatif", "examples/too-tight.yaml")
        assert code in (0, 5) and (code == 5) == ('"within_budget": false' in out), out  # 5: over budget
        code, out = cli("apply", "examples/too-tight.yaml", "--shadow", "--reason", "try it")
        assert code == 0, out
        code, out = cli("shadow", "report")
        assert code == 0 and "would_drop" in out, out

        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        try:
            while True:
                r, _, _ = select.select([master], [], [], 0.5)
                if not r:
                    break
                screen += os.read(master, 65536)
        except OSError:
            pass
        assert p.returncode == 0, screen[-2000:].decode(errors="replace")
        assert b"removed namespace tg-lab" in screen
    finally:
        if p.poll() is None:  # a failed check: Ctrl-C first, so the lab removes its agent, pins and namespace
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        os.close(master)
    assert "tg-lab" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert not os.path.exists("/sys/fs/bpf/tidegate/lab")
    assert subprocess.run(["ip", "link", "show", "tglabh"], capture_output=True).returncode != 0
    assert subprocess.run(["pgrep", "-f", "tidegate agent --interface tglabh"], capture_output=True).returncode != 0
