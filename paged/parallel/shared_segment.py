"""Shared memory between the engine and the ranks on its host.

A segment is an anonymous ``memfd`` of the engine process: no file to clean up, gone when the
last mapping is, not bounded by the size of ``/dev/shm``. A rank maps it through
``/proc/<engine pid>/fd/<fd>``. The first 64 bytes hold a random nonce: a rank that finds another
value reached a same-numbered fd of some other process (a rank on another host, or in another PID
namespace) and must not use the segment.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

HEADER_BYTES = 64  # keeps the payload 64-byte aligned


@dataclass(frozen=True)
class SegmentInfo:
    """What a rank needs to map a segment (pickled into WorkerInit)."""
    pid: int
    fd: int
    nonce: int
    payload_bytes: int


class SharedSegment:
    def __init__(self, mapped: torch.Tensor, info: SegmentInfo, fd: int | None):
        self.info = info
        self.payload = mapped[HEADER_BYTES:]  # uint8; callers view it as what they store
        self._nonce = mapped[:8].view(torch.int64)
        self._fd = fd  # the creator's descriptor, held until every rank has mapped the segment

    @staticmethod
    def _map(path: str, info: SegmentInfo) -> torch.Tensor:
        return torch.from_file(path, shared=True, size=HEADER_BYTES + info.payload_bytes, dtype=torch.uint8)

    @classmethod
    def create(cls, payload_bytes: int, name: str) -> "SharedSegment":
        fd = os.memfd_create(name)
        info = SegmentInfo(pid=os.getpid(), fd=fd, nonce=random.SystemRandom().getrandbits(62),
                           payload_bytes=payload_bytes)
        os.ftruncate(fd, HEADER_BYTES + payload_bytes)
        segment = cls(cls._map(f"/proc/self/fd/{fd}", info), info, fd)
        segment._nonce[0] = info.nonce
        return segment

    @classmethod
    def attach(cls, info: SegmentInfo) -> "SharedSegment | None":
        """This process's mapping of the engine's segment, or None when it cannot reach it."""
        try:
            mapped = cls._map(f"/proc/{info.pid}/fd/{info.fd}", info)
        except (OSError, RuntimeError):
            return None
        segment = cls(mapped, info, None)
        return segment if int(segment._nonce[0]) == info.nonce else None

    def release_fd(self) -> None:
        """Close the creator's descriptor once every rank has mapped the segment (mappings stay)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
