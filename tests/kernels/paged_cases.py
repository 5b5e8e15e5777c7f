"""Builders for paged-attention test batches (shared by the kernel test files).

A batch is a list of sequences, each with ``q_len`` new tokens at the end of ``kv_len`` cached
tokens. Physical blocks are handed out in a seeded random order (block tables are shuffled and
non-contiguous), the pool has spare blocks, and the table is wider than needed. Slots no sequence
owns hold finite garbage, or NaN with ``poison=True`` (any read of them then shows in the output).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# Per-dtype tolerance (atol, rtol) of an implementation against the float32 reference, which is
# rounded to the same dtype. fp32: online softmax + exp2 vs torch.softmax, ~1e-6 seen.
# fp16: output rounding (2^-11) plus P rounded to fp16 before P@V. bf16: output rounding
# (2^-8) plus, on GPUs, P rounded to bf16 before P@V.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass
class PagedBatch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def args(self):
        return (self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale)

    def with_int64_indices(self) -> "PagedBatch":
        """The same batch with its index tensors (block tables, lengths, query starts) as int64."""
        return dataclasses.replace(self, block_tables=self.block_tables.long(), seq_lens=self.seq_lens.long(),
                                   query_start_loc=self.query_start_loc.long())


def make_batch(q_lens, kv_lens, *, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
               dtype=torch.float32, seed=0, poison=False, spare_blocks=2, table_slack=1,
               strided_query=False) -> PagedBatch:
    assert len(q_lens) == len(kv_lens)
    assert all(0 <= q <= kv for q, kv in zip(q_lens, kv_lens))
    g = torch.Generator().manual_seed(seed)
    needed = [-(-kv // block_size) for kv in kv_lens]
    num_blocks = sum(needed) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=g)
    value_cache = torch.randn(shape, generator=g)

    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed, default=0) + table_slack
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    tables = torch.empty(len(kv_lens), max(width, 1), dtype=torch.int32)
    spare = order[sum(needed):] or [0]
    next_block = 0
    for seq, kv_len in enumerate(kv_lens):
        blocks = order[next_block:next_block + needed[seq]]
        next_block += needed[seq]
        for i, block in enumerate(blocks):
            owned[block, :min(block_size, kv_len - i * block_size)] = True
        # Entries past the sequence's blocks point at a spare block (stale contents).
        tables[seq] = torch.tensor(blocks + [spare[0]] * (tables.shape[1] - len(blocks)), dtype=torch.int32)
    if poison:
        key_cache[~owned] = float("nan")
        value_cache[~owned] = float("nan")

    num_tokens = sum(q_lens)
    if strided_query:  # a view into a fused QKV projection: token stride > num_heads * head_dim
        fused = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g)
        query = fused.to(dtype)[:, :num_heads]
    else:
        query = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return PagedBatch(
        query=query,
        key_cache=key_cache.to(dtype),
        value_cache=value_cache.to(dtype),
        block_tables=tables,
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        scale=1.0 / math.sqrt(head_dim),
    )


def assert_close_to_reference(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


# Correctness cases shared by the Triton and the torch-implementation tests. Each is
# (q_lens, kv_lens, make_batch options); the names say which situation they stand for.
ATTENTION_CASES = {
    # kv_len 1, block-aligned (16) and unaligned (45) contexts, GQA ratio 4
    "decode_kv1_aligned_unaligned_gqa4": ([1, 1, 1], [1, 16, 45], dict(num_heads=8, num_kv_heads=2)),
    # whole prompts, nothing cached, block-aligned and unaligned, plain MHA (ratio 1), head_dim 128
    "prefill_from_scratch_mha_d128": ([16, 33], [16, 33], dict(num_heads=4, num_kv_heads=4, head_dim=128)),
    # a later chunk of a long prompt: 20 new tokens on 50 earlier ones, block size 32
    "chunked_prefill_bs32": ([20], [70], dict(block_size=32)),
    # prompts whose first blocks came from the prefix cache
    "prefill_on_cached_prefix": ([5, 12], [37, 44], dict()),
    # decode, short and long prefill in one batch, GQA ratio 8 (MQA-like: one KV head)
    "mixed_batch_gqa8": ([1, 7, 40, 1], [1, 32, 64, 50], dict(num_heads=8, num_kv_heads=1)),
    # one token per block
    "block_size_1": ([1, 6], [9, 6], dict(block_size=1)),
    # blocks smaller than a kernel's key tile: tiles span blocks, and a chunk starts mid-block
    "block_size_8_gqa4": ([1, 5, 1], [45, 27, 8], dict(block_size=8, num_heads=8, num_kv_heads=2)),
    "block_size_4_chunk": ([3, 1], [29, 37], dict(block_size=4)),
    # non power-of-two head dims (padded inside the kernel)
    "head_dim_80": ([1, 9], [23, 40], dict(head_dim=80)),
    "head_dim_96_bs32": ([3, 1], [35, 64], dict(head_dim=96, block_size=32)),
    # query as a view of a fused QKV projection (token stride != num_heads * head_dim)
    "strided_query": ([1, 6], [20, 6], dict(strided_query=True)),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CacheWrite:
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor

    def args(self):
        return (self.key, self.value, self.key_cache, self.value_cache, self.slot_mapping)

    def clone_caches(self) -> "CacheWrite":
        return CacheWrite(self.key, self.value, self.key_cache.clone(), self.value_cache.clone(),
                          self.slot_mapping)


def make_cache_write(slots, *, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=64,
                     dtype=torch.float32, cache_dtype=None, seed=0, strided=False) -> CacheWrite:
    """New K/V for ``len(slots)`` tokens and caches already holding random data."""
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = len(slots)
    if strided:  # views of one fused [num_tokens, 2 * num_kv_heads, head_dim] KV projection
        fused = torch.randn(num_tokens, 2 * num_kv_heads, head_dim, generator=g).to(dtype)
        key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads:]
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    return CacheWrite(key, value,
                      torch.randn(shape, generator=g).to(cache_dtype),
                      torch.randn(shape, generator=g).to(cache_dtype),
                      torch.tensor(slots, dtype=torch.int64))
