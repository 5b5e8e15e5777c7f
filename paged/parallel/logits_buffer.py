"""The shared buffer the ranks on the engine's host write their logits shards into.

Layout: ``[max_rows, padded_vocab]`` fp32, row major. Rank r writes columns
``[r * vocab_per_rank, (r+1) * vocab_per_rank)`` of the step's first rows; once every rank said
``Done`` the engine samples from ``[:rows, :vocab_size]`` in place (valid until the next step). So
the vocabulary shards are gathered where sampling happens without a collective and without a
socket copy. A rank that cannot map the buffer (on another host) sends its shard over its
connection instead.
"""
from __future__ import annotations

import torch

from paged.parallel.shared_segment import SegmentInfo, SharedSegment


class LogitsBuffer:
    def __init__(self, segment: SharedSegment, max_rows: int, padded_vocab_size: int):
        self.segment = segment
        self.max_rows, self.padded_vocab_size = max_rows, padded_vocab_size
        self.logits = segment.payload.view(torch.float32).view(max_rows, padded_vocab_size)

    @classmethod
    def create(cls, max_rows: int, padded_vocab_size: int) -> "LogitsBuffer":
        segment = SharedSegment.create(4 * max_rows * padded_vocab_size, "paged-tp-logits")
        return cls(segment, max_rows, padded_vocab_size)

    @classmethod
    def attach(cls, info: SegmentInfo, max_rows: int, padded_vocab_size: int) -> "LogitsBuffer | None":
        segment = SharedSegment.attach(info)
        return None if segment is None else cls(segment, max_rows, padded_vocab_size)

    def write_shard(self, shard: torch.Tensor, column_start: int) -> None:
        rows, cols = shard.shape
        self.logits[:rows, column_start:column_start + cols].copy_(shard)
