"""Paged KV-cache kernels: one contract, a Triton implementation (CUDA) and a torch one (CPU).

The backend is chosen by the tensors' device unless forced with ``backend="torch"|"triton"``.
The Triton modules are imported only when that backend is used, so CPU users never need a
working Triton. On CPU the torch backend runs compiled kernels (built on first use, see
``prepare_cpu_kernels``) where a C++ compiler is available, and plain torch ops otherwise.
"""
from __future__ import annotations

import torch

from paged_kernels import cpu_extension
from paged_kernels.torch_impl import torch_paged_attention, torch_write_kv_cache

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


def prepare_cpu_kernels() -> bool:
    """Build or load the compiled CPU kernels now; an engine on CPU calls this while it loads, so
    no request waits for a build. False: they cannot be had here (logged once) and the torch
    backend serves with plain torch ops."""
    return cpu_extension.load() is not None


__all__ = ["write_kv_cache", "paged_attention", "prepare_cpu_kernels", "BACKENDS"]
