"""Plain-torch reference for the kernels contract, used by the tests.

Deliberately slow and simple: one Python loop per token / per sequence, the sequence's blocks
gathered into dense K/V (or its slot's first tokens, for the contiguous layout), a full masked
softmax in float32. It is the definition the Triton and
the fast torch implementations are checked against, not a serving path.
"""
from __future__ import annotations

import torch


def reference_write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Token i goes to block slot // block_size, offset slot % block_size; slot -1 is skipped."""
    block_size = key_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        key_cache[block, offset] = key[i].to(key_cache.dtype)
        value_cache[block, offset] = value[i].to(value_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The first kv_len tokens of one sequence as dense [kv_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-kv_len // block_size)
    blocks = [cache[int(b)] for b in block_table[:num_blocks].tolist()]
    if not blocks:
        return cache.new_zeros((0,) + tuple(cache.shape[2:]))
    return torch.cat(blocks, dim=0)[:kv_len]


def reference_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's q_len new tokens (its last q_len positions).

    Query head h reads KV head h // (num_heads // num_kv_heads). Computed in float32,
    returned in query.dtype.
    """
    def sequence_kv(seq: int, kv_len: int):
        return (gather_kv(key_cache, block_tables[seq], kv_len), gather_kv(value_cache, block_tables[seq], kv_len))

    return _reference_attention(query, sequence_kv, seq_lens, query_start_loc, scale)


def reference_contiguous_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   seq_slots: torch.Tensor, seq_lens: torch.Tensor,
                                   query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """``reference_paged_attention`` over caches [num_slots, max_model_len, num_kv_heads, head_dim]:
    sequence i's keys are ``key_cache[seq_slots[i], :seq_lens[i]]``."""
    slots = seq_slots.tolist()

    def sequence_kv(seq: int, kv_len: int):
        return key_cache[slots[seq], :kv_len], value_cache[slots[seq], :kv_len]

    return _reference_attention(query, sequence_kv, seq_lens, query_start_loc, scale)


def _reference_attention(query: torch.Tensor, sequence_kv, seq_lens: torch.Tensor,
                         query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention both layouts share; ``sequence_kv(seq, kv_len)`` gives that sequence's dense
    K and V [kv_len, num_kv_heads, head_dim]."""
    num_heads = query.shape[1]
    out = torch.zeros_like(query)
    starts = query_start_loc.tolist()
    for seq, kv_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys, values = sequence_kv(seq, kv_len)
        group = num_heads // keys.shape[1]
        q = query[q_start:q_end].float()                                        # [Q, H, D]
        k = keys.float().repeat_interleave(group, dim=1)                        # [L, H, D]
        v = values.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale                     # [H, Q, L]
        q_pos = torch.arange(kv_len - q_len, kv_len)
        k_pos = torch.arange(kv_len)
        allowed = k_pos[None, :] <= q_pos[:, None]                              # [Q, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
