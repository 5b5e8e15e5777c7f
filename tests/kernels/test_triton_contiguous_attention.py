"""Triton contiguous attention (the paged kernel with CONTIGUOUS set, through the Triton
interpreter on CPU tensors) vs the reference, and the backend choice of the contiguous entry points.

bf16 cases here exercise the interpreter path, where bf16 tiles are upcast to fp32 before
``tl.dot`` (DOT_FP32); the native bf16 ``tl.dot`` used on GPUs cannot be run on this machine.
"""
import pytest
import torch

import paged_kernels
from paged_kernels import triton_attention, triton_cache
from paged_kernels.reference import reference_contiguous_attention, reference_write_kv_cache
from paged_kernels.triton_attention import triton_contiguous_attention
from contiguous_cases import make_contiguous_batch
from paged_cases import DTYPES, assert_close_to_reference


def check(batch, **knobs):
    out = triton_contiguous_attention(*batch.args(), **knobs)
    assert_close_to_reference(out, reference_contiguous_attention(*batch.args()))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mixed_batch_matches_reference_per_dtype(dtype):
    check(make_contiguous_batch([1, 9, 1], [30, 9, 17], num_heads=8, num_kv_heads=2, dtype=DTYPES[dtype],
                                poison=True, seed=1))


def test_gqa8_head_dim_80_and_padded_slots():
    check(make_contiguous_batch([1, 7, 1], [40, 20, 1], num_heads=8, num_kv_heads=1, head_dim=80, padded=True,
                                poison=True, seed=2))


def test_split_k_and_several_query_tiles():
    check(make_contiguous_batch([1, 12], [300, 40], num_heads=4, num_kv_heads=2, poison=True, seed=3),
          num_splits=2, block_q=4)


def test_rejects_seq_slots_of_the_wrong_shape():
    batch = make_contiguous_batch([1, 1], [5, 6], seed=4)
    batch.seq_slots = batch.seq_slots.view(-1, 1)
    with pytest.raises(ValueError, match="seq_slots"):
        triton_contiguous_attention(*batch.args())


def test_forced_triton_backend_runs_the_triton_kernels(monkeypatch):
    calls = []

    def recording(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))

    recording(triton_attention, "triton_contiguous_attention")
    recording(triton_cache, "triton_write_kv_cache")
    batch = make_contiguous_batch([1, 4], [12, 4], max_model_len=16, padded=True, seed=5)
    g = torch.Generator().manual_seed(5)
    key, value = torch.randn(2, 2, 64, generator=g), torch.randn(2, 2, 64, generator=g)
    mapping = paged_kernels.contiguous_slot_mapping(batch.seq_slots.long(), torch.tensor([12, 4]), 16)
    expected_keys, expected_values = batch.key_cache.clone(), batch.value_cache.clone()
    reference_write_kv_cache(key, value, expected_keys, expected_values, mapping)
    paged_kernels.write_kv_contiguous(key, value, batch.key_cache, batch.value_cache, mapping, backend="triton")
    out = paged_kernels.contiguous_attention(*batch.args(), backend="triton")
    assert calls == ["triton_write_kv_cache", "triton_contiguous_attention"]
    assert torch.equal(batch.key_cache, expected_keys) and torch.equal(batch.value_cache, expected_values)
    assert_close_to_reference(out, reference_contiguous_attention(*batch.args()))


def test_cpu_tensors_default_to_the_torch_path(monkeypatch):
    monkeypatch.setattr(triton_attention, "triton_contiguous_attention",
                        lambda *a, **k: pytest.fail("the Triton kernel ran for CPU tensors"))
    batch = make_contiguous_batch([1, 3], [10, 3], seed=6)
    assert_close_to_reference(paged_kernels.contiguous_attention(*batch.args()),
                              reference_contiguous_attention(*batch.args()))
