"""Pinned prefixes and the CPU tier of the prefix cache, at the block manager, by example.

(The state machine in test_block_manager.py drives both at random against a model of the KV
content; these are the rules it relies on, spelled out one at a time.)
"""
from __future__ import annotations

import pytest

from paged.block_manager import BlockManager, CpuHit
from paged.cpu_block_pool import CpuBlockPool
from paged.prefix_cache import PrefixCache, hash_block_tokens

BS = 4


def make_bm(num_blocks=4, num_cpu_blocks=4, num_cpu_prefix_blocks=2) -> BlockManager:
    return BlockManager(num_blocks, num_cpu_blocks, BS, enable_prefix_caching=True,
                        num_cpu_prefix_blocks=num_cpu_prefix_blocks)


def computed_and_freed(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """A finished request: allocated, computed, its full blocks cached, then freed (parked)."""
    bm.allocate_slots(seq_id, 0, len(tokens))
    bm.cache_full_blocks(seq_id, tokens, len(tokens))
    table = list(bm.block_table(seq_id))
    bm.free(seq_id)
    return table


def run_plan(bm: BlockManager) -> tuple[list, list]:
    moves = bm.take_prefix_moves()
    bm.end_plan()
    return moves


def prompt_in_the_cpu_tier(bm: BlockManager) -> None:
    """PROMPT computed and cached, then pushed out of the (4-block) device pool into the tier."""
    computed_and_freed(bm, 1, PROMPT)
    bm.allocate_slots(2, 0, 16)
    run_plan(bm)
    bm.free(2)


PROMPT = list(range(9))        # two full blocks and one token


# ---- construction --------------------------------------------------------------------------------
def test_the_cpu_tier_cannot_be_larger_than_the_cpu_pool():
    with pytest.raises(ValueError, match="num_cpu_prefix_blocks"):
        BlockManager(4, 2, BS, num_cpu_prefix_blocks=3)


def test_the_cpu_tier_needs_prefix_caching():
    with pytest.raises(ValueError, match="needs prefix caching"):
        BlockManager(4, 4, BS, enable_prefix_caching=False, num_cpu_prefix_blocks=2)


# ---- the CPU tier --------------------------------------------------------------------------------
def test_an_evicted_cached_block_moves_to_the_cpu_tier_and_still_hits():
    bm = make_bm()
    table = computed_and_freed(bm, 1, PROMPT)
    bm.allocate_slots(2, 0, 16)                      # the whole pool: both cached blocks are evicted
    offloads, loads = run_plan(bm)
    assert sorted(src for src, _ in offloads) == sorted(table[:2]) and loads == []
    hits = bm.find_cached_prefix(PROMPT)
    assert all(isinstance(h, CpuHit) for h in hits) and len(hits) == 2
    assert {h.cpu_block_id for h in hits} == {cpu for _, cpu in offloads}
    bm.check_invariants()


def test_without_the_tier_an_evicted_block_is_dropped():
    bm = make_bm(num_cpu_prefix_blocks=0)
    computed_and_freed(bm, 1, PROMPT)
    bm.allocate_slots(2, 0, 16)
    assert run_plan(bm) == ([], [])
    assert bm.find_cached_prefix(PROMPT) == []


def test_a_cpu_tier_hit_loads_the_block_into_a_fresh_device_block_cached_again():
    bm = make_bm()
    prompt_in_the_cpu_tier(bm)
    hits = bm.find_cached_prefix(PROMPT)
    assert bm.allocate_slots(3, 8, 1, new_computed_blocks=hits) == []
    table = bm.block_table(3)
    offloads, loads = bm.take_prefix_moves()
    assert loads == [(h.cpu_block_id, b) for h, b in zip(hits, table[:2])]
    assert bm.find_cached_prefix(PROMPT) == table[:2], "the hash now names the device copy"
    assert bm.cpu_hit_tokens == 8
    assert bm.cpu_pool.num_cached == 0, "a loaded block leaves the tier"
    bm.check_invariants()


def test_a_cpu_block_a_plan_reads_is_not_reused_before_the_plan_ran():
    bm = make_bm(num_cpu_blocks=2, num_cpu_prefix_blocks=2)
    prompt_in_the_cpu_tier(bm)
    hits = bm.find_cached_prefix(PROMPT)
    bm.allocate_slots(3, 8, 1, new_computed_blocks=hits)
    assert bm.num_free_cpu_blocks == 0, "both CPU blocks are still to be copied out"
    run_plan(bm)
    assert bm.num_free_cpu_blocks == 2
    bm.check_invariants()


def test_the_tier_holds_at_most_its_share_and_forgets_its_least_recently_offloaded_block():
    bm = make_bm(num_blocks=2, num_cpu_blocks=4, num_cpu_prefix_blocks=1)
    first = computed_and_freed(bm, 1, [1] * 4 + [0])
    bm.allocate_slots(2, 0, 8)                        # evicts the cached block: into the tier
    bm.free(2)
    assert bm.cpu_pool.num_cached == 1
    computed_and_freed(bm, 3, [2] * 4 + [0])
    bm.allocate_slots(4, 0, 8)                        # evicts the second one: the first leaves the tier
    offloads, _ = run_plan(bm)
    assert bm.cpu_pool.num_cached == 1
    assert bm.find_cached_prefix([1] * 4 + [0]) == [] and len(bm.find_cached_prefix([2] * 4 + [0])) == 1
    assert first and bm.num_free_cpu_blocks == 4, "tier blocks count as free for swapping"
    bm.check_invariants()


def test_a_swap_out_takes_tier_blocks_when_the_cpu_pool_is_otherwise_full():
    bm = make_bm(num_blocks=4, num_cpu_blocks=2, num_cpu_prefix_blocks=2)
    computed_and_freed(bm, 1, PROMPT)
    bm.allocate_slots(2, 0, 16)                       # both cached blocks go to the tier: the pool is full
    run_plan(bm)
    assert bm.cpu_pool.num_cached == 2 and bm.can_swap_out([2]) is False  # 4 blocks > 2
    bm.free(2)
    bm.allocate_slots(3, 0, 8)
    assert bm.can_swap_out([3]), "tier blocks never stand in the way of a swap-out"
    bm.swap_out([3])
    assert bm.cpu_pool.num_cached == 0 and bm.find_cached_prefix(PROMPT) == []
    bm.check_invariants()


def test_an_offload_into_a_block_a_swap_out_takes_in_the_same_plan_is_dropped():
    bm = make_bm(num_blocks=4, num_cpu_blocks=2, num_cpu_prefix_blocks=2)
    bm.allocate_slots(1, 0, 8)                        # a running sequence, two blocks
    computed_and_freed(bm, 2, [7] * 8 + [0])          # two cached blocks, parked
    bm.allocate_slots(3, 0, 8)                        # evicts both: two offloads in this plan
    swap = bm.swap_out([1])                           # needs both CPU blocks: takes them from the tier
    offloads, _ = bm.take_prefix_moves()
    assert offloads == [], "the swap-out's content wins; copying the evicted blocks there would clobber it"
    assert sorted(cpu for _, cpu in swap) == [0, 1]
    run_plan(bm)
    bm.check_invariants()


def test_a_block_computed_again_on_the_device_replaces_its_cpu_copy():
    bm = make_bm()
    prompt_in_the_cpu_tier(bm)
    bm.allocate_slots(3, 0, 9)                        # the same prompt computed without a hit
    bm.cache_full_blocks(3, PROMPT, 9)
    assert bm.find_cached_prefix(PROMPT) == bm.block_table(3)[:2]
    assert bm.cpu_pool.num_cached == 0 and bm.num_free_cpu_blocks == 4
    bm.check_invariants()


def test_a_failed_plan_forgets_the_blocks_its_moves_were_to_fill():
    bm = make_bm()
    computed_and_freed(bm, 1, PROMPT)
    bm.allocate_slots(2, 0, 16)
    bm.drop_prefix_moves(*bm.take_prefix_moves())     # the offloads never ran
    assert bm.find_cached_prefix(PROMPT) == [] and bm.cpu_pool.num_cached == 0
    bm.free(2)
    bm.check_invariants()


def test_a_failed_plan_forgets_the_device_copies_its_loads_were_to_fill():
    bm = make_bm()
    prompt_in_the_cpu_tier(bm)
    bm.allocate_slots(3, 8, 1, new_computed_blocks=bm.find_cached_prefix(PROMPT))
    bm.drop_prefix_moves(*bm.take_prefix_moves())     # the loads never ran
    bm.free(3)
    assert bm.find_cached_prefix(PROMPT) == []
    bm.check_invariants()
    assert bm.num_free_blocks == 4 and bm.num_free_cpu_blocks == 4


def test_cpu_pool_swap_blocks_come_from_the_free_list_before_the_tier():
    pool = CpuBlockPool(num_blocks=3, num_prefix_blocks=2)
    pool.offload(device_block_id=5, block_hash=hash_block_tokens(None, [1]))
    taken = pool.take()
    assert pool.num_cached == 1 and pool.ref_counts[taken] == 1
    pool.check_invariants([1 if b == taken else 0 for b in range(3)], PrefixCache())


# ---- pinned prefixes -----------------------------------------------------------------------------
def test_a_pinned_prefix_holds_its_full_cached_blocks():
    bm = make_bm(num_blocks=8)
    table = computed_and_freed(bm, 1, PROMPT)
    assert bm.pin_prefix("system", PROMPT) == 8
    assert bm.pins["system"] == table[:2]
    assert [bm.ref_counts[b] for b in table[:2]] == [1, 1] and bm.num_pinned_blocks == 2
    assert bm.prefix_cache.num_evictable == 0
    bm.check_invariants()


def test_eviction_never_takes_a_pinned_block():
    bm = make_bm(num_blocks=4)
    computed_and_freed(bm, 1, PROMPT)
    bm.pin_prefix("system", PROMPT)
    assert bm.num_free_blocks == 2
    assert bm.allocate_slots(2, 0, 12) is None, "three blocks wanted, two unpinned"
    bm.allocate_slots(2, 0, 8)
    bm.free(2)
    assert len(bm.find_cached_prefix(PROMPT)) == 2
    bm.check_invariants()


def test_unpinning_makes_the_blocks_evictable_again():
    bm = make_bm(num_blocks=4, num_cpu_prefix_blocks=0)
    computed_and_freed(bm, 1, PROMPT)
    bm.pin_prefix("system", PROMPT)
    assert bm.unpin_prefix("system") == 8
    assert bm.num_free_blocks == 4 and bm.prefix_cache.num_evictable == 2
    bm.allocate_slots(2, 0, 16)
    assert bm.find_cached_prefix(PROMPT) == []
    bm.check_invariants()


def test_a_request_behind_a_pinned_prefix_shares_its_blocks_and_counts_as_its_hit():
    bm = make_bm(num_blocks=8)
    computed_and_freed(bm, 1, PROMPT)
    bm.pin_prefix("system", PROMPT)
    request = PROMPT[:8] + [20, 21, 22]
    hits = bm.find_cached_prefix(request)
    bm.allocate_slots(2, 8, 3, new_computed_blocks=hits)
    assert bm.block_table(2)[:2] == bm.pins["system"]
    assert [bm.ref_counts[b] for b in hits] == [2, 2]
    assert bm.pin_hit_tokens["system"] == 8
    bm.free(2)
    assert bm.num_pinned_blocks == 2 and bm.prefix_cache.num_evictable == 0
    bm.check_invariants()


def test_pinning_the_same_key_again_changes_nothing():
    bm = make_bm(num_blocks=8)
    computed_and_freed(bm, 1, PROMPT)
    bm.pin_prefix("system", PROMPT)
    refs = list(bm.ref_counts)
    assert bm.pin_prefix("system", PROMPT) == 8
    assert bm.ref_counts == refs


def test_overlapping_pins_share_blocks_and_count_them_once():
    bm = make_bm(num_blocks=8)
    longer = PROMPT[:8] + [30, 31, 32, 33, 34]
    computed_and_freed(bm, 1, longer)
    assert bm.num_pinned_blocks_with(PROMPT) == 2
    bm.pin_prefix("one-shot", PROMPT)
    assert bm.num_pinned_blocks_with(longer) == 3, "the shared two blocks count once"
    bm.pin_prefix("five-shot", longer)
    assert bm.num_pinned_blocks == 3
    bm.unpin_prefix("five-shot")
    assert bm.num_pinned_blocks == 2 and bm.prefix_cache.num_evictable == 1
    bm.check_invariants()


def test_only_blocks_cached_on_the_device_are_pinned():
    bm = make_bm(num_blocks=8)
    assert bm.pin_prefix("never computed", PROMPT) == 0
    assert bm.num_pinned_blocks == 0


def test_a_max_length_sequence_fits_in_the_room_the_bound_leaves():
    bm = make_bm(num_blocks=64)
    for max_model_len in (5, 16, 33):
        room = bm.max_blocks_for_one_sequence(max_model_len)
        for prompt_len in range(1, max_model_len):
            assert bm.blocks_for_request(prompt_len, max_model_len - prompt_len, 1) <= room


# ---- sharing counts ------------------------------------------------------------------------------
def test_sharing_counts_distinct_blocks_held_and_what_unshared_tables_would_hold():
    bm = make_bm(num_blocks=8)
    bm.allocate_slots(1, 0, 6)
    bm.fork(1, 2)
    bm.fork(1, 3)
    assert bm.sharing_counts() == (2, 6)
    bm.allocate_slots(3, 6, 1)                        # copy-on-write of the partial block
    assert bm.sharing_counts() == (3, 6)
