"""Paged KV-cache kernels: one contract, a Triton implementation (CUDA) and a torch one (CPU).

The backend is chosen by the tensors' device unless forced with ``backend="torch"|"triton"``.
The Triton modules are imported only when that backend is used, so CPU users never need a
working Triton. On CPU the torch backend runs compiled kernels (built on first use, see
``prepare_cpu_kernels``) where a C++ compiler is available, and plain torch ops otherwise.

Two KV layouts share the contract. Paged: caches [num_blocks, block_size, num_kv_heads, head_dim]
read through block tables (``write_kv_cache``, ``paged_attention``). Contiguous: caches
[num_slots, max_model_len, num_kv_heads, head_dim], sequence i's keys 0..seq_len-1 in slot
``seq_slots[i]`` (``write_kv_contiguous``, ``contiguous_attention``); a contiguous cache may be a
strided view (slots padded to whole memory pages, or interleaved with other layers).
"""
from __future__ import annotations

import torch

from paged_kernels import cpu_extension
from paged_kernels.torch_impl import torch_contiguous_attention, torch_paged_attention, torch_write_kv_cache

BACKENDS = ("torch", "triton")


def _pick_backend(tensor: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def write_kv_cache(key, value, key_cache, value_cache, slot_mapping, backend: str | None = None) -> None:
    """Scatter each token's K/V ([num_tokens, num_kv_heads, head_dim]) into the paged caches
    ([num_blocks, block_size, num_kv_heads, head_dim]) at ``slot_mapping`` (slot -1 = skip)."""
    if _pick_backend(key, backend) == "triton":
        from paged_kernels.triton_cache import triton_write_kv_cache

        triton_write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        torch_write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                    backend: str | None = None, workspace: dict | None = None) -> torch.Tensor:
    """Causal attention of packed queries over K/V read through block tables.

    query [num_tokens, num_heads, head_dim]; query_start_loc [num_seqs+1]; seq_lens [num_seqs]
    (kv length including the new tokens, which are each sequence's last q_len positions);
    block_tables [num_seqs, max_blocks_per_seq]. Returns [num_tokens, num_heads, head_dim].
    ``workspace``: optional dict passed unchanged to every layer of one step (same metadata);
    an implementation may keep per-step plans there. Never reuse it across steps.
    """
    if _pick_backend(query, backend) == "triton":
        from paged_kernels.triton_attention import triton_paged_attention

        return triton_paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                      query_start_loc, scale)
    return torch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                 query_start_loc, scale, workspace)


def contiguous_slot_mapping(seq_slots_per_token: torch.Tensor, positions: torch.Tensor,
                            max_model_len: int) -> torch.Tensor:
    """The flat index ``slot * max_model_len + position`` of each new token for
    ``write_kv_contiguous`` (-1 where the slot is negative: a padding token, skipped).

    Checked here, once per step, so a position past ``max_model_len`` never spills into the next
    slot: ValueError names the first offending token. On a GPU the check synchronizes, so build
    the mapping on the CPU and move it with the rest of the step's metadata.
    """
    if seq_slots_per_token.shape != positions.shape or seq_slots_per_token.dim() != 1:
        raise ValueError(f"seq_slots_per_token and positions must both be [num_tokens], got "
                         f"{tuple(seq_slots_per_token.shape)} and {tuple(positions.shape)}")
    slots, positions = seq_slots_per_token.long(), positions.long()
    written = slots >= 0
    bad = written & ((positions < 0) | (positions >= max_model_len))
    if bool(bad.any()):
        token = int(bad.nonzero()[0, 0])
        raise ValueError(f"token {token} has position {int(positions[token])} outside its slot "
                         f"(max_model_len {max_model_len})")
    return torch.where(written, slots * max_model_len + positions, torch.full_like(slots, -1))


def write_kv_contiguous(key, value, key_cache, value_cache, slot_mapping, backend: str | None = None) -> None:
    """Write each token's K/V ([num_tokens, num_kv_heads, head_dim]) into contiguous caches
    ([num_slots, max_model_len, num_kv_heads, head_dim]) at ``slot_mapping`` from
    ``contiguous_slot_mapping`` (-1 = skip). A contiguous cache is a paged one whose blocks are
    whole slots, so every backend's ``write_kv_cache`` does this unchanged."""
    write_kv_cache(key, value, key_cache, value_cache, slot_mapping, backend)


def contiguous_attention(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc, scale,
                         backend: str | None = None, workspace: dict | None = None) -> torch.Tensor:
    """``paged_attention`` over contiguous caches [num_slots, max_model_len, num_kv_heads, head_dim]:
    sequence i's keys are ``key_cache[seq_slots[i], :seq_lens[i]]``, read linearly (no block table).

    query [num_tokens, num_heads, head_dim]; seq_slots and seq_lens [num_seqs]; query_start_loc
    [num_seqs+1]; the same packed-query, causal semantics and ``workspace`` rule as ``paged_attention``.
    """
    if _pick_backend(query, backend) == "triton":
        from paged_kernels.triton_attention import triton_contiguous_attention

        return triton_contiguous_attention(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc,
                                           scale)
    return torch_contiguous_attention(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc,
                                      scale, workspace)


def prepare_cpu_kernels() -> bool:
    """Build or load the compiled CPU kernels now; an engine on CPU calls this while it loads, so
    no request waits for a build. False: they cannot be had here (logged once) and the torch
    backend serves with plain torch ops."""
    return cpu_extension.load() is not None


__all__ = ["write_kv_cache", "paged_attention", "contiguous_slot_mapping", "write_kv_contiguous",
           "contiguous_attention", "prepare_cpu_kernels", "BACKENDS"]
