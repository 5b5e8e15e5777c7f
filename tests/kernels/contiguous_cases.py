"""Builders for contiguous-layout attention batches (shared by the kernel test files).

A contiguous cache is [num_slots, max_model_len, num_kv_heads, head_dim]; sequence i owns slot
``seq_slots[i]`` (slots handed out in a seeded random order, with spare slots) and its keys
0..kv_len-1 lie at the start of it. With ``poison=True`` everything no sequence owns (the rest of
each slot, the spare slots, the padding between slots) is NaN, so any read past a sequence's end
shows in the output. ``padded=True`` builds the caches as strided views whose slots sit further
apart than max_model_len tokens, as slots padded to whole memory pages do in paged/virtual_kv.py.
``to_paged`` copies the same contents into a paged cache, so both layouts can be run on one batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ContiguousBatch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    seq_slots: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def args(self):
        return (self.query, self.key_cache, self.value_cache, self.seq_slots, self.seq_lens,
                self.query_start_loc, self.scale)


def make_contiguous_batch(q_lens, kv_lens, *, num_heads=4, num_kv_heads=2, head_dim=64, max_model_len=None,
                          dtype=torch.float32, seed=0, poison=False, spare_slots=2, padded=False,
                          strided_query=False) -> ContiguousBatch:
    assert len(q_lens) == len(kv_lens)
    assert all(0 <= q <= kv for q, kv in zip(q_lens, kv_lens))
    g = torch.Generator().manual_seed(seed)
    max_model_len = max_model_len or max(kv_lens, default=1) + 3
    num_slots = len(kv_lens) + spare_slots
    stored_len = max_model_len + (5 if padded else 0)  # padding tokens between slots
    shape = (num_slots, stored_len, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=g)
    value_cache = torch.randn(shape, generator=g)
    slots = torch.randperm(num_slots, generator=g)[:len(kv_lens)].tolist()
    if poison:
        owned = torch.zeros(num_slots, stored_len, dtype=torch.bool)
        for slot, kv_len in zip(slots, kv_lens):
            owned[slot, :kv_len] = True
        key_cache[~owned] = float("nan")
        value_cache[~owned] = float("nan")
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    if padded:
        key_cache, value_cache = key_cache[:, :max_model_len], value_cache[:, :max_model_len]

    num_tokens = sum(q_lens)
    if strided_query:  # a view into a fused QKV projection
        fused = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g)
        query = fused.to(dtype)[:, :num_heads]
    else:
        query = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return ContiguousBatch(query=query, key_cache=key_cache, value_cache=value_cache,
                           seq_slots=torch.tensor(slots, dtype=torch.int32),
                           seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
                           query_start_loc=torch.tensor(starts, dtype=torch.int32),
                           scale=1.0 / math.sqrt(head_dim))


def to_paged(batch: ContiguousBatch, block_size: int, seed: int = 0):
    """The same K/V contents as paged caches [num_blocks, block_size, num_kv_heads, head_dim] with
    shuffled block tables; returns (key_cache, value_cache, block_tables)."""
    g = torch.Generator().manual_seed(seed)
    kv_lens = batch.seq_lens.tolist()
    needed = [-(-kv // block_size) for kv in kv_lens]
    num_blocks = sum(needed) + 1
    order = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, block_size) + tuple(batch.key_cache.shape[2:])
    key_cache = torch.zeros(shape, dtype=batch.key_cache.dtype)
    value_cache = torch.zeros(shape, dtype=batch.value_cache.dtype)
    tables = torch.zeros(len(kv_lens), max(needed, default=1) or 1, dtype=torch.int32)
    taken = 0
    for seq, (slot, kv_len) in enumerate(zip(batch.seq_slots.tolist(), kv_lens)):
        for i in range(needed[seq]):
            block = order[taken]
            taken += 1
            tables[seq, i] = block
            first, last = i * block_size, min(kv_len, (i + 1) * block_size)
            key_cache[block, :last - first] = batch.key_cache[slot, first:last]
            value_cache[block, :last - first] = batch.value_cache[slot, first:last]
    return key_cache, value_cache, tables
