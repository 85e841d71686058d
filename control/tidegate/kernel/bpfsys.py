"""Thin ctypes wrappers for the bpf(2) commands BCC does not expose.

Only what tidegate needs: batch map reads (1M entries in one call rather
than a Python loop), BPF_PROG_TEST_RUN, object info (program tag and id for
adopting an attached program), a map-in-map update used purely to wait
for an RCU grace period after a rule-set flip, and map creation and program
loading for a compiled program kept on disk (program_cache.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from tidegate.kernel import fault_injection

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_F_NO_PREALLOC = 1

_libc = ctypes.CDLL(None, use_errno=True)  # the libc this process runs on (no search: find_library spawns ldconfig)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed; errno is kept."""


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


class _MapCreate(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("pad", ctypes.c_uint8 * 64),
    ]


class _ProgLoad(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("pad", ctypes.c_uint8 * 64),
    ]


class _MapElem(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _TestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _GetById(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _ObjGet(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("between", ctypes.c_uint8 * 112),  # jited symbols, BTF, line info, tags, run time and count
        ("verified_insns", ctypes.c_uint32),  # instructions the verifier walked (kernel 5.16 and later)
        ("rest", ctypes.c_uint8 * 116),
    ]


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("rest", ctypes.c_uint8 * 128),
    ]


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns the fd."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjGet(pathname=ctypes.addressof(p))
    return _bpf(BPF_OBJ_GET, attr)


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetById(id=prog_id))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _GetById(id=map_id))


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: bytes) -> int:
    """A new map; the caller owns the fd."""
    return _bpf(BPF_MAP_CREATE, _MapCreate(map_type=map_type, key_size=key_size, value_size=value_size,
                                           max_entries=max_entries, map_flags=flags, map_name=name[:15]))  # fmt: skip


def prog_load(prog_type: int, insns: bytes, license: bytes, name: bytes, kern_version: int = 0) -> int:
    """Load a program (map fds already in its instructions); the caller owns
    the fd. A refusal is loaded again with the verifier's log, whose last
    lines go into the BpfError."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoad(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                     license=ctypes.addressof(lic), kern_version=kern_version, prog_name=name[:15])  # fmt: skip
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError as first:
        log = ctypes.create_string_buffer(1 << 20)
        attr.log_level, attr.log_size, attr.log_buf = 1, ctypes.sizeof(log), ctypes.addressof(log)
        try:
            return _bpf(BPF_PROG_LOAD, attr)  # not expected to pass where the first did not
        except BpfError as e:
            tail = " | ".join(log.value.decode(errors="replace").strip().splitlines()[-3:])
            raise BpfError(first.errno, f"the verifier refused the program: {tail or e}") from None


def obj_pin(fd: int, path: str) -> None:
    """Pin a program or map at a path on bpffs (the path must not exist)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjGet(pathname=ctypes.addressof(p), bpf_fd=fd))


def prog_map_ids(fd: int) -> list[int]:
    """The ids of the maps a loaded program uses."""
    n = prog_info(fd).nr_map_ids
    ids = (ctypes.c_uint32 * max(1, n))()
    info = ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return list(ids[: min(n, info.nr_map_ids)])


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return info


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return info


def prog_tag(fd: int) -> str:
    return bytes(prog_info(fd).tag).hex()


def test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, int]:
    """Run an XDP program on one frame. Returns (verdict, ns per run)."""
    buf_in = ctypes.create_string_buffer(data, len(data))
    buf_out = ctypes.create_string_buffer(len(data) + 256)
    attr = _TestRun(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=ctypes.sizeof(buf_out),
        data_in=ctypes.addressof(buf_in),
        data_out=ctypes.addressof(buf_out),
        repeat=max(1, repeat),
    )
    _bpf(BPF_PROG_TEST_RUN, attr)
    return attr.retval, attr.duration


