"""The compiled CPU kernels (kernels/paged_kernels/csrc/paged_attention_cpu.cpp) vs the reference, across the
shapes the contract admits: GQA ratios, head dims, block sizes, dtypes, long contexts, edge cases.

Every batch mixes decode rows, a chunk of prefill on cached keys and a fresh prefill, with NaN in
every slot no sequence owns and shuffled block tables (see paged_cases.make_batch)."""
import pytest
import torch

from paged_kernels import torch_impl
from paged_kernels.reference import reference_paged_attention, reference_write_kv_cache
from paged_cases import DTYPES, assert_close_to_reference, make_batch, make_cache_write
from thread_counts import at_thread_counts

MIXED_Q_LENS, MIXED_KV_LENS = [1, 5, 1, 11], [37, 29, 1, 11]


@pytest.fixture(autouse=True)
def _kernels_loaded(compiled_ops):
    """torch_impl serves CPU tensors with the compiled kernels in this file."""


def check(batch):
    out = torch_impl.torch_paged_attention(*batch.args())
    assert_close_to_reference(out, reference_paged_attention(*batch.args()))
    return out


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa_ratio_and_head_dim(group, head_dim):
    check(make_batch(MIXED_Q_LENS, MIXED_KV_LENS, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                     poison=True, seed=group * 1000 + head_dim))


@pytest.mark.parametrize("block_size", [1, 2, 16, 32, 64, 256])
def test_block_size(block_size):
    check(make_batch(MIXED_Q_LENS + [1], MIXED_KV_LENS + [300], num_heads=8, num_kv_heads=2,
                     block_size=block_size, poison=True, seed=block_size))


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_caches(dtype, head_dim):
    check(make_batch(MIXED_Q_LENS, MIXED_KV_LENS, num_heads=8, num_kv_heads=1, head_dim=head_dim,
                     dtype=DTYPES[dtype], poison=True, seed=head_dim))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_long_context_decode_and_chunk(dtype):
    # 2000 cached tokens: many tiles, so the running max and rescaling are exercised.
    check(make_batch([1, 40], [2000, 2000], num_heads=8, num_kv_heads=2, dtype=DTYPES[dtype], poison=True, seed=11))


def test_long_fresh_prefill():
    check(make_batch([300], [300], num_heads=4, num_kv_heads=1, poison=True, seed=12))


def test_sequence_of_length_one():
    check(make_batch([1], [1], poison=True, seed=13))


def test_sequence_with_no_new_tokens_is_skipped():
    # query_start_loc may repeat an offset: that sequence contributes no rows.
    check(make_batch([2, 0, 1], [9, 20, 4], poison=True, seed=14))


def test_strided_query():
    check(make_batch([1, 6, 1], [20, 6, 50], strided_query=True, poison=True, seed=15))


def test_large_scores_do_not_overflow():
    # Scores near 100, where exp overflows float32 unless the running max is subtracted first.
    # A score's float32 rounding grows with its size (~1e-5 here), hence the wider tolerance.
    batch = make_batch([1, 7], [80, 40], poison=True, seed=16)
    batch.query = batch.query * 30.0
    out = torch_impl.torch_paged_attention(*batch.args())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_paged_attention(*batch.args()), atol=1e-4, rtol=1e-4)


def test_int64_index_tensors_are_accepted():
    check(make_batch([1, 5], [20, 5], seed=17).with_int64_indices())


def test_output_does_not_depend_on_the_thread_count():
    batch = make_batch([1] * 12 + [30], [50 + 13 * i for i in range(12)] + [200], num_heads=8, num_kv_heads=2,
                       seed=18)
    one, two = at_thread_counts(lambda: torch_impl.torch_paged_attention(*batch.args()), 1, 2)
    assert torch.equal(one, two)


# A decode-heavy step: enough decode rows that each takes one work item for all its KV heads.
MANY_DECODE_Q_LENS = [1] * 40 + [7]
MANY_DECODE_KV_LENS = [1 + 9 * i for i in range(40)] + [60]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", [1, 3, 7])
def test_many_decode_rows_match_the_reference(group, dtype):
    check(make_batch(MANY_DECODE_Q_LENS, MANY_DECODE_KV_LENS, num_heads=2 * group, num_kv_heads=2,
                     dtype=DTYPES[dtype], poison=True, seed=40 + group))


@pytest.mark.parametrize("head_dim", [72, 128])
def test_many_decode_rows_with_a_padded_or_wide_head_match_the_reference(head_dim):
    check(make_batch(MANY_DECODE_Q_LENS, MANY_DECODE_KV_LENS, num_heads=6, num_kv_heads=3, head_dim=head_dim,
                     block_size=4, poison=True, seed=head_dim))


