"""BlockManager: ref counts, fork, copy-on-write, swap and the prefix cache, as a specification.

The state machine drives long random runs of every operation against a model of what each
sequence's KV holds (the token written into every slot of every device and CPU block), so that a
lost copy-on-write, a wrong swap mapping or a reused block that someone still reads shows up as a
sequence whose stored tokens differ from its real tokens. ``check_invariants`` runs after every step.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged.block_manager import BlockManager

BS = 4                 # block size
NUM_BLOCKS = 16        # small pool: exhaustion and eviction happen often
NUM_CPU_BLOCKS = 10    # smaller swap pool: can_swap_out is sometimes False
MAX_SEQS = 7
MAX_LEN = 5 * BS
VOCAB = 3              # tiny vocabulary: equal prefixes (prefix-cache hits) are common


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BS)


def tokens_st(min_size: int, max_size: int):
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=max_size)


class BlockManagerMachine(RuleBasedStateMachine):
    """Every live sequence is fully computed: its table covers exactly its tokens."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, NUM_CPU_BLOCKS, BS, enable_prefix_caching=True)
        self.tokens: dict[int, list[int]] = {}   # every live sequence (on the device or swapped)
        self.swapped: set[int] = set()
        self.gpu: dict[int, list] = {}           # device block -> the token in each slot
        self.cpu: dict[int, list] = {}           # cpu block -> the token in each slot
        self.history: list[list[int]] = []       # token lists seen, to build prompts sharing prefixes
        self.next_seq_id = 0

    # ---- model helpers ----------------------------------------------------------------------
    @property
    def running(self) -> list[int]:
        return sorted(s for s in self.tokens if s not in self.swapped)

    @property
    def swapped_ids(self) -> list[int]:
        return sorted(self.swapped)

    def holders(self, block_id: int) -> int:
        return sum(self.bm.block_table(s).count(block_id) for s in self.running)

    def new_seq_id(self) -> int:
        self.next_seq_id += 1
        return self.next_seq_id

    def remember(self, tokens: list[int]) -> None:
        self.history.append(list(tokens))
        del self.history[:-20]

    def write(self, seq_id: int, start: int) -> None:
        """The model computes tokens[start:] of the sequence into its blocks."""
        table = self.bm.block_table(seq_id)
        toks = self.tokens[seq_id]
        for pos in range(start, len(toks)):
            block_id = table[pos // BS]
            assert self.bm.ref_counts[block_id] == 1, f"seq {seq_id} writes into shared block {block_id}"
            assert self.bm.prefix_cache.hash_of(block_id) is None, f"seq {seq_id} writes into cached block {block_id}"
            self.gpu.setdefault(block_id, [None] * BS)[pos % BS] = toks[pos]

    @staticmethod
    def stored(table: list[int], store: dict[int, list], num_tokens: int) -> list:
        return [store.get(table[p // BS], [None] * BS)[p % BS] for p in range(num_tokens)]

    def maybe_register(self, data, seq_id: int) -> None:
        """Like the engine after a step, usually name the sequence's full blocks in the cache."""
        if data.draw(st.integers(0, 3), label="register") > 0:
            toks = self.tokens[seq_id]
            self.bm.cache_full_blocks(seq_id, toks, len(toks))
            self.remember(toks)

    # ---- rules ------------------------------------------------------------------------------
    @initialize(data=st.data())
    def start_with_two_sequences(self, data):
        for _ in range(2):
            self.add_sequence(data, use_prefix_cache=True)

    @precondition(lambda self: len(self.tokens) < MAX_SEQS)
    @rule(data=st.data(), use_prefix_cache=st.booleans())
    def add_sequence(self, data, use_prefix_cache):
        if self.history and data.draw(st.booleans(), label="share a prefix"):
            base = data.draw(st.sampled_from(self.history), label="base")
            cut = len(base) - data.draw(st.integers(0, len(base)), label="drop")  # simplest: all of it
            prompt = base[:cut] + data.draw(tokens_st(0, BS), label="tail")
        else:
            prompt = data.draw(tokens_st(1, 3 * BS), label="prompt")
        prompt = prompt[:3 * BS] or [0]
        seq_id = self.new_seq_id()
        bm = self.bm

        hits = bm.find_cached_prefix(prompt) if use_prefix_cache else []
        assert len(hits) <= (len(prompt) - 1) // BS, "the last prompt token must be left to compute"
        assert len(set(hits)) == len(hits)
        for i, block_id in enumerate(hits):
            assert self.gpu[block_id] == prompt[i * BS:(i + 1) * BS], "a prefix hit holds other tokens"
        parked_hits = sum(1 for b in hits if bm.ref_counts[b] == 0)
        free_after = bm.num_free_blocks - parked_hits
        needed = blocks_for(len(prompt)) - len(hits)
        if not hits:
            assert bm.can_allocate(seq_id, 0, len(prompt)) == (needed <= bm.num_free_blocks)
        computed = len(hits) * BS
        before = (list(bm.ref_counts), bm.num_free_blocks)
        copies = bm.allocate_slots(seq_id, computed, len(prompt) - computed, new_computed_blocks=hits)
        if needed > free_after:
            # the pool cannot take it now (the scheduler would leave it waiting): nothing changed
            assert copies is None and (list(bm.ref_counts), bm.num_free_blocks) == before
            assert not bm.has_table(seq_id)
            return
        assert copies == [], "a fresh table never needs copy-on-write"
        table = bm.block_table(seq_id)
        assert table[:len(hits)] == hits
        assert len(table) == blocks_for(len(prompt))
        self.tokens[seq_id] = list(prompt)
        self.write(seq_id, computed)
        self.remember(prompt)
        self.maybe_register(data, seq_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), num_new=st.integers(1, 2 * BS))
    def append_tokens(self, data, num_new):
        seq_id = data.draw(st.sampled_from(self.running), label="seq")
        toks = self.tokens[seq_id]
        num_new = min(num_new, MAX_LEN - len(toks))
        if num_new <= 0:
            return
        bm = self.bm
        computed = len(toks)
        old_table = list(bm.block_table(seq_id))
        index = computed // BS
        shared_partial = computed % BS != 0 and self.holders(old_table[index]) > 1
        needed = blocks_for(computed + num_new) - len(old_table) + int(shared_partial)
        assert bm.num_blocks_needed(seq_id, computed, num_new) == needed
        if needed > bm.num_free_blocks:
            assert not bm.can_allocate(seq_id, computed, num_new)
            return
        assert bm.can_allocate(seq_id, computed, num_new)

        copies = bm.allocate_slots(seq_id, computed, num_new)
        table = bm.block_table(seq_id)
        assert len(table) == blocks_for(computed + num_new)
        if shared_partial:
            src, dst = old_table[index], table[index]
            assert copies == [(src, dst)], "a write into a shared partial block copies exactly that block"
            assert dst != src and self.holders(dst) == 1
            assert table[:index] == old_table[:index]
            self.gpu[dst] = list(self.gpu[src])  # what the cache engine does with the copy pair
        else:
            assert copies == []
            assert table[:len(old_table)] == old_table
        toks.extend(data.draw(tokens_st(num_new, num_new), label="new tokens"))
        self.write(seq_id, computed)
        self.maybe_register(data, seq_id)

    @precondition(lambda self: self.running and len(self.tokens) < MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.running), label="parent")
        child = self.new_seq_id()
        before = list(self.bm.ref_counts)
        table = self.bm.block_table(parent)
        self.bm.fork(parent, child)
        assert self.bm.block_table(child) == table
        for block_id in range(NUM_BLOCKS):
            assert self.bm.ref_counts[block_id] == before[block_id] + table.count(block_id)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
        self.bm.free(seq_id)
        assert not self.bm.has_table(seq_id) and seq_id not in self.bm.cpu_block_tables
        del self.tokens[seq_id]
        self.swapped.discard(seq_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def swap_out(self, data):
        seq_ids = data.draw(st.lists(st.sampled_from(self.running), min_size=1, unique=True), label="seqs")
        bm = self.bm
        before = {s: list(bm.block_table(s)) for s in seq_ids}
        distinct = {b for table in before.values() for b in table}
        if not bm.can_swap_out(seq_ids):
            assert len(distinct) > bm.num_free_cpu_blocks
            return
        copies = bm.swap_out(seq_ids)
        assert len(copies) == len(distinct), "a block shared within the swapped set moves once"
        assert {src for src, _ in copies} == distinct
        assert len({dst for _, dst in copies}) == len(copies)
        mapping = dict(copies)
        for s in seq_ids:
            assert not bm.has_table(s)
            assert bm.cpu_block_tables[s] == [mapping[b] for b in before[s]]
        for src, dst in copies:
            self.cpu[dst] = list(self.gpu[src])
        self.swapped.update(seq_ids)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seq_ids = data.draw(st.lists(st.sampled_from(self.swapped_ids), min_size=1, unique=True), label="seqs")
        bm = self.bm
        before = {s: list(bm.cpu_block_tables[s]) for s in seq_ids}
        distinct = {b for table in before.values() for b in table}
        assert bm.num_blocks_to_swap_in(seq_ids) == len(distinct)
        if len(distinct) > bm.num_free_blocks:
            return
        copies = bm.swap_in(seq_ids)
        assert len(copies) == len(distinct), "a cpu block shared within the set comes back once"
        assert {src for src, _ in copies} == distinct
        assert len({dst for _, dst in copies}) == len(copies)
        mapping = dict(copies)
        for s in seq_ids:
            assert s not in bm.cpu_block_tables
            assert bm.block_table(s) == [mapping[c] for c in before[s]]
            assert len(bm.block_table(s)) == blocks_for(len(self.tokens[s]))
        for src, dst in copies:
            self.gpu[dst] = list(self.cpu[src])
        self.swapped.difference_update(seq_ids)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def register_full_blocks(self, data):
        seq_id = data.draw(st.sampled_from(self.running), label="seq")
        toks = self.tokens[seq_id]
        self.bm.cache_full_blocks(seq_id, toks, len(toks))
        for i, block_id in enumerate(self.bm.block_table(seq_id)[:len(toks) // BS]):
            block_hash = self.bm.prefix_cache.hash_of(block_id)
            if block_hash is not None:
                assert self.bm.prefix_cache.lookup(block_hash) == block_id
        self.remember(toks)

    # ---- checks -----------------------------------------------------------------------------
    @invariant()
    def pool_is_consistent(self):
        bm = self.bm
        bm.check_invariants()
        for s in self.running:
            table = bm.block_table(s)
            assert len(table) == blocks_for(len(self.tokens[s]))
            assert self.stored(table, self.gpu, len(self.tokens[s])) == self.tokens[s], f"seq {s} KV corrupted"
        for s in self.swapped:
            assert not bm.has_table(s)
            table = bm.cpu_block_tables[s]
            assert len(table) == blocks_for(len(self.tokens[s]))
            assert self.stored(table, self.cpu, len(self.tokens[s])) == self.tokens[s], f"swapped seq {s} corrupted"
        used = {b for s in self.running for b in bm.block_table(s)}
        assert bm.num_free_blocks == NUM_BLOCKS - len(used)
        # every cached block still holds the tokens its hash names: re-derive them from a live prompt
        for s in self.running:
            hits = bm.find_cached_prefix(self.tokens[s] + [0])
            for i, block_id in enumerate(hits):
                assert self.gpu[block_id] == self.tokens[s][i * BS:(i + 1) * BS]

    def teardown(self):
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == NUM_BLOCKS, "blocks leaked"
        assert self.bm.num_free_cpu_blocks == NUM_CPU_BLOCKS, "cpu blocks leaked"
        assert all(c == 0 for c in self.bm.ref_counts) and all(c == 0 for c in self.bm.cpu_ref_counts)
        assert not self.bm.block_tables and not self.bm.cpu_block_tables


BlockManagerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=50, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBlockManagerStateMachine = BlockManagerMachine.TestCase


# ---- examples -----------------------------------------------------------------------------------
def make_bm(num_blocks=8, num_cpu_blocks=8, block_size=4, prefix_caching=True) -> BlockManager:
    return BlockManager(num_blocks, num_cpu_blocks, block_size, enable_prefix_caching=prefix_caching)


def test_constructor_rejects_non_positive_sizes():
    for args in [(0, 4, 4), (4, 4, 0), (4, -1, 4), (-3, 4, 4)]:
        with pytest.raises(ValueError):
            BlockManager(*args)


def test_a_new_sequence_gets_ceil_tokens_over_block_size_blocks():
    bm = make_bm()
    assert bm.allocate_slots(1, 0, 9) == []
    assert len(bm.block_table(1)) == 3
    assert bm.num_free_blocks == 5
    bm.check_invariants()


def test_fork_shares_every_block_and_counts_each_holder():
    bm = make_bm()
    bm.allocate_slots(1, 0, 6)
    bm.fork(1, 2)
    bm.fork(1, 3)
    assert bm.block_table(2) == bm.block_table(3) == bm.block_table(1)
    assert [bm.ref_counts[b] for b in bm.block_table(1)] == [3, 3]
    assert bm.num_free_blocks == 6, "forking takes no new blocks"
    bm.check_invariants()


def test_append_into_shared_partial_block_copies_it_for_the_writer():
    bm = make_bm()
    bm.allocate_slots(1, 0, 6)          # block 0 full, block 1 holds 2 of 4 slots
    bm.fork(1, 2)
    shared_full, shared_partial = bm.block_table(1)
    assert bm.num_blocks_needed(2, 6, 1) == 1
    copies = bm.allocate_slots(2, 6, 1)
    new_last = bm.block_table(2)[1]
    assert copies == [(shared_partial, new_last)]
    assert new_last not in (shared_full, shared_partial)
    assert bm.block_table(2)[0] == shared_full, "the full block stays shared"
    assert bm.ref_counts[shared_full] == 2 and bm.ref_counts[shared_partial] == 1 and bm.ref_counts[new_last] == 1
    bm.check_invariants()


def test_last_holder_of_a_formerly_shared_block_writes_in_place():
    bm = make_bm()
    bm.allocate_slots(1, 0, 6)
    bm.fork(1, 2)
    bm.allocate_slots(2, 6, 1)          # the child copies; the parent is now the only holder
    parent_last = bm.block_table(1)[1]
    assert bm.num_blocks_needed(1, 6, 1) == 0
    assert bm.allocate_slots(1, 6, 1) == []
    assert bm.block_table(1)[1] == parent_last


def test_append_at_a_block_boundary_of_a_shared_table_needs_no_copy():
    bm = make_bm()
    bm.allocate_slots(1, 0, 8)          # two full blocks
    bm.fork(1, 2)
    before = list(bm.block_table(2))
    assert bm.allocate_slots(2, 8, 1) == []
    assert bm.block_table(2)[:2] == before and len(bm.block_table(2)) == 3
    bm.check_invariants()


def test_copy_on_write_with_growth_needs_the_copy_plus_the_new_blocks():
    bm = make_bm()
    bm.allocate_slots(1, 0, 6)
    bm.fork(1, 2)
    assert bm.num_blocks_needed(2, 6, 7) == 1 + 2   # copy of block 1, then blocks 2 and 3
    copies = bm.allocate_slots(2, 6, 7)
    assert len(copies) == 1 and len(bm.block_table(2)) == 4
    bm.check_invariants()


@pytest.mark.parametrize("k", [2, 3, 5])
def test_swap_out_moves_a_block_shared_by_k_sequences_once(k):
    bm = make_bm(num_blocks=8, num_cpu_blocks=4)
    bm.allocate_slots(1, 0, 6)
    for child in range(2, k + 1):
        bm.fork(1, child)
    table = list(bm.block_table(1))
    seqs = list(range(1, k + 1))
    assert bm.can_swap_out(seqs)
    copies = bm.swap_out(seqs)
    assert sorted(src for src, _ in copies) == sorted(table)
    assert len(copies) == 2
    cpu_tables = [bm.cpu_block_tables[s] for s in seqs]
    assert all(t == cpu_tables[0] for t in cpu_tables), "sharing is kept in the swap pool"
    assert [bm.cpu_ref_counts[c] for c in cpu_tables[0]] == [k, k]
    assert bm.num_free_blocks == 8 and bm.num_free_cpu_blocks == 2
    bm.check_invariants()

    back = bm.swap_in(seqs)
    assert len(back) == 2, "and comes back once"
    device_tables = [bm.block_table(s) for s in seqs]
    assert all(t == device_tables[0] for t in device_tables) and len(device_tables[0]) == 2
    assert [bm.ref_counts[b] for b in device_tables[0]] == [k, k]
    assert bm.num_free_cpu_blocks == 4
    bm.check_invariants()


def test_swapping_out_part_of_the_sharers_leaves_the_rest_on_the_device():
    bm = make_bm()
    bm.allocate_slots(1, 0, 6)
    bm.fork(1, 2)
    table = list(bm.block_table(1))
    copies = bm.swap_out([2])
    assert sorted(src for src, _ in copies) == sorted(table)
    assert bm.block_table(1) == table and [bm.ref_counts[b] for b in table] == [1, 1]
    bm.check_invariants()


def test_can_swap_out_is_false_when_the_cpu_pool_is_too_small():
    bm = make_bm(num_blocks=8, num_cpu_blocks=2)
    bm.allocate_slots(1, 0, 9)          # 3 blocks
    assert not bm.can_swap_out([1])
    bm.allocate_slots(2, 0, 8)          # 2 blocks
    assert bm.can_swap_out([2])


def test_freeing_a_swapped_sequence_returns_its_cpu_blocks():
    bm = make_bm()
    bm.allocate_slots(1, 0, 6)
    bm.swap_out([1])
    assert bm.num_free_cpu_blocks == 6
    bm.free(1)
    assert bm.num_free_cpu_blocks == 8 and bm.num_free_blocks == 8
    bm.check_invariants()


def test_allocation_is_refused_when_the_pool_is_exhausted():
    bm = make_bm(num_blocks=4)
    bm.allocate_slots(1, 0, 12)         # 3 of 4 blocks
    assert bm.can_allocate(2, 0, 4)
    assert not bm.can_allocate(2, 0, 5), "two blocks wanted, one free"
    assert not bm.can_allocate(1, 12, 5)
    bm.allocate_slots(2, 0, 4)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(3, 0, 1)
    assert bm.allocate_slots(3, 0, 1) is None, "short of blocks: nothing is allocated"
    assert not bm.has_table(3)
    bm.check_invariants()


def test_copy_on_write_is_refused_when_no_block_is_free_for_the_copy():
    bm = make_bm(num_blocks=2)
    bm.allocate_slots(1, 0, 6)          # both blocks, the last one partly filled
    bm.fork(1, 2)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(2, 6, 1), "the copy needs a block even though the slot exists"


def test_free_list_blocks_are_used_before_any_cached_block_is_evicted():
    bm = make_bm(num_blocks=4)
    bm.allocate_slots(1, 0, 5)
    bm.cache_full_blocks(1, list(range(5)), 5)
    cached = bm.block_table(1)[0]
    bm.free(1)
    assert bm.prefix_cache.evictable_block_ids() == [cached]
    assert bm.num_free_blocks == 4, "a parked cached block counts as free"
    bm.allocate_slots(2, 0, 12)         # three blocks: the three never-cached ones
    assert cached not in bm.block_table(2)
    assert bm.prefix_cache.hash_of(cached) is not None
    bm.check_invariants()


def test_evictable_cached_blocks_are_reused_least_recently_parked_first():
    bm = make_bm(num_blocks=3, block_size=2)
    for seq_id in (1, 2, 3):            # one full cached block each, different contents
        bm.allocate_slots(seq_id, 0, 2)
        bm.cache_full_blocks(seq_id, [seq_id, seq_id], 2)
    blocks = {s: bm.block_table(s)[0] for s in (1, 2, 3)}
    for seq_id in (2, 3, 1):            # parked in this order
        bm.free(seq_id)
    assert bm.prefix_cache.evictable_block_ids() == [blocks[2], blocks[3], blocks[1]]
    bm.allocate_slots(10, 0, 1)
    assert bm.block_table(10) == [blocks[2]]
    assert bm.find_cached_prefix([2, 2, 0]) == [], "the evicted block's hash is forgotten"
    bm.allocate_slots(11, 0, 1)
    assert bm.block_table(11) == [blocks[3]]
    assert bm.find_cached_prefix([1, 1, 0]) == [blocks[1]], "the most recently parked one survives"
    bm.check_invariants()


def test_a_freed_sequence_parks_its_tail_blocks_first_so_its_head_survives_longest():
    bm = make_bm(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    bm.allocate_slots(1, 0, 6)
    bm.cache_full_blocks(1, tokens, 6)
    head, middle, tail = bm.block_table(1)
    bm.free(1)
    assert bm.prefix_cache.evictable_block_ids() == [tail, middle, head]
    bm.allocate_slots(2, 0, 1)          # evicts the tail block
    assert bm.find_cached_prefix(tokens + [7]) == [head, middle]


def test_freeing_everything_makes_the_pool_whole_again():
    bm = make_bm()
    bm.allocate_slots(1, 0, 7)
    bm.fork(1, 2)
    bm.allocate_slots(2, 7, 3)
    bm.cache_full_blocks(1, list(range(7)), 7)
    bm.swap_out([2])
    for s in (1, 2):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 8 and bm.num_free_cpu_blocks == 8
