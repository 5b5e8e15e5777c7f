"""Prefix cache: chain hashes of full blocks, the LRU of parked blocks, hit accounting, and
BlockManager.find_cached_prefix / allocate_slots(new_computed_blocks=...) on top of it."""
from __future__ import annotations

import random

import pytest

from paged.block_manager import BlockManager
from paged.prefix_cache import PrefixCache, hash_block_tokens

BS = 4


def computed_sequence(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """Allocate, 'compute' and register a sequence the way the engine does; returns its table."""
    bm.allocate_slots(seq_id, 0, len(tokens))
    bm.cache_full_blocks(seq_id, tokens, len(tokens))
    return list(bm.block_table(seq_id))


def make_bm(num_blocks=16, prefix_caching=True) -> BlockManager:
    return BlockManager(num_blocks, 4, BS, enable_prefix_caching=prefix_caching)


# ---- hashing -------------------------------------------------------------------------------------
def test_block_hash_depends_on_the_tokens_and_on_the_parent():
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    parent_a, parent_b = hash_block_tokens(None, [7]), hash_block_tokens(None, [8])
    assert hash_block_tokens(parent_a, [1, 2]) != hash_block_tokens(parent_b, [1, 2])


def test_the_same_block_tokens_after_a_different_prefix_do_not_hit():
    bm = make_bm()
    shared_block = [5, 6, 7, 8]
    computed_sequence(bm, 1, [1, 1, 1, 1] + shared_block + [9])
    assert len(bm.find_cached_prefix([1, 1, 1, 1] + shared_block + [9])) == 2
    assert bm.find_cached_prefix([2, 2, 2, 2] + shared_block + [9]) == [], \
        "the second block's hash names its whole prefix, not only its own tokens"


def test_a_differing_block_stops_the_hit_run_even_if_later_blocks_match():
    bm = make_bm()
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    table = computed_sequence(bm, 1, a + b + c + [0])
    assert bm.find_cached_prefix(a + [0, 0, 0, 0] + c + [0]) == table[:1]


def test_a_shared_prefix_hits_every_cached_full_block_it_covers():
    bm = make_bm()
    prompt = list(range(1, 14))                      # 3 full blocks + 1 token
    table = computed_sequence(bm, 1, prompt)
    assert bm.find_cached_prefix(prompt) == table[:3]
    assert bm.find_cached_prefix(prompt[:9] + [99, 98]) == table[:2]


def test_partly_filled_blocks_are_never_cached():
    bm = make_bm()
    prompt = [1, 2, 3, 4, 5, 6]
    table = computed_sequence(bm, 1, prompt)
    assert bm.prefix_cache.hash_of(table[0]) is not None
    assert bm.prefix_cache.hash_of(table[1]) is None
    assert bm.find_cached_prefix([1, 2, 3, 4, 5, 6, 0, 0, 0]) == table[:1]


def test_only_computed_blocks_are_registered():
    bm = make_bm()
    tokens = list(range(12))
    bm.allocate_slots(1, 0, 12)
    bm.cache_full_blocks(1, tokens, num_computed_tokens=5)   # a chunked prefill, one block done
    assert bm.find_cached_prefix(tokens + [0]) == bm.block_table(1)[:1]
    bm.cache_full_blocks(1, tokens, num_computed_tokens=12)
    assert bm.find_cached_prefix(tokens + [0]) == bm.block_table(1)


@pytest.mark.parametrize("num_blocks_in_prompt", [1, 2, 3])
def test_the_last_token_of_a_fully_cached_prompt_is_always_left_to_compute(num_blocks_in_prompt):
    bm = make_bm()
    prompt = list(range(100, 100 + num_blocks_in_prompt * BS))   # ends exactly on a block boundary
    table = computed_sequence(bm, 1, prompt)
    hits = bm.find_cached_prefix(prompt)
    assert hits == table[:num_blocks_in_prompt - 1], "the block holding the last token is recomputed"
    assert len(hits) * BS < len(prompt)


def test_a_single_token_prompt_never_hits():
    bm = make_bm()
    computed_sequence(bm, 1, [3, 3, 3, 3, 3])
    assert bm.find_cached_prefix([3]) == []


def test_a_disabled_cache_never_hits_and_frees_blocks_outright():
    bm = make_bm(num_blocks=4, prefix_caching=False)
    prompt = list(range(9))
    computed_sequence(bm, 1, prompt)
    assert bm.find_cached_prefix(prompt) == []
    bm.free(1)
    assert bm.prefix_cache.num_evictable == 0 and len(bm.free_block_ids) == 4
    bm.check_invariants()


def test_first_writer_wins_and_a_duplicate_block_stays_unnamed():
    bm = make_bm()
    prompt = [4, 4, 4, 4, 1]
    first = computed_sequence(bm, 1, prompt)
    second = computed_sequence(bm, 2, prompt)             # same content computed again (no hit taken)
    assert first[0] != second[0]
    assert bm.prefix_cache.hash_of(second[0]) is None
    assert bm.find_cached_prefix(prompt) == first[:1]
    bm.free(2)
    assert second[0] not in bm.prefix_cache.evictable_block_ids(), "an unnamed block goes to the free list"
    bm.check_invariants()


# ---- parking, taking back, eviction --------------------------------------------------------------
def test_a_freed_cached_block_is_parked_and_still_hits():
    bm = make_bm()
    prompt = list(range(9))
    table = computed_sequence(bm, 1, prompt)
    free_before = bm.num_free_blocks
    bm.free(1)
    assert sorted(bm.prefix_cache.evictable_block_ids()) == sorted(table[:2])
    assert bm.num_free_blocks == free_before + 3, "parked blocks count as free"
    assert bm.find_cached_prefix(prompt) == table[:2]
    bm.check_invariants()


def test_taking_a_parked_block_back_unparks_it_and_holds_it():
    bm = make_bm()
    prompt = list(range(9))
    table = computed_sequence(bm, 1, prompt)
    bm.free(1)
    hits = bm.find_cached_prefix(prompt)
    free_before = bm.num_free_blocks
    assert bm.allocate_slots(2, len(hits) * BS, len(prompt) - len(hits) * BS, new_computed_blocks=hits) == []
    assert bm.block_table(2)[:2] == table[:2] and len(bm.block_table(2)) == 3
    assert bm.prefix_cache.num_evictable == 0
    assert [bm.ref_counts[b] for b in hits] == [1, 1]
    assert bm.num_free_blocks == free_before - 3, "two parked hits taken back plus one fresh block"
    bm.check_invariants()


def test_taking_a_live_cached_block_shares_it_without_using_a_free_block():
    bm = make_bm()
    prompt = list(range(9))
    table = computed_sequence(bm, 1, prompt)
    hits = bm.find_cached_prefix(prompt)
    free_before = bm.num_free_blocks
    bm.allocate_slots(2, len(hits) * BS, 1, new_computed_blocks=hits)
    assert [bm.ref_counts[b] for b in table[:2]] == [2, 2]
    assert bm.num_free_blocks == free_before - 1, "only the block for the new token is taken"
    bm.check_invariants()


def test_a_sequence_started_from_hits_registers_only_its_new_blocks():
    bm = make_bm()
    prompt = list(range(9))
    computed_sequence(bm, 1, prompt)
    longer = prompt[:8] + [50, 51, 52, 53, 54]
    hits = bm.find_cached_prefix(longer)
    bm.allocate_slots(2, 8, len(longer) - 8, new_computed_blocks=hits)
    bm.cache_full_blocks(2, longer, len(longer))
    assert bm.find_cached_prefix(longer + [0]) == bm.block_table(2)[:3]
    bm.check_invariants()


def test_allocation_from_hits_that_does_not_fit_changes_nothing():
    bm = BlockManager(num_blocks=4, num_cpu_blocks=0, block_size=BS)
    prompt = list(range(9))
    computed_sequence(bm, 1, prompt)
    bm.free(1)
    hits = bm.find_cached_prefix(prompt + list(range(20, 31)))
    assert len(hits) == 2
    before = (list(bm.ref_counts), bm.prefix_cache.num_evictable, bm.num_free_blocks)
    assert bm.allocate_slots(2, 8, 12, new_computed_blocks=hits) is None, "needs 3 more blocks, 2 are free"
    assert (list(bm.ref_counts), bm.prefix_cache.num_evictable, bm.num_free_blocks) == before
    assert not bm.has_table(2)
    bm.check_invariants()


def test_prefix_cache_evicts_in_the_order_blocks_were_parked():
    cache = PrefixCache()
    for block_id in (10, 11, 12):
        cache.register(hash_block_tokens(None, [block_id]), block_id)
    for block_id in (11, 12, 10):
        assert cache.park(block_id)
    assert [cache.evict_lru() for _ in range(3)] == [11, 12, 10]
    assert cache.evict_lru() is None


def test_an_evicted_block_loses_its_name():
    cache = PrefixCache()
    h = hash_block_tokens(None, [1, 2])
    cache.register(h, 7)
    cache.park(7)
    assert cache.evict_lru() == 7
    assert cache.lookup(h) is None and cache.hash_of(7) is None
    cache.check_invariants()


def test_unparking_removes_a_block_from_the_eviction_order():
    cache = PrefixCache()
    for block_id in (1, 2, 3):
        cache.register(hash_block_tokens(None, [block_id]), block_id)
        cache.park(block_id)
    cache.unpark(1)
    assert cache.num_evictable == 2
    assert cache.evict_lru() == 2
    assert cache.lookup(hash_block_tokens(None, [1])) == 1, "an unparked block keeps its name"


def test_a_re_parked_block_goes_to_the_back_of_the_eviction_order():
    cache = PrefixCache()
    for block_id in (1, 2):
        cache.register(hash_block_tokens(None, [block_id]), block_id)
        cache.park(block_id)
    cache.unpark(1)
    cache.park(1)
    assert [cache.evict_lru(), cache.evict_lru()] == [2, 1]


def test_parking_an_unnamed_block_is_refused():
    cache = PrefixCache()
    assert cache.park(3) is False
    assert cache.num_evictable == 0


def test_register_is_first_writer_wins_for_hashes_and_blocks():
    cache = PrefixCache()
    h1, h2 = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    cache.register(h1, 5)
    cache.register(h1, 6)      # same content in another block: ignored
    cache.register(h2, 5)      # a named block is not renamed
    assert cache.lookup(h1) == 5 and cache.hash_of(6) is None and cache.lookup(h2) is None
    cache.check_invariants()


def test_eviction_under_pressure_keeps_the_most_recently_used_prefix():
    bm = make_bm(num_blocks=4)
    old, recent = [1] * 4 + [0], [2] * 4 + [0]
    computed_sequence(bm, 1, old)
    computed_sequence(bm, 2, recent)
    bm.free(1)
    bm.free(2)                              # parked after the old one
    bm.allocate_slots(3, 0, 12)             # 2 never-used blocks + 1 eviction
    assert bm.find_cached_prefix(old) == []
    assert len(bm.find_cached_prefix(recent)) == 1
    bm.check_invariants()


# ---- hit-rate accounting -------------------------------------------------------------------------
def test_hit_rate_is_zero_before_any_query():
    assert PrefixCache().hit_rate == 0.0


def test_hit_rate_is_hit_tokens_over_queried_tokens():
    cache = PrefixCache()
    cache.record_query(10, 8)
    cache.record_query(30, 0)
    assert (cache.queried_tokens, cache.hit_tokens) == (40, 8)
    assert cache.hit_rate == pytest.approx(0.2)


def test_hit_rate_over_random_queries_matches_the_sums():
    rng = random.Random(1234)
    cache = PrefixCache()
    queried = hits = 0
    for _ in range(200):
        q = rng.randint(1, 64)
        h = rng.randint(0, q - 1)
        cache.record_query(q, h)
        queried, hits = queried + q, hits + h
    assert cache.hit_rate == pytest.approx(hits / queried)
    assert 0.0 <= cache.hit_rate < 1.0


def test_pop_lru_says_which_hash_the_evicted_block_held():
    cache = PrefixCache()
    h = hash_block_tokens(None, [4, 5])
    cache.register(h, 3)
    cache.park(3)
    assert cache.pop_lru() == (3, h)
    assert cache.pop_lru() is None and cache.num_cached == 0


def test_forget_drops_a_name_held_or_parked():
    cache = PrefixCache()
    held, parked = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    cache.register(held, 1)
    cache.register(parked, 2)
    cache.park(2)
    assert cache.forget(1) == held and cache.forget(2) == parked
    assert cache.num_evictable == 0 and cache.lookup(held) is None and cache.lookup(parked) is None
    assert cache.forget(1) is None, "forgetting an unnamed block is a no-op"
    cache.check_invariants()
