"""The error a tensor-parallel worker group raises (pure Python, so the engine can catch it without
importing any of the group's machinery on the single-device path)."""
from __future__ import annotations


class WorkerGroupError(RuntimeError):
    """The tensor-parallel worker group failed; the KV cache on the ranks is gone.

    ``rank`` is the failing rank when one is known. After this, ``execute`` keeps raising until
    ``restart()`` succeeds."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank

    @property
    def summary(self) -> str:
        """The first line of the message (a rank's traceback follows it), for request errors."""
        return str(self).split("\n", 1)[0].rstrip(":")
