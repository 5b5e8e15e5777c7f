"""BlockManager: ref counts, fork, copy-on-write, swap, the prefix cache, pinned prefixes and the CPU
tier of the prefix cache, as a specification.

The state machine drives long random runs of every operation against a model of what each
sequence's KV holds (the token written into every slot of every device and CPU block), so that a
lost copy-on-write, a wrong swap mapping, a CPU-tier copy in the wrong order or a reused block that
someone still reads shows up as a sequence (or a cached block) whose stored tokens differ from the
real ones. Operations are grouped into plans, as the scheduler groups them into a step: block
moves and model writes only happen when the plan runs, in the order ``KVCache.apply`` uses, so the
model keeps two views: what each block should hold (updated as operations are decided) and what
it does hold (updated when a plan runs). ``check_invariants`` runs after every step.
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged.block_manager import BlockManager, CpuHit

BS = 4                 # block size
MAX_SEQS = 7
MAX_LEN = 5 * BS
VOCAB = 3              # tiny vocabulary: equal prefixes (prefix-cache hits) are common


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BS)


def tokens_st(min_size: int, max_size: int):
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=max_size)


def empty_plan() -> dict:
    return {"swap_out": [], "swap_in": [], "copies": [], "writes": [], "touched": set()}


def batched_copy(dst: dict, src: dict, pairs) -> None:
    """What one indexed tensor copy does: read every source, then write every destination."""
    values = [copy.copy(src.get(s)) for s, _ in pairs]
    for (_, d), value in zip(pairs, values):
        dst[d] = value


class BlockManagerMachine(RuleBasedStateMachine):
    """Every live sequence is fully computed: its table covers exactly its tokens."""

    NUM_BLOCKS = 16        # small pool: exhaustion and eviction happen often
    NUM_CPU_BLOCKS = 10    # smaller swap pool: can_swap_out is sometimes False
    NUM_CPU_PREFIX = 6     # the CPU tier may take most of it, so swap and tier compete

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(self.NUM_BLOCKS, self.NUM_CPU_BLOCKS, BS, enable_prefix_caching=True,
                               num_cpu_prefix_blocks=self.NUM_CPU_PREFIX)
        self.tokens: dict[int, list[int]] = {}   # every live sequence (on the device or swapped)
        self.swapped: set[int] = set()
        self.gpu: dict[int, list] = {}           # device block -> what each slot should hold
        self.cpu: dict[int, list] = {}           # cpu block -> what each slot should hold
        self.real_gpu: dict[int, list] = {}      # ... and what it does hold (plans that ran)
        self.real_cpu: dict[int, list] = {}
        self.plan = empty_plan()
        self.pins: dict[tuple, list[int]] = {}   # pin key -> the blocks pinned, in order
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

    def cache_names(self) -> tuple[dict, dict]:
        """Which block each prefix hash names now: (on the device, on the CPU tier)."""
        bm = self.bm
        device = {bm.prefix_cache.hash_of(b): b for b in range(self.NUM_BLOCKS)
                  if bm.prefix_cache.hash_of(b) is not None}
        tier = {bm.cpu_pool.prefix_cache.hash_of(c): c for c in bm.cpu_pool.prefix_cache.evictable_block_ids()}
        return device, tier

    def follow_tier_moves(self, names_before: tuple[dict, dict]) -> None:
        """What the last operation decided for the CPU tier, seen from outside: a hash that moved
        from a device block to a CPU block was offloaded, one that moved back was loaded; the
        copy will carry what the source holds now."""
        device_before, tier_before = names_before
        device_after, tier_after = self.cache_names()
        for block_hash, cpu_block_id in tier_after.items():
            if tier_before.get(block_hash) != cpu_block_id:
                assert block_hash in device_before, "the CPU tier got a block the device did not have"
                self.cpu[cpu_block_id] = copy.copy(self.gpu.get(device_before[block_hash]))
        for block_hash, block_id in device_after.items():
            if device_before.get(block_hash) != block_id and block_hash in tier_before:
                self.gpu[block_id] = copy.copy(self.cpu.get(tier_before[block_hash]))

    def write(self, seq_id: int, start: int) -> None:
        """The model computes tokens[start:] of the sequence into its blocks (when the plan runs)."""
        table = self.bm.block_table(seq_id)
        toks = self.tokens[seq_id]
        for pos in range(start, len(toks)):
            block_id = table[pos // BS]
            assert self.bm.ref_counts[block_id] == 1, f"seq {seq_id} writes into shared block {block_id}"
            assert self.bm.prefix_cache.hash_of(block_id) is None, f"seq {seq_id} writes into cached block {block_id}"
            self.gpu.setdefault(block_id, [None] * BS)[pos % BS] = toks[pos]
            self.plan["writes"].append((block_id, pos % BS, toks[pos]))
        self.plan["touched"].add(seq_id)

    @staticmethod
    def stored(table: list[int], store: dict[int, list], num_tokens: int) -> list:
        return [(store.get(table[p // BS]) or [None] * BS)[p % BS] for p in range(num_tokens)]

    def maybe_register(self, data, seq_id: int) -> None:
        """Like the engine after a step, usually name the sequence's full blocks in the cache."""
        if data.draw(st.integers(0, 3), label="register") > 0:
            self.run_plan()
            toks = self.tokens[seq_id]
            self.bm.cache_full_blocks(seq_id, toks, len(toks))
            self.remember(toks)

    def cached_content_is_right(self, gpu: dict, cpu: dict) -> None:
        """Every cached block a known token list hits holds those tokens (device or CPU tier)."""
        for toks in [self.tokens[s] for s in self.tokens] + self.history:
            for i, hit in enumerate(self.bm.find_cached_prefix(toks + [0])):
                store, block_id = (cpu, hit.cpu_block_id) if isinstance(hit, CpuHit) else (gpu, hit)
                assert store.get(block_id) == toks[i * BS:(i + 1) * BS], f"cached block {hit} holds other tokens"

    # ---- plans ------------------------------------------------------------------------------
    @rule()
    def run_plan(self):
        """The runner applies the plan: device -> CPU copies (swap-outs, then offloads), CPU ->
        device copies (swap-ins, then loads), copy-on-write copies, then the model's writes."""
        offloads, loads = self.bm.take_prefix_moves()  # once per plan, as the scheduler does
        plan = self.plan
        assert not {c for _, c in offloads} & {c for _, c in plan["swap_out"]}, "a CPU block written twice"
        batched_copy(self.real_cpu, self.real_gpu, plan["swap_out"])
        batched_copy(self.real_cpu, self.real_gpu, offloads)
        batched_copy(self.real_gpu, self.real_cpu, plan["swap_in"])
        batched_copy(self.real_gpu, self.real_cpu, loads)
        batched_copy(self.real_gpu, self.real_gpu, plan["copies"])
        for block_id, slot, token in plan["writes"]:
            self.real_gpu.setdefault(block_id, [None] * BS)[slot] = token
        self.bm.end_plan()
        self.plan = empty_plan()
        # what the plan made is what the decisions said it would make
        for s in self.running:
            table = self.bm.block_table(s)
            assert self.stored(table, self.real_gpu, len(self.tokens[s])) == self.tokens[s], f"seq {s} KV wrong"
        for s in self.swapped:
            table = self.bm.cpu_block_tables[s]
            assert self.stored(table, self.real_cpu, len(self.tokens[s])) == self.tokens[s], f"swapped {s} wrong"
        self.cached_content_is_right(self.real_gpu, self.real_cpu)
        self.gpu, self.cpu = copy.deepcopy(self.real_gpu), copy.deepcopy(self.real_cpu)

    @precondition(lambda self: self.plan["touched"])
    @rule()
    def fail_plan(self):
        """Running the plan failed: none of it happened; the engine ends every sequence in it."""
        self.bm.drop_prefix_moves(*self.bm.take_prefix_moves())
        for s in sorted(self.plan["touched"]):
            if s in self.tokens:
                self.bm.free(s)
                del self.tokens[s]
                self.swapped.discard(s)
        self.plan = empty_plan()
        self.gpu, self.cpu = copy.deepcopy(self.real_gpu), copy.deepcopy(self.real_cpu)
        self.cached_content_is_right(self.real_gpu, self.real_cpu)

    # ---- rules ------------------------------------------------------------------------------
    @initialize(data=st.data())
    def start_with_two_sequences(self, data):
        for _ in range(2):
            self.add_sequence(data, use_prefix_cache=True)
        self.run_plan()

    @precondition(lambda self: len(self.tokens) < MAX_SEQS)
    @rule(data=st.data(), use_prefix_cache=st.booleans())
    def add_sequence(self, data, use_prefix_cache):
        if self.history and data.draw(st.booleans(), label="share a prefix"):
            base = data.draw(st.sampled_from(self.history), label="base")
            cut = len(base) - data.draw(st.integers(0, len(base)), label="drop")  # simplest: all of it
            prompt = base[:cut] + data.draw(tokens_st(0, BS), label="tail")
        else:
            prompt = data.draw(tokens_st(1, 3 * BS), label="prompt")
        self.admit(data, prompt[:3 * BS] or [0], use_prefix_cache)

    @precondition(lambda self: len(self.tokens) < MAX_SEQS and self.bm.cpu_pool.prefix_cache.num_evictable)
    @rule(data=st.data())
    def readmit_a_prompt_cached_on_the_cpu_tier(self, data):
        """Like a request preempted by recompute (or a repeated prompt) whose blocks went to the
        CPU tier in the meantime."""
        prompts = [t for t in self.history if any(isinstance(h, CpuHit) for h in self.bm.find_cached_prefix(t))]
        if prompts:
            self.admit(data, data.draw(st.sampled_from(prompts), label="prompt"), use_prefix_cache=True)

    @precondition(lambda self: self.bm.prefix_cache.num_evictable)
    @rule(data=st.data())
    def a_passing_request_evicts_cached_blocks(self, data):
        """A request as long as the free blocks allow runs and finishes: the cached blocks nobody
        holds are evicted for it (to the CPU tier), and its own blocks are free again after."""
        length = min(MAX_LEN, self.bm.num_free_blocks * BS)
        seq_id = self.next_seq_id + 1
        self.admit(data, data.draw(tokens_st(length, length), label="prompt"), use_prefix_cache=False)
        if seq_id in self.tokens:
            self.run_plan()
            self.bm.free(seq_id)
            del self.tokens[seq_id]

    def admit(self, data, prompt: list[int], use_prefix_cache: bool) -> None:
        seq_id = self.new_seq_id()
        bm = self.bm

        hits = bm.find_cached_prefix(prompt) if use_prefix_cache else []
        assert len(hits) <= (len(prompt) - 1) // BS, "the last prompt token must be left to compute"
        assert len(set(hits)) == len(hits)
        for i, hit in enumerate(hits):
            held = self.cpu[hit.cpu_block_id] if isinstance(hit, CpuHit) else self.gpu[hit]
            assert held == prompt[i * BS:(i + 1) * BS], "a prefix hit holds other tokens"
        device_hits = [h for h in hits if not isinstance(h, CpuHit)]
        cpu_hits = [h for h in hits if isinstance(h, CpuHit)]
        parked_hits = sum(1 for b in device_hits if bm.ref_counts[b] == 0)
        free_after = bm.num_free_blocks - parked_hits
        needed = blocks_for(len(prompt)) - len(device_hits)
        if not hits:
            assert bm.can_allocate(seq_id, 0, len(prompt)) == (needed <= bm.num_free_blocks)
        computed = len(hits) * BS
        before = (list(bm.ref_counts), bm.num_free_blocks, bm.cpu_hit_tokens)
        names = self.cache_names()
        copies = bm.allocate_slots(seq_id, computed, len(prompt) - computed, new_computed_blocks=hits)
        if needed > free_after:
            # the pool cannot take it now (the scheduler would leave it waiting): nothing changed
            assert copies is None and (list(bm.ref_counts), bm.num_free_blocks, bm.cpu_hit_tokens) == before
            assert not bm.has_table(seq_id)
            return
        assert copies == [], "a fresh table never needs copy-on-write"
        table = bm.block_table(seq_id)
        assert len(table) == blocks_for(len(prompt))
        for i, hit in enumerate(hits):
            if isinstance(hit, CpuHit):
                assert bm.prefix_cache.hash_of(table[i]) is not None, "a CPU-tier hit is cached on the device again"
            else:
                assert table[i] == hit
        assert bm.cpu_hit_tokens == before[2] + len(cpu_hits) * BS
        self.follow_tier_moves(names)
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

        names = self.cache_names()
        copies = bm.allocate_slots(seq_id, computed, num_new)
        self.follow_tier_moves(names)
        table = bm.block_table(seq_id)
        assert len(table) == blocks_for(computed + num_new)
        if shared_partial:
            src, dst = old_table[index], table[index]
            assert copies == [(src, dst)], "a write into a shared partial block copies exactly that block"
            assert dst != src and self.holders(dst) == 1
            assert table[:index] == old_table[:index]
            self.gpu[dst] = list(self.gpu[src])  # what the cache engine does with the copy pair
            self.plan["copies"] += copies
        else:
            assert copies == []
            assert table[:len(old_table)] == old_table
        toks.extend(data.draw(tokens_st(num_new, num_new), label="new tokens"))
        self.write(seq_id, computed)
        self.maybe_register(data, seq_id)

    @precondition(lambda self: self.running and len(self.tokens) < MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data):
        self.run_plan()  # the engine forks after a step
        parent = data.draw(st.sampled_from(self.running), label="parent")
        child = self.new_seq_id()
        before = list(self.bm.ref_counts)
        table = self.bm.block_table(parent)
        self.bm.fork(parent, child)
        assert self.bm.block_table(child) == table
        for block_id in range(self.NUM_BLOCKS):
            assert self.bm.ref_counts[block_id] == before[block_id] + table.count(block_id)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        self.run_plan()  # sequences finish (or are aborted) between steps
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
        self.bm.free(seq_id)
        assert not self.bm.has_table(seq_id) and seq_id not in self.bm.cpu_block_tables
        del self.tokens[seq_id]
        self.swapped.discard(seq_id)

    @precondition(lambda self: any(s not in self.plan["touched"] for s in self.running))
    @rule(data=st.data())
    def swap_out(self, data):
        # the scheduler only swaps out sequences it has not scheduled in the same plan
        candidates = [s for s in self.running if s not in self.plan["touched"]]
        if data.draw(st.booleans(), label="all of them"):  # many blocks: empties the CPU pool and tier
            seq_ids = candidates
        else:
            seq_ids = data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True), label="seqs")
        bm = self.bm
        before = {s: list(bm.block_table(s)) for s in seq_ids}
        distinct = {b for table in before.values() for b in table}
        if not bm.can_swap_out(seq_ids):
            assert len(distinct) > bm.num_free_cpu_blocks
            return
        names = self.cache_names()
        copies = bm.swap_out(seq_ids)
        self.follow_tier_moves(names)
        assert len(copies) == len(distinct), "a block shared within the swapped set moves once"
        assert {src for src, _ in copies} == distinct
        assert len({dst for _, dst in copies}) == len(copies)
        mapping = dict(copies)
        for s in seq_ids:
            assert not bm.has_table(s)
            assert bm.cpu_block_tables[s] == [mapping[b] for b in before[s]]
        for src, dst in copies:
            self.cpu[dst] = list(self.gpu[src])
        self.plan["swap_out"] += copies
        self.plan["touched"].update(seq_ids)
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
        names = self.cache_names()
        copies = bm.swap_in(seq_ids)
        self.follow_tier_moves(names)
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
        self.plan["swap_in"] += copies
        self.plan["touched"].update(seq_ids)
        self.swapped.difference_update(seq_ids)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def register_full_blocks(self, data):
        self.run_plan()  # blocks are named after the step that computed them
        seq_id = data.draw(st.sampled_from(self.running), label="seq")
        toks = self.tokens[seq_id]
        self.bm.cache_full_blocks(seq_id, toks, len(toks))
        for i, block_id in enumerate(self.bm.block_table(seq_id)[:len(toks) // BS]):
            block_hash = self.bm.prefix_cache.hash_of(block_id)
            if block_hash is not None:
                assert self.bm.prefix_cache.lookup(block_hash) == block_id
                assert self.bm.cpu_pool.prefix_cache.lookup(block_hash) is None, "a hash cached in both tiers"
        self.remember(toks)

    @precondition(lambda self: self.history and len(self.pins) < 3)
    @rule(data=st.data())
    def pin_prefix(self, data):
        self.run_plan()  # the engine pins between steps, right after computing the prefix
        toks = data.draw(st.sampled_from(self.history), label="prefix")
        bm = self.bm
        expected = []
        for i in range(len(toks) // BS):
            hits = bm.find_cached_prefix(toks[:(i + 1) * BS] + [0])
            if len(hits) <= i or isinstance(hits[i], CpuHit):
                break
            expected.append(hits[i])
        key = tuple(toks)
        already = key in self.pins
        assert bm.num_pinned_blocks_with(toks) >= bm.num_pinned_blocks
        pinned_tokens = bm.pin_prefix(key, toks)
        if already:
            assert pinned_tokens == len(self.pins[key]) * BS, "pinning a key again changes nothing"
            return
        assert pinned_tokens == len(expected) * BS
        assert bm.pins[key] == expected
        assert all(bm.ref_counts[b] > 0 for b in expected), "pinned blocks are held"
        self.pins[key] = expected

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin_prefix(self, data):
        key = data.draw(st.sampled_from(sorted(self.pins)), label="pin")
        blocks = self.pins.pop(key)
        assert self.bm.unpin_prefix(key) == len(blocks) * BS
        for block_id in blocks:
            if self.holders(block_id) == 0 and all(block_id not in b for b in self.pins.values()):
                assert block_id in self.bm.prefix_cache.evictable_block_ids(), "an unpinned block is evictable"

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
        used = {b for s in self.running for b in bm.block_table(s)} | {b for bs in self.pins.values() for b in bs}
        assert bm.num_free_blocks == self.NUM_BLOCKS - len(used)
        assert bm.num_pinned_blocks == len({b for bs in self.pins.values() for b in bs})
        # pinned blocks are never evicted: each still holds its prefix under the same name
        for key, blocks in self.pins.items():
            assert bm.find_cached_prefix(list(key)[:len(blocks) * BS] + [0]) == blocks
        self.cached_content_is_right(self.gpu, self.cpu)

    def teardown(self):
        self.run_plan()
        for key in list(self.pins):
            self.bm.unpin_prefix(key)
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.NUM_BLOCKS, "blocks leaked"
        assert self.bm.num_free_cpu_blocks == self.NUM_CPU_BLOCKS, "cpu blocks leaked"
        assert all(c == 0 for c in self.bm.ref_counts) and all(c == 0 for c in self.bm.cpu_pool.ref_counts)
        assert not self.bm.block_tables and not self.bm.cpu_block_tables


class SmallCpuPoolMachine(BlockManagerMachine):
    """A CPU pool that swap-outs often empty: they evict CPU-tier blocks offloaded in the same plan."""
    NUM_BLOCKS = 12
    NUM_CPU_BLOCKS = 6
    NUM_CPU_PREFIX = 4


MACHINE_SETTINGS = settings(
    max_examples=80, stateful_step_count=50, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
BlockManagerMachine.TestCase.settings = MACHINE_SETTINGS
SmallCpuPoolMachine.TestCase.settings = MACHINE_SETTINGS
TestBlockManagerStateMachine = BlockManagerMachine.TestCase
TestBlockManagerStateMachineSmallCpuPool = SmallCpuPoolMachine.TestCase


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
    assert [bm.cpu_pool.ref_counts[c] for c in cpu_tables[0]] == [k, k]
    assert bm.num_free_blocks == 8 and bm.num_free_cpu_blocks == 2
    bm.check_invariants()

    back = bm.swap_in(seqs)
    bm.end_plan()                       # the CPU blocks a plan reads are free once it ran
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