def test_decode_rows_give_the_same_bits_in_one_item_per_sequence_or_per_kv_head():
    # 12 decode rows: one item per sequence on 1 thread, one per KV head on 4 (too few per thread).
    batch = make_batch([1] * 12, [5 + 17 * i for i in range(12)], num_heads=9, num_kv_heads=3,
                       dtype=torch.bfloat16, seed=30)
    per_sequence, per_kv_head = at_thread_counts(lambda: torch_impl.torch_paged_attention(*batch.args()), 1, 4)
    assert torch.equal(per_sequence, per_kv_head)


def test_a_sequence_output_does_not_depend_on_the_rest_of_the_batch():
    # The engine's greedy output must not change with what else is scheduled in a step.
    batch = make_batch([1, 1, 6], [70, 33, 40], num_heads=8, num_kv_heads=2, seed=19)
    together = torch_impl.torch_paged_attention(*batch.args())
    alone = torch_impl.torch_paged_attention(batch.query[1:2], batch.key_cache, batch.value_cache,
                                             batch.block_tables[1:2], batch.seq_lens[1:2],
                                             torch.tensor([0, 1], dtype=torch.int32), batch.scale)
    assert torch.equal(together[1:2], alone)


def test_compiled_path_does_not_call_the_plain_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("plain path used")

    monkeypatch.setattr(torch_impl, "plain_paged_attention", fail)
    monkeypatch.setattr(torch_impl, "plain_write_kv_cache", fail)
    check(make_batch([1, 3], [10, 3], seed=20))
    cache_write = make_cache_write([1, -1], seed=20)
    torch_impl.torch_write_kv_cache(*cache_write.args())


def test_rejects_heads_not_a_multiple_of_kv_heads():
    batch = make_batch([1], [4], num_heads=4, num_kv_heads=4, seed=21)
    batch.query = torch.randn(1, 6, 64)
    with pytest.raises(ValueError, match="multiple"):
        torch_impl.torch_paged_attention(*batch.args())


def test_rejects_a_sequence_longer_than_its_block_table():
    batch = make_batch([1], [20], seed=22, table_slack=0)
    batch.seq_lens = torch.tensor([100], dtype=torch.int32)
    with pytest.raises(ValueError, match="block table"):
        torch_impl.torch_paged_attention(*batch.args())


def test_rejects_more_new_tokens_than_keys():
    batch = make_batch([3], [3], seed=23)
    batch.seq_lens = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="new tokens"):
        torch_impl.torch_paged_attention(*batch.args())


def test_rejects_mixed_dtypes():
    batch = make_batch([1], [4], seed=24)
    batch.query = batch.query.half()
    with pytest.raises(ValueError, match="dtype"):
        torch_impl.torch_paged_attention(*batch.args())


def test_write_kv_cache_with_int32_slots_matches_reference():
    cache_write = make_cache_write([8, -1, 33], seed=25)
    cache_write.slot_mapping = cache_write.slot_mapping.int()
    expected = cache_write.clone_caches()
    reference_write_kv_cache(*expected.args())
    torch_impl.torch_write_kv_cache(*cache_write.args())
    assert torch.equal(cache_write.key_cache, expected.key_cache)
    assert torch.equal(cache_write.value_cache, expected.value_cache)


def test_write_kv_cache_rejects_a_slot_outside_the_cache():
    cache_write = make_cache_write([3, 64], num_blocks=4, block_size=16, seed=26)
    before = cache_write.key_cache.clone()
    with pytest.raises(IndexError, match="outside the cache"):
        torch_impl.torch_write_kv_cache(*cache_write.args())
    assert torch.equal(cache_write.key_cache, before)  # checked before anything is written


def test_ops_are_well_formed_torch_operators(compiled_ops):
    # Schema (the cache arguments are declared mutated), fake-tensor shapes and AOT dispatch:
    # what torch.compile needs to keep the kernels as opaque calls inside a compiled graph.
    batch = make_batch([1, 5], [20, 5], seed=27)
    torch.library.opcheck(compiled_ops.paged_attention.default, batch.args())
    torch.library.opcheck(compiled_ops.write_kv_cache.default, make_cache_write([3, -1, 9], seed=27).args())


def test_head_dims_above_the_kernels_limit_take_the_plain_path():
    check(make_batch([1, 4], [20, 4], head_dim=torch_impl.MAX_COMPILED_HEAD_DIM + 64, seed=28))


@pytest.mark.parametrize("head_dim", [32, 72, 192])
def test_head_dims_between_compiled_sizes_are_zero_padded(head_dim):
    check(make_batch(MIXED_Q_LENS, MIXED_KV_LENS, num_heads=8, num_kv_heads=2, head_dim=head_dim, poison=True,
                     seed=head_dim))


def test_rejects_a_block_id_outside_the_cache():
    batch = make_batch([1], [20], seed=29)
    batch.block_tables[0, 1] = batch.key_cache.shape[0]
    with pytest.raises(IndexError, match="outside the cache"):
        torch_impl.torch_paged_attention(*batch.args())
