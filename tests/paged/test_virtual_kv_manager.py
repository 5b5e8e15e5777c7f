"""VirtualKVManager, the scheduler's KV manager for ``kv_memory: virtual``: slots and pages within a
budget, warm slots trimmed when admission needs their pages, swaps bounded by the swap space, and
a refusal that changes nothing. The state machine drives random runs of what the scheduler does
(admit, grow, finish, preempt by recompute or swap, swap back) against a model of each sequence's
tokens, checking the manager's and the cache's invariants (mincore included) after every step.
"""
from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_virtual_kv import LAYERS, MACHINE_SETTINGS, make_cache, stored, write_tokens

from paged.errors import InvalidRequestError
from paged.sampling_params import SamplingParams
from paged.virtual_kv_manager import VirtualKVManager

MAX_LEN = 24   # fp32, 2 KV heads x 64: 8 tokens a 4 KiB page per region, 4 regions a slot


def make_manager(num_pages: int, swap_tokens: int = 64, max_num_seqs: int = 3, deferred: bool = False):
    cache = make_cache(max_num_seqs=max_num_seqs, max_model_len=MAX_LEN, deferred_reclaim=deferred)
    return VirtualKVManager(cache, num_pages, swap_tokens * 2 * LAYERS * cache.token_bytes)


def state(manager: VirtualKVManager) -> tuple:
    cache = manager.cache
    return (dict(manager.slots), dict(cache.reserved), list(cache.touched), list(cache.free_slots),
            list(cache.warm_slots), cache.committed_pages)


def test_admission_takes_a_slot_and_commits_the_prompts_pages_within_the_budget():
    manager = make_manager(num_pages=8)   # two slots of 8 tokens (4 regions x 1 page), or one of 16
    assert manager.allocate_slots(1, 0, 10) == [] and manager.block_table(1) == [manager.slots[1]]
    assert manager.cache.committed_pages == 8  # 10 tokens: 2 pages in each of 4 regions
    before = state(manager)
    assert manager.allocate_slots(2, 0, 1) is None, "a page over the budget"
    assert state(manager) == before, "a refused allocation changed something"
    manager.free(1)
    assert manager.allocate_slots(2, 0, 1) == [] and manager.cache.committed_pages == 4
    manager.check_invariants()


def test_warm_slots_are_trimmed_only_when_admission_needs_their_pages():
    manager = make_manager(num_pages=12, deferred=True)
    manager.allocate_slots(1, 0, 16)    # 8 pages
    manager.free(1)                     # kept warm
    assert manager.make_stats().warm_pages == 8 and manager.cache.committed_pages == 8
    manager.allocate_slots(2, 0, 4)     # reuses the warm slot: nothing new committed
    assert manager.cache.committed_pages == 8
    manager.allocate_slots(3, 0, 8)     # a fresh slot: 4 pages, still within 12
    manager.free(2)                     # warm again (8 pages)
    assert manager.allocate_slots(4, 0, 8) == [], "the warm slot is taken back: no room needed"
    manager.allocate_slots(4, 8, 8)     # grows within its pages
    manager.free(4)
    manager.allocate_slots(5, 0, 1)     # the warm slot again
    assert manager.allocate_slots(3, 8, 16) is None, "5 holds the warm pages: 12 + 8 needed"
    manager.free(5)
    assert manager.allocate_slots(3, 8, 16) == [], "trimming the warm slot makes room"
    assert manager.make_stats().warm_pages == 0 and manager.cache.committed_pages == 12
    manager.check_invariants()


def test_a_reused_warm_slots_pages_past_its_tokens_go_back_when_admission_needs_them():
    manager = make_manager(num_pages=12, deferred=True)
    manager.allocate_slots(1, 0, 24)    # 12 pages: the whole budget
    manager.free(1)                     # warm
    manager.allocate_slots(2, 0, 4)     # takes the warm slot: 4 of its pages hold tokens, 8 are slack
    slot = manager.slots[2]
    assert manager.cache.committed_pages == 12 and manager.cache.slack_pages(slot) == 8
    assert manager.allocate_slots(3, 0, 16) == [], "the slack makes room for 8 pages"
    assert manager.cache.slack_pages(slot) == 0 and manager.cache.committed_pages == 12
    assert manager.allocate_slots(4, 0, 1) is None
    manager.check_invariants()   # mincore: no page of slot 2 resident past its tokens


