"""The kernels a model runs, resolved once at load: one object runs them and reports them.

Attention (write into the paged cache, then paged attention) has three implementations:
``triton`` (the Triton kernels; the default on CUDA, and what ``attention_backend: triton``
forces, on CPU through Triton's interpreter), ``compiled`` (the C++ CPU kernels of
``paged_kernels.cpu_extension``, where the library loads and takes the head dim) and ``plain``
(torch ops, the fallback). ``resolve_backends`` decides once; ``AttentionBackend`` then calls the
chosen functions directly, so what ``performance_info`` reports is what runs (a head dim the
compiled kernel does not take reports ``plain``, with the reason). Each implementation has both
layouts of the contract: paged (``paged_attention`` through block tables) and contiguous
(``contiguous_attention``, one slot per sequence: ``kv_memory: virtual``); ``Backends.layout``
says which one the model runs.

The dense layer kernels (RMSNorm, RoPE, SiLU·up; ``paged/models/forward_ops.py``) share the
compiled library: ``dense_kernels`` reports whether they run. The GEMM path and compiled dense
regions are chosen by the model at load and reported beside these (``ModelRunner.performance_info``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import paged_kernels
from paged.models.forward_ops import FUSED_DTYPES
from paged_kernels import torch_impl
from paged_kernels.torch_impl import MAX_COMPILED_HEAD_DIM


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation: ``name`` (triton | compiled | plain), why it was chosen, and
    its calls, with the arguments of ``paged_kernels.write_kv_cache`` (key, value, key_cache,
    value_cache, slot_mapping), ``paged_kernels.paged_attention`` (query, key_cache,
    value_cache, block_tables, seq_lens, query_start_loc, scale, workspace) and
    ``paged_kernels.contiguous_attention`` (the same with seq_slots for block_tables)."""

    name: str
    reason: str
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    contiguous_attention: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backends:
    attention: AttentionBackend
    dense_kernels: str   # "compiled" | "torch"
    layout: str = "paged"   # "paged" (block tables) | "contiguous" (one slot per sequence)

    def describe(self) -> dict:
        return {"attention": self.attention.name, "attention_reason": self.attention.reason,
                "attention_layout": self.layout, "dense_kernels": self.dense_kernels}


def _triton(reason: str) -> AttentionBackend:
    from paged_kernels.triton_attention import triton_contiguous_attention, triton_paged_attention
    from paged_kernels.triton_cache import triton_write_kv_cache

    def attend(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, workspace):
        return triton_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale)

    def attend_contiguous(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc, scale, workspace):
        return triton_contiguous_attention(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc,
                                           scale)
    return AttentionBackend("triton", reason, triton_write_kv_cache, attend, attend_contiguous)


def resolve_attention_backend(requested: str | None, device: str, head_dim: int) -> AttentionBackend:
    """The attention implementation for ``attention_backend`` (None: by device), a model of
    ``head_dim`` and tensors on ``device``. Builds or loads the compiled CPU kernels now, so no
    request waits for a build."""
    device_type = torch.device(device).type
    if requested == "triton":
        return _triton("attention_backend: triton")
    if requested is None and device_type == "cuda":
        return _triton(f"device {device}")
    if device_type == "cpu":
        paged_kernels.prepare_cpu_kernels()
    if torch_impl.compiled_ops_for(device_type, head_dim) is not None:
        return AttentionBackend("compiled", "the compiled CPU kernels", torch_impl.torch_write_kv_cache,
                                torch_impl.torch_paged_attention, torch_impl.torch_contiguous_attention)
    if device_type != "cpu":
        reason = f"the compiled kernels run on CPU only (device {device})"
    elif head_dim > MAX_COMPILED_HEAD_DIM:
        reason = f"head_dim {head_dim} is above the compiled kernel's {MAX_COMPILED_HEAD_DIM}"
    else:
        reason = "the compiled CPU kernels are unavailable here (PAGED_CPU_KERNELS=0 or no build; see the log)"
    return AttentionBackend("plain", reason, torch_impl.plain_write_kv_cache, torch_impl.plain_paged_attention,
                            torch_impl.plain_contiguous_attention)


def resolve_backends(requested_attention: str | None, device: str, head_dim: int, dtype: torch.dtype,
                     contiguous: bool = False) -> Backends:
    """Every kernel choice of a model, once, at load; ``contiguous``: the model's KV is contiguous
    (kv_memory virtual), so its attention runs ``contiguous_attention``."""
    attention = resolve_attention_backend(requested_attention, device, head_dim)
    dense = "compiled" if (torch.device(device).type == "cpu" and dtype in FUSED_DTYPES
                           and paged_kernels.prepare_cpu_kernels()) else "torch"
    return Backends(attention, dense, "contiguous" if contiguous else "paged")
