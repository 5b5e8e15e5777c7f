"""Megatron-style tensor-parallel layers.

Column-parallel linears (fused QKV, fused gate/up) need no layer of their own: built with a
rank's local sizes (``partition.local_model_args``), the ordinary linear *is* the column shard,
and its output feeds this rank's heads or MLP columns directly. What needs communication:

* ``RowParallelLinear``: o_proj and down_proj take this rank's slice of their input and produce a
  partial sum of the full output; an all-reduce completes it (every rank then holds the same
  hidden state).
* ``VocabParallelEmbedding``: each rank looks up the tokens in its vocabulary range, zeros for the
  rest, and an all-reduce assembles the embeddings (exactly: one rank contributes each row).
* ``ParallelLMHead``: each rank scores its vocabulary shard; the shards are assembled where
  sampling happens (the engine), so the full logits never cross the process group.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from paged_kernels.linear import bind_linear
from paged.parallel.context import ParallelContext, all_reduce
from paged.parallel.partition import ShardLayout


class RowParallelLinear(nn.Module):
    """Wraps a linear that holds this rank's input columns; its output is summed over the ranks.

    The wrapped module stays an ordinary linear (so a faster linear implementation can replace
    it); a bias, if any, would be added once after the sum, so row-parallel layers take none.
    """

    def __init__(self, linear: nn.Module, ctx: ParallelContext):
        super().__init__()
        if getattr(linear, "bias", None) is not None:
            raise ValueError("a row-parallel linear takes no bias (it would be summed world_size times)")
        self.linear = linear
        self.ctx = ctx

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.linear(x), self.ctx)

    def bind(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for inputs of ``rows`` rows as one function of x (see ``paged_kernels.linear.bind_linear``)."""
        linear, ctx = bind_linear(self.linear, rows), self.ctx
        return lambda x: all_reduce(linear(x), ctx)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[layout.vocab_start, layout.vocab_start + layout.vocab_per_rank)`` of the embedding."""

    def __init__(self, layout: ShardLayout, hidden_size: int, ctx: ParallelContext):
        super().__init__()
        self.layout = layout
        self.ctx = ctx
        self.weight = nn.Parameter(torch.empty(layout.vocab_per_rank, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.ctx.is_parallel:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.layout.vocab_start
        outside = (local < 0) | (local >= self.layout.vocab_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return all_reduce(out, self.ctx)


class ParallelLMHead(nn.Module):
    """Scores this rank's vocabulary shard: ``[tokens, layout.vocab_per_rank]``.

    Columns at or beyond ``layout.num_real_vocab_rows`` are padding (zero weights) and must be
    cut off when the shards are put together (``layout.vocab_size`` columns in all).
    """

    def __init__(self, layout: ShardLayout, hidden_size: int, tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.layout = layout
        self.weight = tied.weight if tied is not None else nn.Parameter(
            torch.empty(layout.vocab_per_rank, hidden_size))

    @property
    def out_features(self) -> int:
        return self.layout.vocab_per_rank

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def forward_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``self(hidden)`` written into ``out`` [rows, vocab_per_rank] (hidden's dtype), which it
        returns: memory the caller reuses from step to step."""
        return torch.mm(hidden, self.weight.t(), out=out)
