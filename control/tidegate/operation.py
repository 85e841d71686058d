"""What every change names and what it returns: who asks (`Caller`), what
came of it (`ApplyOutcome`), or why it was refused (`OperationError`, whose
`code` the gRPC adapter turns into a status). A leaf module: the change
service, its clients (gRPC, reload, block list, fleet) and the guard that
rolls back through it all use these without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from tidegate.ruleset.model import FieldError


class OperationError(Exception):
    """A refused or failed operation; `code` is the gRPC status code name."""

    def __init__(self, code: str, message: str, violations: list[FieldError] | None = None,
                 source: str = "", estimate=None):  # fmt: skip
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations or []
        self.source = source
        self.estimate = estimate


@dataclass
class Caller:
    author: str
    peer: str
    role: str = "admin"


@dataclass
class ApplyOutcome:
    version: int
    shadow: bool = False
    estimate: object = None
    guarded: bool = False
    guard_outcome: str = ""
    guard_cause: str = ""
    rolled_back_to: int = 0