def map_update(fd: int, key: ctypes.Array | ctypes.Structure, value, flags: int = 0) -> None:
    attr = _MapElem(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value), flags=flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def map_lookup(fd: int, key, value) -> None:
    """Read one entry into value (BpfError ENOENT when it is not there)."""
    attr = _MapElem(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    _bpf(BPF_MAP_LOOKUP_ELEM, attr)


def map_next_key(fd: int, key, next_key) -> bool:
    """The key after `key` (the first one when key is None) into next_key;
    False at the end."""
    attr = _MapElem(map_fd=fd, key=0 if key is None else ctypes.addressof(key), value=ctypes.addressof(next_key))
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, attr)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_delete(fd: int, key) -> bool:
    """Delete one entry; False if it was not there."""
    attr = _MapElem(map_fd=fd, key=ctypes.addressof(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def lookup_batch(fd: int, key_size: int, value_size: int, max_entries: int, chunk: int = 65536):
    """Read a whole hash map with BPF_MAP_LOOKUP_BATCH, straight into numpy
    buffers (no per-entry Python work, no copies).

    Returns (keys: numpy uint8 array, values: numpy uint8 array, count).
    Values of per-CPU maps are not supported here (tidegate only batch-reads
    the shared LRU)."""
    import numpy as np  # here: the compile child uses this module, and starts without numpy

    n_alloc = max(1, max_entries)
    keys = np.empty(key_size * n_alloc, dtype=np.uint8)
    values = np.empty(value_size * n_alloc, dtype=np.uint8)
    kptr, vptr = keys.ctypes.data, values.ctypes.data
    total = 0
    for n in _lookup_batches(fd, key_size, max_entries, chunk,
                             lambda done: (kptr + done * key_size, vptr + done * value_size)):
        total += n
    return keys[: total * key_size], values[: total * value_size], total


def lookup_batch_chunks(fd: int, key_size: int, value_size: int, max_entries: int, chunk: int = 65536):
    """lookup_batch, one chunk at a time into the same two buffers: yields
    (keys, values, count) views that the next chunk overwrites, so a reader
    that keeps a few columns of a large map never holds all of it."""
    import numpy as np  # as in lookup_batch

    keys = np.empty(key_size * max(1, min(chunk, max_entries)), dtype=np.uint8)
    values = np.empty(value_size * max(1, min(chunk, max_entries)), dtype=np.uint8)
    kptr, vptr = keys.ctypes.data, values.ctypes.data
    for n in _lookup_batches(fd, key_size, max_entries, chunk, lambda done: (kptr, vptr)):
        yield keys[: n * key_size], values[: n * value_size], n


def _lookup_batches(fd: int, key_size: int, max_entries: int, chunk: int, where):
    """BPF_MAP_LOOKUP_BATCH calls until the map is read or max_entries are:
    where(entries read so far) -> (keys address, values address) for the
    next call's entries; yields each call's count."""
    token_in = ctypes.create_string_buffer(max(8, key_size))
    token_out = ctypes.create_string_buffer(max(8, key_size))
    total = 0
    first = True
    while total < max_entries:
        kaddr, vaddr = where(total)
        attr = _Batch(
            in_batch=0 if first else ctypes.addressof(token_in),
            out_batch=ctypes.addressof(token_out),
            keys=kaddr,
            values=vaddr,
            count=min(chunk, max_entries - total),
            map_fd=fd,
        )
        done = False
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        except BpfError as e:
            if e.errno != errno.ENOENT:
                raise
            done = True
        total += attr.count
        if attr.count:
            yield attr.count
        if done or attr.count == 0:
            break
        ctypes.memmove(token_in, token_out, ctypes.sizeof(token_out))
        first = False


class GraceWaiter:
    """Wait for an RCU grace period from user space.

    The kernel waits for all running BPF programs (synchronize_rcu) after an
    update of an array-of-maps, so that user space knows every program now
    sees the new value. tidegate updates a private one-slot array-of-maps to
    get exactly that wait after flipping the rule-set selector: when it
    returns, no packet can still be reading the slot that was just retired.
    """

    def __init__(self) -> None:
        self._inner = _bpf(
            BPF_MAP_CREATE,
            _MapCreate(map_type=BPF_MAP_TYPE_ARRAY, key_size=4, value_size=4, max_entries=1, map_name=b"tg_grace_in"),
        )
        self._outer = _bpf(
            BPF_MAP_CREATE,
            _MapCreate(
                map_type=BPF_MAP_TYPE_ARRAY_OF_MAPS,
                key_size=4,
                value_size=4,
                max_entries=1,
                inner_map_fd=self._inner,
                map_name=b"tg_grace",
            ),
        )

    def wait(self) -> None:
        key = ctypes.c_uint32(0)
        value = ctypes.c_uint32(self._inner)
        map_update(self._outer, key, value)

    def close(self) -> None:
        for fd in (self._outer, self._inner):
            try:
                os.close(fd)
            except OSError:
                pass


BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

def _batch_write(cmd: int, attr: _Batch) -> None:
    failing = fault_injection.batch_write_fails()
    if failing is not None:
        attr.count //= 2
        if attr.count:
            _bpf(cmd, attr)
        raise BpfError(errno.EIO, f"bpf cmd {cmd}: injected failure after {attr.count} entries "
                       f"({fault_injection.FAIL_BATCH_WRITE}, write {failing})")  # fmt: skip
    _bpf(cmd, attr)


def update_batch(fd: int, keys: bytes, values: bytes, count: int, chunk: int = 65536) -> int:
    """Write `count` entries with BPF_MAP_UPDATE_BATCH (benchmarks and tests
    that need a map full of sources without sending a million packets)."""
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    ksz = len(keys) // max(1, count)
    vsz = len(values) // max(1, count)
    done = 0
    while done < count:
        n = min(chunk, count - done)
        attr = _Batch(keys=ctypes.addressof(kbuf) + done * ksz, values=ctypes.addressof(vbuf) + done * vsz,
                      count=n, map_fd=fd)  # fmt: skip
        _batch_write(BPF_MAP_UPDATE_BATCH, attr)
        done += attr.count
    return done


def delete_batch(fd: int, keys: bytes, count: int, chunk: int = 65536) -> int:
    """Delete `count` entries with BPF_MAP_DELETE_BATCH (a missing key fails
    the call with ENOENT: callers delete only what they know is there)."""
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    ksz = len(keys) // max(1, count)
    done = 0
    while done < count:
        n = min(chunk, count - done)
        attr = _Batch(keys=ctypes.addressof(kbuf) + done * ksz, count=n, map_fd=fd)
        _batch_write(BPF_MAP_DELETE_BATCH, attr)
        done += attr.count
    return done
