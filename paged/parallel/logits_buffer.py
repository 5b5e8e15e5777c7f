"""A shared-memory buffer the ranks on the engine's host write their logits shards into.

Layout: a 64-byte header (a random nonce) and then ``[max_rows, padded_vocab]`` fp32, row major.
Rank r writes columns ``[r * vocab_per_rank, (r+1) * vocab_per_rank)`` of the step's first rows;
the engine copies out ``[:rows, :vocab_size]`` once every rank said ``Done``. So the vocabulary
shards are gathered where sampling happens without a collective and without a socket copy.

The memory is an anonymous ``memfd`` of the engine process (no file to clean up, not bounded by
the size of ``/dev/shm``). A rank maps it through ``/proc/<engine pid>/fd/<fd>``; the nonce proves
it reached the engine's buffer and not a same-numbered fd of another host's process, in which case
the rank falls back to sending its shard over the channel.
"""
from __future__ import annotations

import os
import random

import torch

from paged.parallel.protocol import LogitsBufferInfo

_HEADER_FLOATS = 16  # 64 bytes: keeps the logits 64-byte aligned


def _map(path: str, info: LogitsBufferInfo) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=_HEADER_FLOATS + info.max_rows * info.padded_vocab_size,
                           dtype=torch.float32)


class LogitsBuffer:
    def __init__(self, mapped: torch.Tensor, info: LogitsBufferInfo, fd: int | None):
        self.info = info
        self._header = mapped[:_HEADER_FLOATS]
        self.logits = mapped[_HEADER_FLOATS:].view(info.max_rows, info.padded_vocab_size)
        self._fd = fd  # held by the creator until every rank has mapped the buffer

    @classmethod
    def create(cls, max_rows: int, padded_vocab_size: int) -> "LogitsBuffer":
        """The engine's buffer; ``info`` tells ranks how to map it."""
        fd = os.memfd_create("paged-tp-logits")
        info = LogitsBufferInfo(pid=os.getpid(), fd=fd, nonce=random.SystemRandom().getrandbits(62),
                                max_rows=max_rows, padded_vocab_size=padded_vocab_size)
        os.ftruncate(fd, 4 * (_HEADER_FLOATS + max_rows * padded_vocab_size))
        buffer = cls(_map(f"/proc/self/fd/{fd}", info), info, fd)
        buffer._header[:2].view(torch.int64)[0] = info.nonce
        return buffer

    @classmethod
    def attach(cls, info: LogitsBufferInfo) -> "LogitsBuffer | None":
        """A rank's view of the engine's buffer, or None when this rank cannot reach it."""
        try:
            mapped = _map(f"/proc/{info.pid}/fd/{info.fd}", info)
        except (OSError, RuntimeError):
            return None
        buffer = cls(mapped, info, None)
        if int(buffer._header[:2].view(torch.int64)[0]) != info.nonce:
            return None
        return buffer

    def release_fd(self) -> None:
        """Close the creator's descriptor once every rank has mapped the buffer (the mapping stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write_shard(self, shard: torch.Tensor, column_start: int) -> None:
        rows, cols = shard.shape
        self.logits[:rows, column_start:column_start + cols].copy_(shard)

    def read(self, rows: int, vocab_size: int) -> torch.Tensor:
        """A fresh ``[rows, vocab_size]`` tensor: the buffer is overwritten by the next step."""
        return self.logits[:rows, :vocab_size].clone()
