"""Which slice of every weight, head and vocabulary row a tensor-parallel rank owns.

Pure arithmetic over the checkpoint's shape (no torch.distributed), so the engine validates a
layout before it starts any rank and every rank derives the same answer independently.

Megatron-style split of one decoder layer over ``world_size`` ranks:

* query heads: rank r owns the contiguous heads ``[r * H/W, (r+1) * H/W)``; H must divide by W.
* KV heads: when K >= W each rank owns ``K/W`` contiguous KV heads (K must divide by W); when
  W > K (W must be a multiple of K), KV head ``r // (W/K)`` is replicated on ``W/K`` ranks. Either
  way a rank's KV heads are exactly the ones its query heads attend with (GQA group = H/K query
  heads per KV head), so attention needs no communication and each rank's KV pool holds only its
  own heads.
* MLP: rank r owns intermediate columns ``[r * I/W, (r+1) * I/W)`` of gate and up (column
  parallel) and the same rows of down's input (row parallel, followed by an all-reduce).
* vocabulary: padded to ``W * ceil(V / W)`` rows; rank r owns ``[r * V/W, (r+1) * V/W)`` of the
  padded range; rows at or beyond V hold zeros and their logits are cut off after the gather.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLayout:
    """What rank ``rank`` of ``world_size`` owns of a model with the given shape."""

    rank: int
    world_size: int
    head_dim: int
    num_heads: int            # query heads on this rank
    num_kv_heads: int         # KV heads on this rank (1 when replicated)
    q_head_start: int         # first query head of this rank in the checkpoint
    kv_head_start: int        # first KV head of this rank in the checkpoint
    intermediate_size: int    # MLP columns on this rank
    intermediate_start: int
    vocab_size: int           # the real vocabulary (logits are cut to it)
    vocab_per_rank: int       # rows of the embedding / LM head shard, padding included
    kv_replicas: int          # how many ranks hold each KV head (1 when KV heads are split)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def padded_vocab_size(self) -> int:
        return self.world_size * self.vocab_per_rank

    @property
    def num_real_vocab_rows(self) -> int:
        """Rows of this rank's vocabulary shard that are real tokens (the rest is padding)."""
        return max(0, min(self.vocab_size - self.vocab_start, self.vocab_per_rank))

    def q_rows(self) -> slice:
        """Rows of q_proj (and of o_proj's input columns) that belong to this rank."""
        return slice(self.q_head_start * self.head_dim, (self.q_head_start + self.num_heads) * self.head_dim)

    def kv_rows(self) -> slice:
        """Rows of k_proj / v_proj that belong to this rank."""
        return slice(self.kv_head_start * self.head_dim,
                     (self.kv_head_start + self.num_kv_heads) * self.head_dim)

    def intermediate_rows(self) -> slice:
        return slice(self.intermediate_start, self.intermediate_start + self.intermediate_size)

    def vocab_rows(self) -> slice:
        """Checkpoint rows of this rank's vocabulary shard (shorter than the shard on the last rank
        when the vocabulary was padded)."""
        return slice(self.vocab_start, self.vocab_start + self.num_real_vocab_rows)


def shard_layout(num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int, vocab_size: int,
                 world_size: int, rank: int) -> ShardLayout:
    """The layout of ``rank``; ValueError (naming the numbers) for a shape that cannot be split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of size {world_size}")
    if num_heads % world_size:
        raise ValueError(f"the model's {num_heads} attention heads do not divide by tensor_parallel_size "
                         f"{world_size}; choose a size that divides {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    if num_kv_heads >= world_size:
        if num_kv_heads % world_size:
            raise ValueError(f"the model's {num_kv_heads} KV heads do not divide by tensor_parallel_size "
                             f"{world_size}")
        kv_per_rank, replicas, kv_start = num_kv_heads // world_size, 1, rank * (num_kv_heads // world_size)
    else:
        if world_size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {world_size} exceeds the model's {num_kv_heads} KV heads "
                             f"and is not a multiple of it, so KV heads cannot be replicated evenly")
        replicas = world_size // num_kv_heads
        kv_per_rank, kv_start = 1, rank // replicas
    if intermediate_size % world_size:
        raise ValueError(f"the model's intermediate_size {intermediate_size} does not divide by "
                         f"tensor_parallel_size {world_size}")
    heads_per_rank = num_heads // world_size
    inter_per_rank = intermediate_size // world_size
    return ShardLayout(
        rank=rank, world_size=world_size, head_dim=head_dim,
        num_heads=heads_per_rank, num_kv_heads=kv_per_rank,
        q_head_start=rank * heads_per_rank, kv_head_start=kv_start,
        intermediate_size=inter_per_rank, intermediate_start=rank * inter_per_rank,
        vocab_size=vocab_size, vocab_per_rank=-(-vocab_size // world_size), kv_replicas=replicas,
    )


def layout_for(args, world_size: int, rank: int) -> ShardLayout:
    """``shard_layout`` for a ``paged.models.llama.ModelArgs``."""
    return shard_layout(args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size,
                        args.vocab_size, world_size, rank)


def local_model_args(args, layout: ShardLayout):
    """ModelArgs sized for one rank: building the model from them gives every attention and MLP
    linear its per-rank shape, and a KV pool from them holds only the rank's KV heads."""
    return dataclasses.replace(args, num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads,
                               intermediate_size=layout.intermediate_size)


def kv_bytes_per_token_per_rank(args, world_size: int) -> int:
    """Bytes of K and V per token (per byte of element size) in one rank's pool: what sizes a
    rank's KV blocks (every rank holds as many KV heads as rank 0)."""
    return local_model_args(args, layout_for(args, world_size, 0)).kv_bytes_per_token
