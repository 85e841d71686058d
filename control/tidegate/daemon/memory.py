"""The agent's resident memory: what the C library keeps of what it freed.

Every sample interval the sampler and its listeners (insight, reviews)
make and drop arrays of up to one row per tracked source, tens of MB with
a 1M-entry map. With glibc's defaults the agent kept most of its peak
resident: ~300 MB where ~70 MB are in use. Two settings fix that:

- a fixed mmap threshold (map_large_buffers): glibc raises its threshold
  to the largest block freed (up to 32 MB), after which such arrays come
  from the heap, and freed heap memory below its top stays resident;
- malloc_trim after each sample (give_back_freed_memory): numpy's unique()
  builds a hash set of small nodes on the heap (~20 MB per million keys),
  and the pages those leave free are returned to the kernel (~3 ms).

Both are glibc's; with another C library they do nothing.

And Python's collector (settle_collector): a full collection walks every
live object, the agent's modules included, and an apply of a 10,000-CIDR
set allocates enough to set one off every other apply (~40 ms each, most
of an apply's p99). What start-up made is moved out of its sight, and it
runs after 10,000 allocations rather than 700.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger("tidegate.daemon.memory")

M_MMAP_THRESHOLD = -3  # mallopt(3)

try:
    _LIBC = ctypes.CDLL(None)
    _MALLOPT, _MALLOC_TRIM = _LIBC.mallopt, _LIBC.malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOPT = _MALLOC_TRIM = None


def map_large_buffers(threshold: int = 1 << 20) -> None:
    """Allocations of `threshold` bytes and more are mapped and unmapped by
    glibc itself, so a freed one leaves resident memory at once (a fixed
    threshold turns glibc's raising of it off)."""
    if _MALLOPT is not None and not _MALLOPT(M_MMAP_THRESHOLD, threshold):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the kernel (a sampler listener)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def settle_collector(first_threshold: int = 10_000) -> None:
    """Once started: what start-up made (modules, the agent's parts) is
    never garbage; collections run less often. (No collection first: it
    would hold the first calls the API answers.)"""
    gc.freeze()
    gc.set_threshold(first_threshold, *gc.get_threshold()[1:])
