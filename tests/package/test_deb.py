"""The .deb on a clean Debian: installed with apt into a fresh debootstrap
root (scripts/clean-root.sh; the root with the package's dependencies is
cached), it runs `tidegate version` and `tidegate validate` on the shipped
conffile, systemd accepts its unit, the service user exists; `remove` keeps
the conffiles, `purge` leaves no path that was not there before, and no user.

Run by `make test-package` (builds the .deb, sets TIDEGATE_DEB); skipped
otherwise, so `make test` does not pay for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEB = os.environ.get("TIDEGATE_DEB", "")

pytestmark = pytest.mark.skipif(not DEB or os.geteuid() != 0 or not shutil.which("debootstrap"),
                                reason="run `make test-package` (root, debootstrap, a built .deb)")  # fmt: skip

# what dpkg, apt and adduser write in every install, whatever the package, and /run (a tmpfs on a
# booted system: adduser's lock file, systemd-analyze's marker)
NOISE = ("var/lib/dpkg/", "var/log/", "var/cache/", "var/lib/apt/", "tmp/", "proc/", "run/", "etc/passwd-",
         "etc/group-", "etc/shadow-", "etc/gshadow-")  # fmt: skip


@pytest.fixture
def clean_root():
    work = Path(tempfile.mkdtemp(prefix="tidegate-pkg-", dir="/var/tmp"))
    root = work / "root"
    subprocess.run(["bash", str(ROOT / "scripts" / "clean-root.sh"), "fresh", str(root)], check=True, timeout=1800)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
        shutil.rmtree(work)


def paths(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.startswith("proc"):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.normpath(os.path.join(rel, n))
            if not p.startswith(NOISE):
                out.add(p)
    return out


def chroot(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    r = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, f"{argv}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_install_run_remove_purge_in_a_clean_root(clean_root):
    root = clean_root
    before = paths(root)
    shutil.copy(DEB, root / "tmp" / "tidegate.deb")
    # the dependencies are in the cached root already: apt resolves, nothing is downloaded
    chroot(root, "apt-get", "install", "-y", "-q", "--no-install-recommends", "/tmp/tidegate.deb")

    from tidegate import __version__

    assert chroot(root, "tidegate", "version").stdout.startswith(f"tidegate {__version__}")
    # the agent's own imports (numpy, grpc, the generated code) load from the vendored libraries
    assert "--interface" in chroot(root, "tidegate", "agent", "--help").stdout
    chroot(root, "env", "PYTHONPATH=/opt/tidegate/lib", "python3", "-P", "-s", "-c",
           "import tidegate.daemon.main, tidegate.api.server, tidegate.changes.blocklist, numpy; numpy.zeros(4).sum()")
    r = chroot(root, "tidegate", "validate", "--strict", "/etc/tidegate/rules.yaml")
    assert "/etc/tidegate/rules.yaml: valid" in r.stdout
    # a minimal root has no man-db to look Documentation=man:tidegate(1) up with
    chroot(root, "systemd-analyze", "verify", "--man=no", "tidegate-agent@eth0.service")
    assert chroot(root, "id", "-un", "tidegate").stdout.strip() == "tidegate"
    assert chroot(root, "python3", "-c", "import bcc").returncode == 0  # the agent's BCC: Debian's python3-bpfcc
    for f in ("/usr/share/man/man1/tidegate.1.gz", "/usr/share/bash-completion/completions/tidegate",
              "/usr/share/zsh/vendor-completions/_tidegate", "/opt/tidegate/bpf/tidegate.c",
              "/usr/share/tidegate/rules.schema.json", "/etc/tidegate/example.env"):  # fmt: skip
        assert (root / f.lstrip("/")).is_file(), f
    assert not list((root / "opt/tidegate/lib").glob("pytest*")), "no test extras"
    assert not list((root / "opt/tidegate/lib").glob("grpc_tools*")), "no code generator at run time"
    conffiles = chroot(root, "dpkg-query", "-W", "-f", "${Conffiles}", "tidegate").stdout
    assert "/etc/tidegate/rules.yaml" in conffiles and "/etc/tidegate/example.env" in conffiles

    chroot(root, "dpkg", "--remove", "tidegate")
    assert (root / "etc/tidegate/rules.yaml").is_file(), "remove keeps the conffiles"
    assert not (root / "opt/tidegate").exists()
    chroot(root, "dpkg", "--purge", "tidegate")
    left = paths(root) - before
    assert left == set(), sorted(left)
    assert chroot(root, "getent", "passwd", "tidegate", check=False).returncode == 2, "the service user is gone"
    assert chroot(root, "getent", "group", "tidegate", check=False).returncode == 2
