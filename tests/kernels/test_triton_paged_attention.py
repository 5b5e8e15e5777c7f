"""Triton paged attention (through the Triton interpreter on CPU tensors) vs the reference.

bf16 cases here exercise the interpreter path, where bf16 tiles are upcast to fp32 before
``tl.dot`` (DOT_FP32); the native bf16 ``tl.dot`` used on GPUs cannot be run on this machine.
"""
import pytest
import torch

from paged_kernels import triton_attention
from paged_kernels.reference import reference_paged_attention
from paged_kernels.triton_attention import choose_num_splits, dot_mode, plan_launch, triton_paged_attention
from paged_cases import ATTENTION_CASES, DTYPES, assert_close_to_reference, make_batch


def check(batch, **knobs):
    out = triton_paged_attention(*batch.args(), **knobs)
    assert_close_to_reference(out, reference_paged_attention(*batch.args()))
    return out


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_matches_reference(case):
    q_lens, kv_lens, options = ATTENTION_CASES[case]
    check(make_batch(q_lens, kv_lens, seed=1, **options))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mixed_batch_matches_reference_per_dtype(dtype, head_dim):
    batch = make_batch([1, 9, 1], [30, 9, 17], num_heads=8, num_kv_heads=2, head_dim=head_dim,
                       dtype=DTYPES[dtype], seed=2)
    check(batch)


def test_bf16_dot_is_upcast_only_under_the_interpreter():
    assert dot_mode(torch.bfloat16, interpreting=True) == (True, False)
    assert dot_mode(torch.bfloat16, interpreting=False) == (False, False)  # native bf16 on GPU
    assert dot_mode(torch.float16, interpreting=True) == (False, False)
    assert dot_mode(torch.float32, interpreting=True) == (False, True)  # IEEE fp32, never TF32


def test_stale_cache_slots_are_never_read():
    # Every slot no sequence owns (rest of the last block, spare blocks, table padding) is NaN.
    check(make_batch([1, 4, 1], [19, 21, 16], num_heads=8, num_kv_heads=2, poison=True, seed=3))


def test_several_query_tiles_per_sequence():
    # block_q=2 cuts the 7- and 12-token chunks into several tiles, the last one partial.
    check(make_batch([7, 1, 12], [7, 5, 30], seed=4), block_q=2)


def test_empty_batch_returns_empty_output():
    batch = make_batch([], [], seed=5)
    out = triton_paged_attention(*batch.args())
    assert out.shape == (0, 4, 64) and out.dtype == batch.query.dtype


def test_int64_index_tensors_are_accepted():
    check(make_batch([1, 5], [20, 5], seed=6).with_int64_indices())


def test_rejects_heads_not_a_multiple_of_kv_heads():
    batch = make_batch([1], [4], num_heads=4, num_kv_heads=4, seed=7)
    batch.query = torch.randn(1, 6, 64)
    with pytest.raises(ValueError, match="multiple"):
        triton_paged_attention(*batch.args())


def test_split_k_decode_matches_reference():
    # 4 splits of a 300- and a 77-token context: some splits are partial, some empty.
    check(make_batch([1, 1], [300, 77], num_heads=8, num_kv_heads=2, seed=8), num_splits=4)


def test_split_k_with_prefill_rows_matches_reference():
    check(make_batch([1, 6], [100, 90], seed=9), num_splits=3)


class _LaunchSpy:
    """Stands in for a @triton.jit kernel and records the grids it is launched with."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_split_k_chosen_by_heuristic_for_one_long_decode(monkeypatch):
    spy = _LaunchSpy(triton_attention._merge_splits_kernel)
    monkeypatch.setattr(triton_attention, "_merge_splits_kernel", spy)
    check(make_batch([1], [600], num_heads=8, num_kv_heads=2, seed=10))
    assert spy.grids == [(1, 2)]


def test_no_split_k_for_a_short_decode_batch(monkeypatch):
    spy = _LaunchSpy(triton_attention._merge_splits_kernel)
    monkeypatch.setattr(triton_attention, "_merge_splits_kernel", spy)
    check(make_batch([1, 1], [40, 7], seed=11))
    assert spy.grids == []


def test_heuristic_splits_a_long_context_on_an_idle_gpu():
    # 2 programs on 132 SMs, 4096 keys: as many splits as allowed.
    assert choose_num_splits(num_programs=2, max_kv_len=4096, num_sms=132) == triton_attention.MAX_SPLITS


def test_heuristic_keeps_enough_keys_per_split():
    assert choose_num_splits(num_programs=2, max_kv_len=600, num_sms=132) == 2
    assert choose_num_splits(num_programs=2, max_kv_len=255, num_sms=132) == 1


def test_heuristic_does_not_split_a_launch_that_fills_the_gpu():
    assert choose_num_splits(num_programs=132, max_kv_len=32768, num_sms=132) == 1


def test_heuristic_splits_fewer_as_programs_grow():
    # 40 programs: ceil(264 / 40) = 7 splits reach about two programs per SM.
    assert choose_num_splits(num_programs=40, max_kv_len=32768, num_sms=132) == 7


def test_decode_batch_uses_one_token_tiles():
    plan = plan_launch(num_tokens=8, num_seqs=8, num_heads=32, num_kv_heads=8, head_dim=128,
                       block_size=16, max_blocks_per_seq=4, device=torch.device("cpu"))
    assert (plan.block_q, plan.block_m, plan.num_tiles, plan.num_splits) == (1, 16, 8, 1)


def test_prefill_tiles_follow_the_mean_query_length():
    # mean q_len 50 -> 64, capped at 64 rows / 4 heads per KV head = 16 tokens per tile.
    plan = plan_launch(num_tokens=100, num_seqs=2, num_heads=32, num_kv_heads=8, head_dim=80,
                       block_size=16, max_blocks_per_seq=4, device=torch.device("cpu"))
    assert (plan.block_q, plan.block_m, plan.dim_pad, plan.num_tiles) == (16, 64, 128, 100 // 16 + 2)
