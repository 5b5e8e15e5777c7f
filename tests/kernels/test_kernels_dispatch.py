"""paged_kernels.paged_attention / paged_kernels.write_kv_cache: the backend choice and the forced Triton
path (through the interpreter on CPU tensors)."""
import pytest
import torch

import paged_kernels
from paged_kernels import triton_attention, triton_cache
from paged_kernels.reference import reference_paged_attention, reference_write_kv_cache
from paged_cases import assert_close_to_reference, make_batch, make_cache_write


def _record_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_forced_triton_attention_runs_the_triton_kernel(monkeypatch):
    calls = _record_calls(monkeypatch, triton_attention, "triton_paged_attention")
    batch = make_batch([1, 6], [25, 6], num_heads=8, num_kv_heads=2, seed=1)
    out = paged_kernels.paged_attention(*batch.args(), backend="triton")
    assert calls == ["triton_paged_attention"]
    assert_close_to_reference(out, reference_paged_attention(*batch.args()))


def test_forced_triton_write_runs_the_triton_kernel(monkeypatch):
    calls = _record_calls(monkeypatch, triton_cache, "triton_write_kv_cache")
    write = make_cache_write([3, -1, 30], seed=2)
    expected = write.clone_caches()
    reference_write_kv_cache(*expected.args())
    paged_kernels.write_kv_cache(*write.args(), backend="triton")
    assert calls == ["triton_write_kv_cache"]
    assert torch.equal(write.key_cache, expected.key_cache)
    assert torch.equal(write.value_cache, expected.value_cache)


def test_cpu_tensors_default_to_the_torch_path(monkeypatch):
    calls = _record_calls(monkeypatch, triton_attention, "triton_paged_attention")
    batch = make_batch([1, 3], [10, 3], seed=3)
    out = paged_kernels.paged_attention(*batch.args())
    assert calls == []
    assert_close_to_reference(out, reference_paged_attention(*batch.args()))


def test_unknown_backend_is_rejected():
    batch = make_batch([1], [4], seed=4)
    with pytest.raises(ValueError, match="backend"):
        paged_kernels.paged_attention(*batch.args(), backend="cuda")
