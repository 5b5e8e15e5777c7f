"""The error a tensor-parallel worker group raises (pure Python, so the engine can catch it without
importing any of the group's machinery on the single-device path)."""
from __future__ import annotations

from paged.errors import ExecutorFailedError


class WorkerGroupError(ExecutorFailedError):
    """The tensor-parallel worker group failed; the KV cache on the ranks is gone.

    ``rank`` is the failing rank when one is known. After this, ``execute`` keeps raising until
    ``restart()`` succeeds."""

    subject = "the tensor-parallel worker group"

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank
