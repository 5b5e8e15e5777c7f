"""VirtualKVCache: pages committed by the OS as tokens are written, returned on release, kept warm
with deferred reclaim, swapped exactly; the page counter equals what the OS reports (mincore).

The state machine drives random runs of every operation against a model of what each live or
swapped sequence's KV holds (a distinct value per token, written into every layer's K and V), so
a slot handed out twice, a page returned while a sequence still uses it, a swap that loses a token
or a counter that drifts from the OS shows up. Each cache is small (a few slots of a few pages),
so asking the OS after every step stays cheap.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from paged.os_memory import base_page_bytes, huge_page_bytes_of_host, transparent_huge_page_mode
from paged.virtual_kv import VirtualKVCache

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64  # fp32: 512 bytes a token per region, 8 tokens a 4 KiB page


def make_cache(max_num_seqs=3, max_model_len=40, dtype=torch.float32, **options) -> VirtualKVCache:
    return VirtualKVCache(LAYERS, KV_HEADS, HEAD_DIM, dtype, max_num_seqs, max_model_len, **options)


def write_tokens(cache: VirtualKVCache, slot: int, first: int, values: list[float]) -> None:
    """Tokens first.. of the slot: K = value, V = -value, in every layer (what a step's writes do)."""
    new = torch.tensor(values, dtype=torch.float32)[:, None, None].expand(-1, KV_HEADS, HEAD_DIM)
    for layer in range(cache.num_layers):
        cache.key_caches[layer][slot, first:first + len(values)] = new
        cache.value_caches[layer][slot, first:first + len(values)] = -new


def grow(cache: VirtualKVCache, slot: int, first: int, values: list[float]) -> None:
    cache.reserve(slot, first + len(values))
    write_tokens(cache, slot, first, values)


def stored(cache: VirtualKVCache, slot: int, num_tokens: int) -> list[list[float]]:
    return [cache.key_caches[layer][slot, :num_tokens, 0, 0].tolist() for layer in range(cache.num_layers)] + \
           [(-cache.value_caches[layer][slot, :num_tokens, -1, -1]).tolist() for layer in range(cache.num_layers)]


# ---- examples -----------------------------------------------------------------------------------
def test_a_new_cache_reserves_its_address_space_but_commits_nothing():
    # 64 slots x 2048 tokens x 2 layers of K and V: 256 MiB of address space, no page yet.
    cache = make_cache(max_num_seqs=64, max_model_len=2048)
    assert cache.mapping.size == 64 * 2 * LAYERS * 2048 * 512
    assert cache.resident_bytes() == 0 and cache.committed_pages == 0
    cache.check_invariants()


def test_writes_grow_resident_memory_by_whole_pages():
    cache = make_cache()
    slot = cache.allocate()
    page = base_page_bytes()
    for num_tokens in range(1, 41):
        grow(cache, slot, num_tokens - 1, [float(num_tokens)])
        pages_per_region = math.ceil(num_tokens * 512 / page)
        assert cache.resident_bytes() == cache.committed_bytes == 2 * LAYERS * pages_per_region * page
    cache.check_invariants()


def test_release_returns_resident_memory_to_its_floor():
    cache = make_cache()
    slots = [cache.allocate() for _ in range(3)]
    for slot, length in zip(slots, (40, 1, 17)):
        grow(cache, slot, 0, [1.0] * length)
    assert cache.resident_bytes() > 0
    for slot in slots:
        cache.release(slot)
        cache.check_invariants()
    assert cache.resident_bytes() == 0 and cache.committed_pages == 0
    assert cache.peak_committed_pages == cache.pages_for(40) + cache.pages_for(1) + cache.pages_for(17)


def test_deferred_reclaim_keeps_pages_for_the_next_sequence_until_trimmed():
    cache = make_cache(deferred_reclaim=True)
    first = cache.allocate()
    grow(cache, first, 0, [1.0] * 20)
    cache.release(first)
    warm = cache.resident_bytes()
    assert warm == cache.committed_bytes == cache.pages_for(20) * cache.page_bytes
    second = cache.allocate()
    assert second == first  # the warm slot is reused: its pages are already there
    assert cache.pages_to_grow(second, 20) == 0 and cache.pages_to_grow(second, 30) > 0
    grow(cache, second, 0, [2.0] * 10)  # fewer tokens than the slot once held: nothing new committed
    assert cache.resident_bytes() == warm
    cache.release(second)
    assert cache.trim(max_pages=0) == cache.pages_for(20)
    assert cache.resident_bytes() == 0
    cache.check_invariants()


def test_trim_gives_back_least_recently_released_slots_first():
    cache = make_cache(deferred_reclaim=True)
    slots = [cache.allocate() for _ in range(3)]
    for slot in slots:
        grow(cache, slot, 0, [1.0] * 8)
        cache.release(slot)
    cache.trim(max_pages=cache.pages_for(8))
    assert list(cache.warm_slots) == [slots[2]] and cache.resident_bytes() == cache.pages_for(8) * cache.page_bytes
    cache.check_invariants()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_round_trips_exactly_and_copies_only_the_written_tokens(dtype):
    cache = make_cache(dtype=dtype)
    other = cache.allocate()
    slot = cache.allocate()
    g = torch.Generator().manual_seed(0)
    cache.reserve(slot, 13)
    for layer in range(LAYERS):
        cache.key_caches[layer][slot, :13] = torch.randn(13, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
        cache.value_caches[layer][slot, :13] = torch.randn(13, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    before = [c[slot, :13].clone() for layer in range(LAYERS) for c in (cache.key_caches[layer],
                                                                        cache.value_caches[layer])]
    swapped = cache.swap_out(slot)
    assert swapped.kv.shape == (2 * LAYERS, 13, KV_HEADS, HEAD_DIM) and swapped.kv.dtype == dtype
    assert cache.resident_bytes() == 0  # the other slot never wrote; the swapped one gave its pages back
    grow(cache, other, 0, [5.0] * 3)  # the freed slot may be reused by anyone meanwhile
    back = cache.swap_in(swapped)
    after = [c[back, :13] for layer in range(LAYERS) for c in (cache.key_caches[layer], cache.value_caches[layer])]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert cache.resident_bytes() == cache.committed_bytes
    cache.check_invariants()


def test_allocate_returns_none_when_every_slot_is_live_and_swap_in_waits():
    cache = make_cache(max_num_seqs=2)
    first, second = cache.allocate(), cache.allocate()
    grow(cache, first, 0, [1.0])
    swapped = cache.swap_out(first)
    cache.allocate()
    assert cache.allocate() is None and cache.swap_in(swapped) is None
    cache.release(second)
    assert cache.swap_in(swapped) is not None
    cache.check_invariants()


def test_reserve_rejects_shrinking_overflowing_and_slots_without_a_sequence():
    cache = make_cache(max_model_len=16)
    slot = cache.allocate()
    cache.reserve(slot, 8)
    with pytest.raises(ValueError, match="cannot reserve 4"):
        cache.reserve(slot, 4)
    with pytest.raises(ValueError, match="max_model_len 16"):
        cache.reserve(slot, 17)
    with pytest.raises(ValueError, match="holds no sequence"):
        cache.reserve(slot + 1, 1)
    with pytest.raises(ValueError, match="holds no sequence"):
        cache.release(slot + 1)
    cache.check_invariants()


def test_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="max_model_len must be positive"):
        make_cache(max_model_len=0)


def test_huge_pages_commit_two_mib_per_region_or_are_refused():
    if transparent_huge_page_mode() == "never":
        with pytest.raises(ValueError, match="transparent huge pages are off"):
            make_cache(huge_pages=True)
        return
    cache = make_cache(huge_pages=True)
    huge = huge_page_bytes_of_host()
    slot = cache.allocate()
    grow(cache, slot, 0, [1.0])
    # One token per region commits a whole huge page in each: the page-granular waste.
    assert cache.committed_bytes == 2 * LAYERS * huge
    # The kernel may fall back to base pages when no huge page is free; never more than committed.
    assert 2 * LAYERS * base_page_bytes() <= cache.resident_bytes() <= cache.committed_bytes
    cache.release(slot)
    assert cache.resident_bytes() == 0
    cache.check_invariants()


def test_contiguous_attention_reads_the_cache_in_place():
    from paged_kernels import contiguous_attention, contiguous_slot_mapping, write_kv_contiguous
    from paged_kernels.reference import reference_contiguous_attention

    cache = make_cache(max_num_seqs=3, max_model_len=40)
    g = torch.Generator().manual_seed(1)
    slots = [cache.allocate(), cache.allocate()]
    lengths = [30, 7]
    for slot, length in zip(slots, lengths):
        cache.reserve(slot, length)
    slot_ids = torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)])
    positions = torch.tensor([p for n in lengths for p in range(n)])
    mapping = contiguous_slot_mapping(slot_ids, positions, cache.max_model_len)
    query = torch.randn(2, 4, HEAD_DIM, generator=g)  # the last token of each sequence
    args = (torch.tensor(slots, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32), HEAD_DIM ** -0.5)
    for layer in range(LAYERS):
        key, value = torch.randn(2, 37, KV_HEADS, HEAD_DIM, generator=g)
        write_kv_contiguous(key, value, cache.key_caches[layer], cache.value_caches[layer], mapping)
        out = contiguous_attention(query, cache.key_caches[layer], cache.value_caches[layer], *args)
        expected = reference_contiguous_attention(query, cache.key_caches[layer], cache.value_caches[layer], *args)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert cache.resident_bytes() == cache.committed_bytes  # nothing read or written past the lengths
    cache.check_invariants()


