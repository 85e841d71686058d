"""Pins that only the compile child sees, until the start is sure to go on.

A compile started ahead (compiler.start_ahead with a job) runs while the
agent still imports its modules and has not yet checked its options: what
BCC pins then (the maps, BPF_TABLE_PINNED) must not be left behind by a
start that stops. The child moves into a mount namespace of its own and
mounts a new bpffs instance over the one that holds the pin dir: BCC
creates and pins the maps there, seen by nobody else, and the kernel frees
them with the child if the start stops. When the agent asks for the
program (the go), `publish` pins the maps and the program in the real
bpffs, reached through a descriptor of its mount point opened before the
move (/proc/self/fd/N/...), where BCC would have pinned them.

Only for an empty (or missing) pin dir: maps pinned there already are the
ones the program must use, which only a compile in the real bpffs opens.
"""

from __future__ import annotations

import ctypes
import errno
import os

from tidegate.kernel import bpfsys

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


class Unusable(Exception):
    """A compile ahead cannot be made or published here; the agent compiles in the real bpffs."""


def bpffs_mount_point(path: str, mounts: str = "/proc/self/mounts") -> str | None:
    """The mount point of the bpffs that holds `path` (the longest bpf mount above it)."""
    best = None
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and (best is None or len(mnt) > len(best[0])):
                best = (mnt, parts[2])
    return best[0] if best and best[1] == "bpf" else None


class PrivateBpffs:
    """This process's own bpffs over the real one that holds `pin_dir`."""

    def __init__(self, pin_dir: str):
        mnt = bpffs_mount_point(pin_dir)
        if mnt is None:
            raise Unusable(f"{pin_dir} is not in a mounted bpffs")
        self.pin_dir, self.mount_point = pin_dir, mnt
        libc = ctypes.CDLL(None, use_errno=True)
        self._real = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the real bpffs, kept
        try:
            if libc.unshare(CLONE_NEWNS) != 0:
                raise Unusable(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
            # private first: the new bpffs must not propagate to the host's mounts
            if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise Unusable(f"making the mounts private: {os.strerror(ctypes.get_errno())}")
            if libc.mount(b"bpf", mnt.encode(), b"bpf", 0, None) != 0:
                raise Unusable(f"mounting a bpffs at {mnt}: {os.strerror(ctypes.get_errno())}")
            if os.path.exists(pin_dir):
                raise Unusable(f"{pin_dir} is there in the new bpffs: not an instance of its own")
            os.makedirs(pin_dir, mode=0o700)
        except BaseException:
            os.close(self._real)
            raise

    def real_path(self, path: str) -> str:
        """`path` (in the pin dir) in the real bpffs."""
        return f"/proc/self/fd/{self._real}/{os.path.relpath(path, self.mount_point)}"

    def publish(self, prog_fd: int, prog_pin: str) -> None:
        """Pin the maps pinned in the private pin dir, then the program, at
        the same paths in the real bpffs: all of them, or (Unusable) none."""
        done: list[str] = []
        try:
            if not os.path.isdir(self.real_path(self.pin_dir)):
                raise Unusable(f"{self.pin_dir} is not there in the real bpffs")
            for name in sorted(os.listdir(self.pin_dir)):
                fd = bpfsys.obj_get(os.path.join(self.pin_dir, name))
                try:
                    target = self.real_path(os.path.join(self.pin_dir, name))
                    try:
                        bpfsys.obj_pin(fd, target)
                    except bpfsys.BpfError as e:
                        if e.errno == errno.EEXIST:
                            raise Unusable(f"{self.pin_dir}/{name} is pinned already: the pin dir is no longer empty")
                        raise
                    done.append(target)
                finally:
                    os.close(fd)
            tmp = self.real_path(f"{prog_pin}_tmp{os.getpid()}")  # bpffs names take no dots
            bpfsys.obj_pin(prog_fd, tmp)
            os.replace(tmp, self.real_path(prog_pin))  # the program's pin last, whole or not at all
        except BaseException:
            for target in done:
                try:
                    os.unlink(target)
                except OSError:
                    pass
            raise
