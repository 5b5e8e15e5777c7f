"""Triton write_kv_cache (through the Triton interpreter on CPU tensors) vs the reference."""
import pytest
import torch

from paged_kernels.reference import reference_write_kv_cache
from paged_kernels.triton_cache import triton_write_kv_cache
from paged_cases import DTYPES, make_cache_write


def check(write):
    expected = write.clone_caches()
    reference_write_kv_cache(*expected.args())
    triton_write_kv_cache(*write.args())
    # A copy: bit-exact, including every slot that was not written.
    assert torch.equal(write.key_cache, expected.key_cache)
    assert torch.equal(write.value_cache, expected.value_cache)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_writes_match_reference(dtype):
    # Tokens across several blocks, in no particular order.
    check(make_cache_write([5, 16, 63, 0, 31, 40], dtype=DTYPES[dtype], seed=1))


def test_slot_minus_one_is_skipped():
    write = make_cache_write([3, -1, 20, -1], seed=2)
    before_k, before_v = write.key_cache.clone(), write.value_cache.clone()
    triton_write_kv_cache(*write.args())
    written = torch.zeros(write.key_cache.shape[:2], dtype=torch.bool)
    written.view(-1)[[3, 20]] = True
    assert torch.equal(write.key_cache[~written], before_k[~written])
    assert torch.equal(write.value_cache[~written], before_v[~written])
    assert torch.equal(write.key_cache.view(-1, 2, 64)[[3, 20]], write.key[[0, 2]])
    assert torch.equal(write.value_cache.view(-1, 2, 64)[[3, 20]], write.value[[0, 2]])


def test_block_size_1():
    check(make_cache_write([2, 0, 3], num_blocks=4, block_size=1, seed=3))


def test_odd_head_count_and_head_dim_80():
    check(make_cache_write([1, 17, 9], num_kv_heads=3, head_dim=80, seed=4))


def test_strided_key_and_value_views():
    check(make_cache_write([4, 7, 33], strided=True, seed=5))


def test_casts_to_the_cache_dtype():
    check(make_cache_write([0, 21], dtype=torch.float32, cache_dtype=torch.float16, seed=6))


def test_int32_slot_mapping():
    write = make_cache_write([9, -1, 50], seed=7)
    write.slot_mapping = write.slot_mapping.to(torch.int32)
    check(write)


def test_no_tokens_is_a_no_op():
    write = make_cache_write([], seed=8)
    before = write.key_cache.clone()
    triton_write_kv_cache(*write.args())
    assert torch.equal(write.key_cache, before)


def test_rejects_mismatched_head_dim():
    write = make_cache_write([0], seed=9)
    with pytest.raises(ValueError, match="cache holds"):
        triton_write_kv_cache(write.key[..., :32], write.value[..., :32], write.key_cache,
                              write.value_cache, write.slot_mapping)
