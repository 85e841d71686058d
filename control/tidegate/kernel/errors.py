"""What the kernel layer raises (tidegate.kernel.filter exports them)."""

from __future__ import annotations


class KernelError(Exception):
    """A kernel operation failed; the message says what and what to do."""


class InterfaceError(KernelError):
    """The interface does not exist or cannot take an XDP program."""


class NotAttachedError(KernelError):
    """The filter is not loaded/attached."""


class MapWriteError(KernelError):
    """Writing a rule set into the maps failed partway. The selection was not
    changed (packets still see the sets they saw), and what the written slot
    holds has been read back from the kernel, so the next write of that slot
    starts from what is really there."""