def test_swap_is_bounded_by_the_swap_space_and_round_trips_the_tokens():
    manager = make_manager(num_pages=12, swap_tokens=10)
    manager.allocate_slots(1, 0, 8)
    write_tokens(manager.cache, manager.slots[1], 0, [float(v) for v in range(1, 9)])
    manager.allocate_slots(2, 0, 12)
    assert manager.swap_out_bytes([1]) == 8 * 2 * LAYERS * manager.cache.token_bytes
    assert manager.can_swap_out([1]) and not manager.can_swap_out([1, 2]), "20 tokens > 10 of swap space"
    assert manager.swap_out([1]) == [] and 1 not in manager.slots and manager.cache.committed_pages == 8
    assert not manager.can_swap_out([2])
    assert manager.can_swap_in([1], [8]) and not manager.can_swap_in([1], [9]), "4 + 8 pages, not 8 + 8"
    manager.swap_in([1])
    assert stored(manager.cache, manager.slots[1], 8) == [[float(v) for v in range(1, 9)]] * (2 * LAYERS)
    assert manager.swap_bytes_used == 0
    manager.check_invariants()


def test_requests_over_the_whole_budget_and_pins_are_refused():
    manager = make_manager(num_pages=8)
    manager.check_request_fits(10, SamplingParams(max_tokens=6))          # 16 tokens: 8 pages
    with pytest.raises(InvalidRequestError, match="KV pages") as error:
        manager.check_request_fits(10, SamplingParams(max_tokens=7))
    assert error.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="kv_memory 'paged'") as error:
        manager.check_pin_fits([1, 2, 3], MAX_LEN)
    assert error.value.param == "prompt"
    with pytest.raises(RuntimeError, match="fork"):
        manager.fork(1, 2)


# ---- state machine ------------------------------------------------------------------------------
class VirtualKVManagerMachine(RuleBasedStateMachine):
    """What the scheduler does to the manager, with a small budget so refusals happen often."""
    DEFERRED = False

    def __init__(self):
        super().__init__()
        self.manager = make_manager(num_pages=20, swap_tokens=30, deferred=self.DEFERRED)
        self.live: dict[int, list[float]] = {}      # running sequence -> its written tokens
        self.swapped: dict[int, list[float]] = {}
        self.next_seq = 0
        self.next_value = 1.0

    def write(self, seq_id: int, count: int) -> None:
        """What a step does after allocate_slots: the sequence's next ``count`` tokens written."""
        tokens = self.live[seq_id]
        values = [self.next_value + i for i in range(count)]
        self.next_value += count
        write_tokens(self.manager.cache, self.manager.slots[seq_id], len(tokens), values)
        tokens += values

    @rule(count=st.integers(1, MAX_LEN))
    def admit(self, count):
        self.next_seq += 1
        before = state(self.manager)
        if self.manager.allocate_slots(self.next_seq, 0, count) is None:
            assert state(self.manager) == before
            return
        self.live[self.next_seq] = []
        self.write(self.next_seq, count)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 8))
    def grow(self, data, count):
        seq_id = data.draw(st.sampled_from(sorted(self.live)))
        computed = len(self.live[seq_id])
        count = min(count, MAX_LEN - computed)
        before = state(self.manager)
        if self.manager.allocate_slots(seq_id, computed, count) is None:
            assert state(self.manager) == before
            return
        self.write(seq_id, count)

    @precondition(lambda self: self.live or self.swapped)
    @rule(data=st.data())
    def finish_or_recompute(self, data):
        seq_id = data.draw(st.sampled_from(sorted([*self.live, *self.swapped])))
        self.manager.free(seq_id)
        self.live.pop(seq_id, None)
        self.swapped.pop(seq_id, None)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def swap_out(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.live)))
        if self.manager.can_swap_out([seq_id]):
            self.manager.swap_out([seq_id])
            self.swapped[seq_id] = self.live.pop(seq_id)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.swapped)))
        tokens = self.swapped[seq_id]
        if self.manager.can_swap_in([seq_id], [min(MAX_LEN, len(tokens) + 1)]):
            self.manager.swap_in([seq_id])
            self.live[seq_id] = self.swapped.pop(seq_id)

    @invariant()
    def invariants_hold_and_tokens_are_intact(self):
        manager = self.manager
        manager.check_invariants()
        assert manager.cache.resident_bytes() == manager.cache.committed_bytes
        for seq_id, tokens in self.live.items():
            assert stored(manager.cache, manager.slots[seq_id], len(tokens)) == [tokens] * (2 * LAYERS)
        assert set(manager.swapped) == set(self.swapped)

    def teardown(self):
        for seq_id in [*self.live, *self.swapped]:
            self.manager.free(seq_id)
        self.manager.reset()
        self.manager.check_invariants()
        assert self.manager.cache.resident_bytes() == 0 and self.manager.swap_bytes_used == 0, "memory leaked"


class VirtualKVManagerDeferredMachine(VirtualKVManagerMachine):
    DEFERRED = True


VirtualKVManagerMachine.TestCase.settings = MACHINE_SETTINGS
VirtualKVManagerDeferredMachine.TestCase.settings = MACHINE_SETTINGS
TestVirtualKVManagerStateMachine = VirtualKVManagerMachine.TestCase
TestVirtualKVManagerStateMachineDeferredReclaim = VirtualKVManagerDeferredMachine.TestCase