# ---- state machine ------------------------------------------------------------------------------
MAX_LEN = 24


class VirtualKVMachine(RuleBasedStateMachine):
    DEFERRED = False

    def __init__(self):
        super().__init__()
        self.cache = make_cache(max_num_seqs=3, max_model_len=MAX_LEN, deferred_reclaim=self.DEFERRED)
        self.live: dict[int, list[float]] = {}       # slot -> the values its tokens hold
        self.swapped: list[tuple[object, list[float]]] = []
        self.next_value = 1.0

    def fresh_values(self, count: int) -> list[float]:
        values = [self.next_value + i for i in range(count)]
        self.next_value += count
        return values

    @rule()
    def allocate(self):
        slot = self.cache.allocate()
        if slot is None:
            assert len(self.live) == self.cache.max_num_seqs
            return
        assert slot not in self.live
        self.live[slot] = []

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 10))
    def grow(self, data, count):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        tokens = self.live[slot]
        count = min(count, MAX_LEN - len(tokens))
        expected = self.cache.pages_to_grow(slot, len(tokens) + count)
        before = self.cache.committed_pages
        values = self.fresh_values(count)
        grow(self.cache, slot, len(tokens), values)
        tokens += values
        assert self.cache.committed_pages == before + expected

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self.cache.release(slot)
        del self.live[slot]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def swap_out(self, data):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self.swapped.append((self.cache.swap_out(slot), self.live.pop(slot)))

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        index = data.draw(st.integers(0, len(self.swapped) - 1))
        swapped, tokens = self.swapped[index]
        slot = self.cache.swap_in(swapped)
        if slot is None:
            assert len(self.live) == self.cache.max_num_seqs
            return
        del self.swapped[index]
        self.live[slot] = tokens

    @rule(fraction=st.floats(0, 1))
    def trim(self, fraction):
        target = int(fraction * self.cache.committed_pages)
        self.cache.trim(target)
        assert self.cache.committed_pages <= target or not self.cache.warm_slots

    @invariant()
    def memory_matches_the_os_and_contents_are_intact(self):
        cache = self.cache
        cache.check_invariants()
        # Every reserved token was written at once, and warm slots were written before: equality.
        assert cache.resident_bytes() == cache.committed_bytes
        for slot, tokens in self.live.items():
            assert stored(cache, slot, len(tokens)) == [tokens] * (2 * LAYERS), f"slot {slot} KV corrupted"
        for swapped, tokens in self.swapped:
            assert swapped.num_tokens == len(tokens)
            assert swapped.kv[:, :, 0, 0].tolist() == [[v if i % 2 == 0 else -v for v in tokens]
                                                       for i in range(2 * LAYERS)]

    def teardown(self):
        for slot in list(self.live):
            self.cache.release(slot)
        self.cache.trim(0)
        self.cache.check_invariants()
        assert self.cache.resident_bytes() == 0 and self.cache.committed_pages == 0, "pages leaked"


class DeferredReclaimMachine(VirtualKVMachine):
    DEFERRED = True


MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
                            database=None, suppress_health_check=[HealthCheck.too_slow])
VirtualKVMachine.TestCase.settings = MACHINE_SETTINGS
DeferredReclaimMachine.TestCase.settings = MACHINE_SETTINGS
TestVirtualKVStateMachine = VirtualKVMachine.TestCase
TestVirtualKVStateMachineDeferredReclaim = DeferredReclaimMachine.TestCase
