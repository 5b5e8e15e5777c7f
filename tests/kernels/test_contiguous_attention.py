"""The contiguous variant of the attention contract (caches [num_slots, max_model_len, kv_heads,
head_dim], one slot per sequence) on CPU: the compiled kernel and the plain-torch fallback vs the
reference, the compiled kernel vs the paged one on the same contents, and the writes.

Every batch mixes decode rows, a chunk of prefill on cached keys and a fresh prefill; with
``poison=True`` every cache element no sequence owns is NaN (see contiguous_cases)."""
import pytest
import torch

import paged_kernels
from paged_kernels import torch_impl
from paged_kernels.reference import reference_contiguous_attention, reference_write_kv_cache
from contiguous_cases import make_contiguous_batch, to_paged
from paged_cases import DTYPES, assert_close_to_reference
from thread_counts import at_thread_counts

MIXED_Q_LENS, MIXED_KV_LENS = [1, 5, 1, 11], [37, 29, 1, 11]


@pytest.fixture(params=["compiled", "plain"])
def attention(request):
    """One CPU path's contiguous attention."""
    if request.param == "compiled":
        request.getfixturevalue("compiled_ops")
        return torch_impl.torch_contiguous_attention
    return torch_impl.plain_contiguous_attention


def check(attention, batch):
    out = attention(*batch.args())
    assert_close_to_reference(out, reference_contiguous_attention(*batch.args()))
    return out


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa_ratio_and_head_dim(attention, group, head_dim):
    check(attention, make_contiguous_batch(MIXED_Q_LENS, MIXED_KV_LENS, num_heads=2 * group, num_kv_heads=2,
                                           head_dim=head_dim, poison=True, seed=group * 1000 + head_dim))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_each_dtype(attention, dtype, head_dim):
    check(attention, make_contiguous_batch(MIXED_Q_LENS, MIXED_KV_LENS, num_heads=8, num_kv_heads=1,
                                           head_dim=head_dim, dtype=DTYPES[dtype], poison=True, seed=head_dim))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_long_context_decode_and_chunk(attention, dtype):
    # 2000 cached tokens: many key tiles, so the running max and rescaling are exercised.
    check(attention, make_contiguous_batch([1, 40], [2000, 2000], num_heads=8, num_kv_heads=2,
                                           dtype=DTYPES[dtype], poison=True, seed=11))


def test_fresh_prefill_longer_than_a_work_item(attention):
    check(attention, make_contiguous_batch([300], [300], num_heads=4, num_kv_heads=1, poison=True, seed=12))


def test_slots_padded_apart_as_whole_pages(attention):
    # Strided caches: slot stride > max_model_len tokens, the padding NaN.
    batch = make_contiguous_batch(MIXED_Q_LENS, MIXED_KV_LENS, num_heads=8, num_kv_heads=2, poison=True,
                                  padded=True, seed=13)
    assert not batch.key_cache.is_contiguous()
    check(attention, batch)


def test_sequence_filling_its_whole_slot(attention):
    check(attention, make_contiguous_batch([1, 3], [64, 64], max_model_len=64, poison=True, seed=14))


def test_sequence_with_no_new_tokens_and_strided_query(attention):
    check(attention, make_contiguous_batch([2, 0, 1], [9, 20, 4], strided_query=True, poison=True, seed=15))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("block_size", [1, 8, 16, 64])
def test_compiled_equals_the_paged_kernel_on_the_same_contents(compiled_ops, block_size, dtype):
    # One kernel, two ways to find a tile's rows: the arithmetic is the same, so are the bits.
    batch = make_contiguous_batch(MIXED_Q_LENS + [1], MIXED_KV_LENS + [300], num_heads=8, num_kv_heads=2,
                                  dtype=DTYPES[dtype], seed=block_size)
    key_cache, value_cache, block_tables = to_paged(batch, block_size, seed=block_size)
    paged = torch_impl.torch_paged_attention(batch.query, key_cache, value_cache, block_tables, batch.seq_lens,
                                             batch.query_start_loc, batch.scale)
    assert torch.equal(torch_impl.torch_contiguous_attention(*batch.args()), paged)


