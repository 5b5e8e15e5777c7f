"""The KV manager of ``kv_memory: virtual`` (the protocol: paged/kv_manager.py): sequences in
contiguous slots of one reserved mapping (``VirtualKVCache``, paged/virtual_kv.py), physical pages
committed by the OS as tokens are written, within a budget of pages.

The scheduler's calls in page terms: ``allocate_slots`` gives a new sequence a slot and reserves
the tokens the next step writes; what that commits (``pages_to_grow``) must fit the budget, after
trimming the warm slots that deferred reclaim keeps (least recently released first) and the slack
of live slots (pages past their tokens that a longer sequence left in a reused warm slot), or
nothing changes and the answer is None (the scheduler then preempts, as it does when blocks run short).
Preemption by recompute releases the slot (its pages return, or stay warm); by swap, the slot's
written tokens are copied to CPU memory (at most ``swap_space_bytes`` in all) and its pages return.

The manager owns the memory it commits (``shared_memory``, the VirtualKVCache): it commits and
returns pages between steps, while no step runs, and the in-process executor writes and reads
through the cache's views. So swaps copy right away and never appear in the plan, and kv_memory
virtual runs in one process only (the config refuses tensor parallel).

Invariants (``check_invariants``, after the cache's own, which include what the OS reports):
- every running sequence holds exactly one live slot and every live slot one sequence; a swapped
  sequence holds none, and its tokens are in ``swapped``;
- committed pages never exceed the budget (every commit is checked first);
- ``swap_bytes_used`` is the bytes of the swapped tokens, at most ``swap_space_bytes``.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from paged.errors import InvalidRequestError
from paged.os_memory import transparent_huge_page_mode
from paged.stats import VirtualKVStats
from paged.virtual_kv import SwappedKV, VirtualKVCache

if TYPE_CHECKING:
    from paged.kv_sizing import VirtualKVLayout
    from paged.models.llama import ModelArgs
    from paged.sampling_params import SamplingParams
    from paged.sequence import Sequence

# What kv_memory virtual cannot do (no block table, one process on the CPU): describe reports it.
REFUSED = (
    "enable_prefix_caching (prefix caching shares blocks)",
    "cpu_prefix_cache_bytes (the CPU tier of the prefix cache)",
    "pinned shared prefixes (register_prefix, the handler's shared_prefixes)",
    "n > 1, best_of > 1 and beam search (they share the prompt's blocks)",
    "block_size auto and num_kv_blocks (no blocks: kv_cache_memory_bytes is the budget)",
    "tensor_parallel_size > 1 (one process)",
    "CUDA devices (would need CUDA's virtual memory API, cuMemMap)",
)


class VirtualKVManager:
    prefix_caching_enabled = False

    def __init__(self, cache: VirtualKVCache, num_pages: int, swap_space_bytes: int):
        """``num_pages``: the budget of committed pages; ``swap_space_bytes``: the most CPU memory
        swapped-out sequences may take (0: preemption by recompute only)."""
        if num_pages <= 0 or swap_space_bytes < 0:
            raise ValueError(f"num_pages must be positive and swap_space_bytes >= 0, got {num_pages}, "
                             f"{swap_space_bytes}")
        self.cache = cache
        self.shared_memory = cache
        self.block_size = cache.max_model_len   # a slot is a sequence's one block
        self.num_pages = num_pages
        self.swap_space_bytes = swap_space_bytes
        self.token_bytes = cache.regions_per_slot * cache.token_bytes   # K and V over all layers
        self.slots: dict[int, int] = {}             # running sequence -> its live slot
        self.swapped: dict[int, SwappedKV] = {}     # swapped-out sequence -> its tokens
        self.swap_bytes_used = 0

    @classmethod
    def for_layout(cls, layout: "VirtualKVLayout", args: "ModelArgs", dtype: str) -> "VirtualKVManager":
        """Reserve the mapping the layout describes (address space only) and manage it."""
        cache = VirtualKVCache(args.num_layers, args.num_kv_heads, args.head_dim, getattr(torch, dtype),
                               layout.max_num_seqs, layout.max_model_len, huge_pages=layout.huge_pages,
                               deferred_reclaim=layout.deferred_reclaim)
        return cls(cache, layout.num_pages, layout.swap_space_bytes)

    # ---- admission ------------------------------------------------------------------------
    def check_request_fits(self, num_prompt_tokens: int, params: "SamplingParams") -> None:
        """Raise InvalidRequestError when the request's longest sequence needs more pages than the
        whole budget. (Requests of several sequences are refused by the request validator.)"""
        needed = self.cache.pages_for(num_prompt_tokens + params.max_tokens)
        if needed > self.num_pages:
            raise InvalidRequestError("max_tokens", f"request needs up to {needed} KV pages of {self.cache.page_bytes} "
                                                    f"bytes but the budget (kv_cache_memory_bytes) holds "
                                                    f"{self.num_pages} (short by {needed - self.num_pages})")

    def check_pin_fits(self, token_ids: list[int], max_model_len: int) -> None:
        raise InvalidRequestError("prompt", "shared prefixes are pinned KV blocks, and kv_memory 'virtual' has no "
                                            "blocks to pin: use kv_memory 'paged' for shared prefixes")

    # ---- sequences ------------------------------------------------------------------------
    def _warm_pages(self) -> int:
        cache = self.cache
        return sum(cache.pages_for(cache.touched[slot]) for slot in cache.warm_slots)

    def _trimmable(self, exclude: int | None) -> int:
        """Pages that could be given back without touching a sequence's tokens: the warm slots',
        and the slack of live slots (pages past their reserved tokens that a longer sequence left
        in a reused warm slot), ``exclude`` (a slot about to grow or be taken) left out."""
        cache = self.cache
        warm = sum(cache.pages_for(cache.touched[s]) for s in cache.warm_slots if s != exclude)
        return warm + sum(cache.slack_pages(s) for s in cache.reserved if s != exclude)

    def _has_room(self, num_pages: int, exclude: int | None = None) -> bool:
        """Could ``num_pages`` more be committed within the budget, once trimmable pages go back?"""
        cache = self.cache
        if cache.committed_pages + num_pages <= self.num_pages:
            return True
        return cache.committed_pages - self._trimmable(exclude) + num_pages <= self.num_pages

    def _make_room(self, num_pages: int, exclude: int | None = None) -> None:
        """Give pages back until ``num_pages`` more fit (after ``_has_room`` said they can): warm
        slots first, least recently released first, then the slack of live slots."""
        cache = self.cache
        target = self.num_pages - num_pages
        if cache.committed_pages <= target:
            return
        cache.trim(target)
        for slot in list(cache.reserved):
            if cache.committed_pages <= target:
                break
            if slot != exclude:
                cache.return_slack(slot)

    def allocate_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int,
                       new_computed_blocks: list | None = None) -> list[tuple[int, int]] | None:
        """Reserve ``num_computed_tokens + num_new_tokens`` tokens in the sequence's slot (a new
        sequence takes one); None, changing nothing, when no slot is available or the pages it
        would commit do not fit the budget. Never any copy (nothing is shared)."""
        assert not new_computed_blocks, "kv_memory virtual has no prefix cache"
        cache = self.cache
        slot = self.slots.get(seq_id)
        fresh = slot is None
        if fresh:
            slot = cache.next_slot()
            if slot is None:
                return None
        num_tokens = num_computed_tokens + num_new_tokens
        grow = cache.pages_to_grow(slot, num_tokens)
        if grow and not self._has_room(grow, exclude=slot):
            return None
        if fresh:
            cache.allocate()   # ``slot``: live now, so trimming warm slots cannot take its pages
            self.slots[seq_id] = slot
        self._make_room(grow, exclude=slot)
        cache.reserve(slot, num_tokens)
        return []

    def block_table(self, seq_id: int) -> list[int]:
        slot = self.slots.get(seq_id)
        return [] if slot is None else [slot]

    def free(self, seq_id: int) -> None:
        """The sequence is done or preempted for recompute: its slot's pages return (or stay warm)
        and a swapped copy is dropped."""
        slot = self.slots.pop(seq_id, None)
        if slot is not None:
            self.cache.release(slot)
        swapped = self.swapped.pop(seq_id, None)
        if swapped is not None:
            self.swap_bytes_used -= swapped.kv.nbytes

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        raise RuntimeError("kv_memory 'virtual' cannot fork a sequence (requests of several sequences are refused "
                           "before they are queued)")

    # ---- no prefix cache, no pins --------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> list:
        return []

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        """Nothing to count: there is no prefix cache."""

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None:
        """Nothing to cache: there is no prefix cache."""

    def pin_prefix(self, key: Hashable, token_ids: list[int]) -> int:
        self.check_pin_fits(token_ids, self.block_size)
        return 0

    def unpin_prefix(self, key: Hashable) -> int:
        raise KeyError(key)

    # ---- preemption by swap -----------------------------------------------------------------
    def swap_out_bytes(self, seq_ids: list[int]) -> int:
        """Bytes a swap-out copies: the written tokens of each slot, every layer's K and V."""
        return sum(self.cache.reserved[self.slots[s]] for s in seq_ids) * self.token_bytes

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        return self.swap_bytes_used + self.swap_out_bytes(seq_ids) <= self.swap_space_bytes

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Copy each sequence's written tokens to CPU memory now and return its slot's pages (no
        plan moves: nothing runs between steps that could still read them)."""
        for seq_id in seq_ids:
            swapped = self.cache.swap_out(self.slots.pop(seq_id))
            self.swapped[seq_id] = swapped
            self.swap_bytes_used += swapped.kv.nbytes
        return []

    def can_swap_in(self, seq_ids: list[int], num_tokens_after: list[int]) -> bool:
        """A slot each, and the pages for ``num_tokens_after[i]`` tokens each within the budget
        once trimmable pages go back (counted as if every slot were fresh)."""
        cache = self.cache
        if cache.num_free_slots < len(seq_ids):
            return False
        needed = sum(cache.pages_for(n) for n in num_tokens_after)
        return cache.committed_pages - self._trimmable(None) + needed <= self.num_pages

    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Copy the sequences' tokens back into slots now (after ``can_swap_in``)."""
        for seq_id in seq_ids:
            swapped = self.swapped.pop(seq_id)
            pages = self.cache.pages_for(swapped.num_tokens)   # as if the slot were fresh: at least enough
            if not self._has_room(pages):
                raise RuntimeError("swap-in without room (the scheduler should have checked can_swap_in)")
            self._make_room(pages)
            self.slots[seq_id] = self.cache.swap_in(swapped)
            self.swap_bytes_used -= swapped.kv.nbytes
        return []

    # ---- the plan: nothing to move ------------------------------------------------------------
    def take_prefix_moves(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return [], []

    def end_plan(self) -> None:
        """No plan holds anything of the manager's."""

    def drop_prefix_moves(self, offloads: list[tuple[int, int]], loads: list[tuple[int, int]]) -> None:
        """No plan moves to forget."""

    # ---- state ------------------------------------------------------------------------------
    def usage_sample(self, running: list["Sequence"]) -> tuple[float, int, int] | None:
        """(live tokens' bytes / the bytes of the live slots' pages, live pages, live pages): the
        page-granular waste; nothing is shared."""
        live_pages = self.cache.committed_pages - self._warm_pages()
        if live_pages == 0:
            return None
        live_bytes = sum(seq.num_computed_tokens for seq in running) * self.token_bytes
        return min(1.0, live_bytes / (live_pages * self.cache.page_bytes)), live_pages, live_pages

    def make_stats(self) -> VirtualKVStats:
        cache = self.cache
        return VirtualKVStats(
            page_bytes=cache.page_bytes, num_pages=self.num_pages, committed_pages=cache.committed_pages,
            warm_pages=self._warm_pages(), peak_committed_pages=cache.peak_committed_pages,
            num_slots=cache.max_num_seqs, free_slots=cache.num_free_slots, warm_slots=len(cache.warm_slots),
            max_model_len=cache.max_model_len, token_bytes=self.token_bytes, swap_space_bytes=self.swap_space_bytes,
            swap_bytes_used=self.swap_bytes_used, huge_pages=cache.huge_pages, deferred_reclaim=cache.deferred_reclaim)

    def describe(self) -> dict:
        cache = self.cache
        return {"kv_memory": "virtual", "page_bytes": cache.page_bytes, "huge_pages": cache.huge_pages,
                "transparent_huge_pages": transparent_huge_page_mode(),
                "reclaim": "deferred" if cache.deferred_reclaim else "eager", "num_slots": cache.max_num_seqs,
                "max_model_len": cache.max_model_len, "token_bytes": self.token_bytes,
                "reserved_address_bytes": cache.mapping.size, "budget_bytes": self.num_pages * cache.page_bytes,
                "swap_space_bytes": self.swap_space_bytes, "refuses": list(REFUSED)}

    def reset(self) -> None:
        """Forget every sequence's KV (only once none is held) and give the warm pages back."""
        assert not self.slots and not self.swapped, "reset while sequences hold KV"
        self.cache.trim(0)

    def check_invariants(self, check_os: bool = True) -> None:
        """Assert the invariants in the module docstring (the cache's too; ``check_os``: ask mincore)."""
        cache = self.cache
        cache.check_invariants(check_os)
        assert sorted(self.slots.values()) == sorted(cache.reserved), "slots and live sequences differ"
        assert not set(self.slots) & set(self.swapped), "a sequence is both running and swapped"
        assert cache.committed_pages <= self.num_pages, "committed pages exceed the budget"
        assert self.swap_bytes_used == sum(s.kv.nbytes for s in self.swapped.values()), "swap bytes drifted"
        assert self.swap_bytes_used <= self.swap_space_bytes, "swap space exceeded"
