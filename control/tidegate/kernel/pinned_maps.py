"""tidegate's BPF maps as the agent sees them: opened by fd, read and
written with bpf(2) (bpfsys), without BCC or LLVM in the process.

The ctypes layouts (layout.LAYOUTS) mirror bpf/layout.h. The compile child
(compiler.py) checks them against the layouts BCC derives from the C source
at every compile (layout_mismatch), and refuses a program whose maps they do
not describe, so there is still one source of truth: the C headers.

`PinnedMap` offers the part of BCC's table interface that the kernel layer
and the tests use: Key/Leaf types, t[key], t[key] = leaf, getvalue (per-CPU maps),
keys(), items(), clear() and map_fd.
"""

from __future__ import annotations

import ctypes
import errno
import os

from tidegate.kernel import bpfsys
from tidegate.kernel.layout import LAYOUTS

BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY = 2, 6


def layout_mismatch(name: str, key_type: type, leaf_type: type) -> str | None:
    """Why LAYOUTS[name] does not describe these (BCC-made) types, or None."""
    want_key, want_leaf, _ = LAYOUTS[name]
    for what, want, got in (("key", want_key, key_type), ("value", want_leaf, leaf_type)):
        diff = _type_diff(want, got)
        if diff:
            return f"map {name} {what}: {diff} (bpf/layout.h and control/tidegate/kernel/layout.py disagree)"
    return None


def _type_diff(want: type, got: type, path: str = "") -> str | None:
    if ctypes.sizeof(want) != ctypes.sizeof(got):
        return f"{path or 'size'}: {ctypes.sizeof(want)} bytes here, {ctypes.sizeof(got)} in the program"
    if hasattr(want, "_fields_") != hasattr(got, "_fields_"):
        return f"{path or 'type'}: a struct on one side only"
    if hasattr(want, "_length_"):
        return _type_diff(want._type_, got._type_, path + "[]") if hasattr(got, "_type_") else f"{path}: array"
    if not hasattr(want, "_fields_"):
        return None
    wf = [(f[0], f[1], getattr(want, f[0]).offset) for f in want._fields_]
    gf = [(f[0], f[1], getattr(got, f[0]).offset) for f in got._fields_ if not f[0].startswith("__pad")]
    if [(n, o) for n, _, o in wf] != [(n, o) for n, _, o in gf]:
        return f"{path or 'fields'}: {[(n, o) for n, _, o in wf]} here, {[(n, o) for n, _, o in gf]} in the program"
    for (n, wt, _), (_, gt, _) in zip(wf, gf):
        diff = _type_diff(wt, gt, f"{path}.{n}")
        if diff:
            return diff
    return None


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not only online ones)."""
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
        return n


class PinnedMap:
    """One BPF map, owned by fd."""

    def __init__(self, name: str, fd: int):
        self.name = name
        self.map_fd = fd
        info = bpfsys.map_info(fd)
        self.key_type, self.leaf_type, self.percpu = LAYOUTS[name]
        if ctypes.sizeof(self.key_type) != info.key_size or ctypes.sizeof(self.leaf_type) != info.value_size:
            raise ValueError(f"map {name} (id {info.id}) has key/value sizes {info.key_size}/{info.value_size}, "
                             f"the agent expects {ctypes.sizeof(self.key_type)}/{ctypes.sizeof(self.leaf_type)}")
        self.max_entries = info.max_entries
        self.is_array = info.type in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY)
        self.Key = self.key_type
        self.sLeaf = self.leaf_type
        # like BCC: a per-CPU map's Leaf is one value per possible CPU
        self.Leaf = self.leaf_type * possible_cpus() if self.percpu else self.leaf_type

    def __getitem__(self, key):
        leaf = self.Leaf()
        try:
            bpfsys.map_lookup(self.map_fd, key, leaf)
        except bpfsys.BpfError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise
        return leaf

    def getvalue(self, key):
        return self[key]

    def __setitem__(self, key, leaf) -> None:
        bpfsys.map_update(self.map_fd, key, leaf)

    def __delitem__(self, key) -> None:
        if not bpfsys.map_delete(self.map_fd, key):
            raise KeyError(key)

    def keys(self) -> list:
        if self.is_array:
            return [self.Key(i) for i in range(self.max_entries)]
        out, prev = [], None
        while True:
            nxt = self.Key()
            if not bpfsys.map_next_key(self.map_fd, prev, nxt):
                return out
            out.append(nxt)
            prev = nxt

    def items(self) -> list:
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:  # removed meanwhile (an LRU eviction)
                pass
        return out

    def clear(self) -> None:
        if self.is_array:
            for k in self.keys():
                self[k] = self.Leaf()
            return
        for k in self.keys():
            bpfsys.map_delete(self.map_fd, k)

    def close(self) -> None:
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1
