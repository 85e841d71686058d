"""A process that ends with the one that started it (PR_SET_PDEATHSIG).

The kernel sends the signal when the *thread* that started the process
ends, so a caller starts it from a thread that outlives it (the main
thread, or one that waits for it). Used by the lab's agent (called between
fork and exec: prctl is looked up here, at import) and by a first start's
compile child (called in the child itself)."""

from __future__ import annotations

import ctypes

_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def end_with_parent(sig: int) -> bool:
    """Ask for `sig` when this process's parent thread ends; False if refused."""
    return _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
