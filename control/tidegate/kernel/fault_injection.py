"""Test hooks of the kernel layer, all in one place.

Tests set these in a real agent's environment to make the kernel layer
fail the way a real kernel can, where no real kernel fails on demand:

- TIDEGATE_FAIL_BATCH_WRITE=N[,M...]: this process's Nth (and Mth...)
  batched map write (an update or a delete, counted per bpf(2) call)
  writes the first half of its entries and then fails with EIO, like a
  write that fails partway through a batch (bpfsys.update_batch and
  delete_batch ask `batch_write_fails`). Unset, it costs one integer
  comparison per batch.

(TIDEGATE_BPF_DIR, which points the loader at another copy of bpf/, is a
setting tests also use: see loader.bpf_source_dir.)
"""

from __future__ import annotations

import os

FAIL_BATCH_WRITE = "TIDEGATE_FAIL_BATCH_WRITE"

_fail_batch_writes_at = {int(n) for n in (os.environ.get(FAIL_BATCH_WRITE) or "").split(",") if n.strip()}
_batch_writes = 0


def batch_write_fails() -> int | None:
    """Count one batched map write; its number when it is to fail, else None."""
    global _batch_writes
    _batch_writes += 1
    return _batch_writes if _batch_writes in _fail_batch_writes_at else None
