"""tidegate: an XDP edge filter with a safe-change control plane."""

__version__ = "0.1.0"
