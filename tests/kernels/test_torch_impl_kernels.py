"""The CPU implementation (paged_kernels.torch_impl) vs the reference, on the same cases as the Triton
tests, through both of its paths: the compiled kernel (what ``torch_paged_attention`` runs once
the kernels are loaded) and the plain-torch fallback."""
import pytest
import torch

from paged_kernels.reference import reference_paged_attention, reference_write_kv_cache
from paged_cases import ATTENTION_CASES, DTYPES, assert_close_to_reference, make_batch, make_cache_write


@pytest.fixture(params=["compiled", "plain"])
def impl(request):
    """(paged_attention, write_kv_cache) of one path."""
    # Imported per test so a missing or broken module fails these tests, not collection.
    from paged_kernels import torch_impl

    if request.param == "compiled":
        request.getfixturevalue("compiled_ops")
        return torch_impl.torch_paged_attention, torch_impl.torch_write_kv_cache
    return torch_impl.plain_paged_attention, torch_impl.plain_write_kv_cache


def check(impl, batch):
    attention, _ = impl
    assert_close_to_reference(attention(*batch.args()), reference_paged_attention(*batch.args()))


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
    attention, _ = impl
    batch = make_batch([], [], seed=5)
    out = attention(*batch.args())
    assert out.shape == (0, 4, 64) and out.dtype == batch.query.dtype


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_write_kv_cache_matches_reference(impl, dtype):
    _, write = impl
    cache_write = make_cache_write([5, -1, 16, 63, 0, 31, -1, 40], dtype=DTYPES[dtype], seed=1)
    expected = cache_write.clone_caches()
    reference_write_kv_cache(*expected.args())
    write(*cache_write.args())
    assert torch.equal(cache_write.key_cache, expected.key_cache)
    assert torch.equal(cache_write.value_cache, expected.value_cache)


def test_write_kv_cache_of_strided_views_matches_reference(impl):
    # K and V as the model passes them: views into one fused projection.
    _, write = impl
    cache_write = make_cache_write([7, 2, -1, 60], strided=True, seed=6)
    expected = cache_write.clone_caches()
    reference_write_kv_cache(*expected.args())
    write(*cache_write.args())
    assert torch.equal(cache_write.key_cache, expected.key_cache)
    assert torch.equal(cache_write.value_cache, expected.value_cache)


def test_write_kv_cache_converts_to_the_cache_dtype(impl):
    _, write = impl
    cache_write = make_cache_write([3, 9, -1], dtype=torch.float32, cache_dtype=torch.bfloat16, seed=7)
    expected = cache_write.clone_caches()
    reference_write_kv_cache(*expected.args())
    write(*cache_write.args())
    assert torch.equal(cache_write.key_cache, expected.key_cache)
    assert torch.equal(cache_write.value_cache, expected.value_cache)


def test_write_kv_cache_no_tokens_is_a_no_op(impl):
    _, write = impl
    cache_write = make_cache_write([], seed=8)
    before = cache_write.key_cache.clone()
    write(*cache_write.args())
    assert torch.equal(cache_write.key_cache, before)
