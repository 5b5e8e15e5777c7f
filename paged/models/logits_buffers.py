"""Memory for a step's logits, reused from step to step.

A step's logits are [sampling rows, vocab]: at a 151,936-token vocabulary and 200 rows, 121 MB in
fp32 (plus 61 MB of bf16 LM-head output in a bf16 model). glibc serves an allocation that large
with a fresh mmap (it is above its 32 MB ceiling for heap allocations) and returns it to the OS on
free, so every step touched every page anew: ~30 k minor page faults per 121 MB, 27 ms of a
~130 ms step on the 2-core Zen 4 host, always on a thread other than the main one (the engine
thread of a server) and on the main thread whenever its heap had no such free run. Buffers kept
here are faulted in once.

Invariant: a view handed out is valid until the next request for the same dtype; the engine
consumes a step's logits before it runs the next step.
"""
from __future__ import annotations

import torch


class LogitsBuffers:
    """Per-dtype [capacity, vocab] buffers for batches of at most ``max_rows`` rows (the engine's
    ``max_num_seqs``: one logits row per scheduled sequence). Larger batches (scoring windows)
    get ``None``: the caller allocates, as without buffers."""

    def __init__(self, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def rows(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """A [rows, vocab] view of this dtype's buffer, grown (to twice its rows, at most
        ``max_rows``) when it is too small; None for more than ``max_rows`` rows."""
        if rows > self.max_rows:
            return None
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab or buffer.device != torch.device(device):
            held = 0 if buffer is None else buffer.shape[0]
            capacity = min(self.max_rows, max(rows, 2 * held))
            self._buffers[dtype] = None  # let the old one go before the new one is allocated
            buffer = self._buffers[dtype] = torch.empty(capacity, vocab, dtype=dtype, device=device)
        return buffer[:rows]

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The dtypes it holds a buffer for now."""
        return {dtype for dtype, buffer in self._buffers.items() if buffer is not None}

    @property
    def num_bytes(self) -> int:
        """Bytes held now."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)
