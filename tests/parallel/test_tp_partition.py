"""Which heads, MLP columns and vocabulary rows each rank owns (pure arithmetic, no processes)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paged.parallel.partition import shard_layout


def layouts(num_heads, num_kv_heads, world_size, intermediate=96, vocab=100, head_dim=4):
    return [shard_layout(num_heads, num_kv_heads, head_dim, intermediate, vocab, world_size, r)
            for r in range(world_size)]


def owned(rows: slice) -> list[int]:
    return list(range(rows.start, rows.stop))


def test_query_heads_are_split_into_disjoint_contiguous_ranges():
    q_rows = [owned(layout.q_rows()) for layout in layouts(8, 2, 4)]
    assert sum(q_rows, []) == list(range(8 * 4))


def test_kv_heads_are_split_when_there_are_at_least_as_many_as_ranks():
    parts = layouts(8, 4, 2)
    assert [(p.kv_head_start, p.num_kv_heads, p.kv_replicas) for p in parts] == [(0, 2, 1), (2, 2, 1)]


@st.composite
def splittable_shapes(draw):
    """(query heads, KV heads, world size) that tensor parallel accepts."""
    world_size = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    if draw(st.booleans()):
        num_kv_heads = world_size * draw(st.integers(1, 4))                        # KV heads split
    else:
        num_kv_heads = draw(st.sampled_from([k for k in range(1, world_size + 1) if world_size % k == 0]))
    group = draw(st.integers(1, 4))
    while (num_kv_heads * group) % world_size:
        group += 1
    return num_kv_heads * group, num_kv_heads, world_size


@given(splittable_shapes())
def test_each_rank_holds_the_kv_heads_its_query_heads_attend_with(shape):
    num_heads, num_kv_heads, world_size = shape
    group = num_heads // num_kv_heads
    for p in layouts(num_heads, num_kv_heads, world_size, intermediate=96 * world_size):
        needed = {h // group for h in range(p.q_head_start, p.q_head_start + p.num_heads)}
        assert needed == set(range(p.kv_head_start, p.kv_head_start + p.num_kv_heads))


@given(splittable_shapes())
def test_every_kv_head_is_held_by_the_same_number_of_ranks(shape):
    num_heads, num_kv_heads, world_size = shape
    holders = [0] * num_kv_heads
    for p in layouts(num_heads, num_kv_heads, world_size, intermediate=96 * world_size):
        for head in range(p.kv_head_start, p.kv_head_start + p.num_kv_heads):
            holders[head] += 1
    assert set(holders) == {max(1, world_size // num_kv_heads)}


def test_kv_heads_are_replicated_when_ranks_outnumber_them():
    parts = layouts(8, 2, 8)
    assert [p.kv_head_start for p in parts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {(p.num_kv_heads, p.kv_replicas) for p in parts} == {(1, 4)}


def test_single_kv_head_is_held_by_every_rank():
    assert [(p.kv_head_start, p.num_kv_heads) for p in layouts(4, 1, 2)] == [(0, 1), (0, 1)]


def test_mlp_columns_are_split_evenly():
    rows = [owned(p.intermediate_rows()) for p in layouts(8, 2, 4, intermediate=64)]
    assert sum(rows, []) == list(range(64)) and {len(r) for r in rows} == {16}


def test_vocabulary_that_does_not_divide_is_padded_on_the_last_rank():
    parts = layouts(8, 2, 2, vocab=101)
    assert [p.vocab_per_rank for p in parts] == [51, 51]
    assert [owned(p.vocab_rows()) for p in parts] == [list(range(51)), list(range(51, 101))]
    assert parts[1].num_real_vocab_rows == 50 and parts[1].padded_vocab_size == 102


def test_single_rank_owns_everything():
    (p,) = layouts(8, 2, 1, intermediate=64, vocab=101)
    assert (p.num_heads, p.num_kv_heads, p.intermediate_size, p.vocab_per_rank) == (8, 2, 64, 101)


def test_query_heads_not_dividing_by_world_size_is_a_clear_error():
    with pytest.raises(ValueError, match="attention heads do not divide by tensor_parallel_size 3"):
        layouts(8, 2, 3)


def test_kv_heads_not_dividing_by_world_size_is_a_clear_error():
    with pytest.raises(ValueError, match="6 KV heads do not divide by tensor_parallel_size 4"):
        layouts(12, 6, 4)


def test_world_size_not_a_multiple_of_fewer_kv_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be replicated evenly"):
        layouts(12, 4, 6)


def test_intermediate_size_not_dividing_is_a_clear_error():
    with pytest.raises(ValueError, match="intermediate_size 66 does not divide"):
        layouts(8, 2, 4, intermediate=66)


def test_kv_bytes_per_rank_shrink_with_split_heads_but_not_with_replicated_ones(tiny_llama_dir, tiny_qwen2_dir):
    from paged.models.llama import ModelArgs
    from paged.parallel.partition import kv_bytes_per_token_per_rank

    llama, qwen = ModelArgs.from_checkpoint(tiny_llama_dir), ModelArgs.from_checkpoint(tiny_qwen2_dir)
    assert kv_bytes_per_token_per_rank(llama, 2) == llama.kv_bytes_per_token // 2  # 2 KV heads: one each
    assert kv_bytes_per_token_per_rank(qwen, 2) == qwen.kv_bytes_per_token          # 1 KV head: on both
