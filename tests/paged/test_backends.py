"""Kernel choices resolved once at load: the object that runs the attention reports what it runs."""
from __future__ import annotations

import torch

from paged.backends import resolve_attention_backend, resolve_backends
from paged_kernels import cpu_extension, torch_impl


def test_a_head_dim_the_compiled_kernel_does_not_take_reports_and_runs_the_plain_path(monkeypatch):
    monkeypatch.setattr(cpu_extension, "load", lambda: torch.ops.aten)  # the library "loads"
    head_dim = torch_impl.MAX_COMPILED_HEAD_DIM + 64
    backend = resolve_attention_backend(None, "cpu", head_dim)
    assert backend.name == "plain" and f"head_dim {head_dim}" in backend.reason
    assert backend.paged_attention is torch_impl.plain_paged_attention
    assert backend.write_kv_cache is torch_impl.plain_write_kv_cache


def test_the_compiled_path_is_reported_only_where_the_library_loads(monkeypatch):
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    missing = resolve_attention_backend(None, "cpu", 64)
    assert missing.name == "plain" and "unavailable" in missing.reason
    monkeypatch.setattr(cpu_extension, "load", lambda: torch.ops.aten)
    loaded = resolve_backends(None, "cpu", 64, torch.float32)
    assert loaded.attention.name == "compiled" and loaded.dense_kernels == "compiled"
    assert loaded.describe()["attention"] == "compiled"


def test_triton_is_chosen_when_forced_and_by_a_cuda_device():
    assert resolve_attention_backend("triton", "cpu", 64).name == "triton"
    assert resolve_attention_backend(None, "cuda", 64).name == "triton"


def test_the_chosen_attention_matches_the_plain_path_on_a_decode_step():
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, kv_heads, heads, head_dim = 6, 4, 2, 4, 32
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    query = torch.randn(2, heads, head_dim, generator=gen)
    args = (query, key_cache, value_cache, torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32),
            torch.tensor([9, 11], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32), head_dim ** -0.5)
    chosen = resolve_attention_backend(None, "cpu", head_dim)
    torch.testing.assert_close(chosen.paged_attention(*args, {}), torch_impl.plain_paged_attention(*args, {}),
                               atol=1e-5, rtol=1e-5)
