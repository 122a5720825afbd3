"""What a run folder refuses, as exceptions (all ``ValueError`` s with one clear line)."""
from __future__ import annotations

__all__ = ["RunError", "RunLocked", "SettingsMismatch", "UnfinishedRun"]


class RunError(ValueError):
    """A run folder's contents forbid what was asked (the message says what to do)."""


class RunLocked(RunError):
    """Another process is writing this run; :attr:`pid` is its process id (None if unknown)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class SettingsMismatch(RunError):
    """The folder holds a run (finished or checkpointed) with another record."""


class UnfinishedRun(RunError):
    """The folder holds a checkpoint and ``resume`` was not asked for."""
