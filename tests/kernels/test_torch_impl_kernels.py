"""The torch CPU implementation (kernels.torch_impl) vs the reference, on the same cases as the
Triton tests."""
import pytest
import torch

from kernels.reference import reference_paged_attention, reference_write_kv_cache
from paged_cases import ATTENTION_CASES, DTYPES, assert_close_to_reference, make_batch, make_cache_write


@pytest.fixture
def impl():
    # Imported per test so a missing or broken module fails these tests, not collection.
    from kernels import torch_impl

    return torch_impl


def check(impl, batch):
    out = impl.torch_paged_attention(*batch.args())
    assert_close_to_reference(out, reference_paged_attention(*batch.args()))


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_matches_reference(impl, case):
    q_lens, kv_lens, options = ATTENTION_CASES[case]
    check(impl, make_batch(q_lens, kv_lens, seed=1, **options))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mixed_batch_matches_reference_per_dtype(impl, dtype, head_dim):
    check(impl, make_batch([1, 9, 1], [30, 9, 17], num_heads=8, num_kv_heads=2, head_dim=head_dim,
                           dtype=DTYPES[dtype], seed=2))


def test_long_decode_batch_matches_reference(impl):
    check(impl, make_batch([1, 1, 1], [600, 3, 129], num_heads=8, num_kv_heads=2, seed=10))


def test_stale_cache_slots_are_never_read(impl):
    # Every slot no sequence owns (rest of the last block, spare blocks, table padding) is NaN,
    # as it can be in a pool allocated with torch.empty.
    check(impl, make_batch([1, 4, 1], [19, 21, 16], num_heads=8, num_kv_heads=2, poison=True, seed=3))


def test_empty_batch_returns_empty_output(impl):
    batch = make_batch([], [], seed=5)
    out = impl.torch_paged_attention(*batch.args())
    assert out.shape == (0, 4, 64) and out.dtype == batch.query.dtype


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_write_kv_cache_matches_reference(impl, dtype):
    write = make_cache_write([5, -1, 16, 63, 0, 31, -1, 40], dtype=DTYPES[dtype], seed=1)
    expected = write.clone_caches()
    reference_write_kv_cache(*expected.args())
    impl.torch_write_kv_cache(*write.args())
    assert torch.equal(write.key_cache, expected.key_cache)
    assert torch.equal(write.value_cache, expected.value_cache)


def test_write_kv_cache_no_tokens_is_a_no_op(impl):
    write = make_cache_write([], seed=8)
    before = write.key_cache.clone()
    impl.torch_write_kv_cache(*write.args())
    assert torch.equal(write.key_cache, before)
