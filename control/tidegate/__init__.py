"""tidegate: an XDP edge filter with a safe-change control plane."""

import os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per core at import, and each spins for a
# while waiting for matrix work tidegate never gives it: about 140 ms of
# CPU per process on 2 cores, at every agent start (taken from the compile
# child beside it) and every CLI command. tidegate does no linear algebra.
# Set before anything imports numpy; a value the operator set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