def test_compiled_output_does_not_depend_on_the_thread_count(compiled_ops):
    batch = make_contiguous_batch([1] * 12 + [30], [50 + 13 * i for i in range(12)] + [200], num_heads=8,
                                  num_kv_heads=2, seed=16)
    one, two = at_thread_counts(lambda: torch_impl.torch_contiguous_attention(*batch.args()), 1, 2)
    assert torch.equal(one, two)


def test_compiled_path_does_not_call_the_plain_path(compiled_ops, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("plain path used")

    monkeypatch.setattr(torch_impl, "plain_contiguous_attention", fail)
    check(torch_impl.torch_contiguous_attention, make_contiguous_batch([1, 3], [10, 3], seed=17))


def test_workspace_is_reused_by_every_layer_of_a_step(attention):
    batch = make_contiguous_batch(MIXED_Q_LENS, MIXED_KV_LENS, seed=18)
    workspace: dict = {}
    first = attention(*batch.args(), workspace)
    assert workspace  # the step's plan is kept
    assert torch.equal(attention(*batch.args(), workspace), first)


def test_rejects_a_slot_outside_the_cache(compiled_ops):
    batch = make_contiguous_batch([1], [20], seed=19)
    batch.seq_slots = torch.tensor([batch.key_cache.shape[0]], dtype=torch.int32)
    with pytest.raises(IndexError, match="outside the cache"):
        torch_impl.torch_contiguous_attention(*batch.args())


def test_rejects_a_sequence_longer_than_its_slot(compiled_ops):
    batch = make_contiguous_batch([1], [20], max_model_len=24, seed=20)
    batch.seq_lens = torch.tensor([25], dtype=torch.int32)
    with pytest.raises(ValueError, match="beyond its slot"):
        torch_impl.torch_contiguous_attention(*batch.args())


def test_rejects_seq_slots_that_disagree_with_seq_lens(compiled_ops):
    batch = make_contiguous_batch([1, 1], [5, 6], seed=21)
    batch.seq_slots = batch.seq_slots[:1]
    with pytest.raises(ValueError, match="seq_slots"):
        torch_impl.torch_contiguous_attention(*batch.args())


def test_op_is_a_well_formed_torch_operator(compiled_ops):
    batch = make_contiguous_batch([1, 5], [20, 5], seed=22)
    torch.library.opcheck(compiled_ops.contiguous_attention.default, batch.args())


# ---- writes -------------------------------------------------------------------------------------
def test_slot_mapping_is_slot_times_max_model_len_plus_position():
    mapping = paged_kernels.contiguous_slot_mapping(torch.tensor([2, -1, 0, 2]), torch.tensor([5, 9, 0, 6]), 8)
    assert mapping.tolist() == [21, -1, 0, 22]


def test_slot_mapping_rejects_a_position_past_the_slot():
    with pytest.raises(ValueError, match="token 1 has position 8"):
        paged_kernels.contiguous_slot_mapping(torch.tensor([0, 1]), torch.tensor([7, 8]), 8)


@pytest.mark.parametrize("path", ["compiled", "plain"])
def test_write_into_padded_slots_matches_the_reference(request, path):
    # The caches are strided views (4 slots of 16 tokens, 5 padding tokens apart): a write must
    # follow their strides and leave the padding alone.
    g = torch.Generator().manual_seed(23)
    stored_keys, stored_values = torch.randn(4, 21, 2, 64, generator=g), torch.randn(4, 21, 2, 64, generator=g)
    key_cache, value_cache = stored_keys[:, :16], stored_values[:, :16]
    key, value = torch.randn(4, 2, 64, generator=g), torch.randn(4, 2, 64, generator=g)
    mapping = paged_kernels.contiguous_slot_mapping(torch.tensor([3, 0, -1, 3]), torch.tensor([15, 0, 4, 2]), 16)
    expected_keys, expected_values = stored_keys.clone(), stored_values.clone()
    reference_write_kv_cache(key, value, expected_keys[:, :16], expected_values[:, :16], mapping)
    if path == "compiled":
        request.getfixturevalue("compiled_ops")
        paged_kernels.write_kv_contiguous(key, value, key_cache, value_cache, mapping)
    else:
        torch_impl.plain_write_kv_cache(key, value, key_cache, value_cache, mapping)
    assert torch.equal(stored_keys, expected_keys) and torch.equal(stored_values, expected_values)
