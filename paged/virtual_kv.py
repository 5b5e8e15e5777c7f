"""Virtual-contiguous KV memory: every sequence slot owns one contiguous range of address space for
all its layers' K and V, and physical pages are committed by the OS as tokens are written.

One ``AnonymousMapping`` (reserved, not committed) holds the whole cache, slot-major: slot s, layer
l, K (kv = 0) or V (kv = 1) is the region at ``(s * 2 * num_layers + 2 * l + kv) * region_bytes``,
``region_bytes`` = max_model_len tokens rounded up to whole pages, so no page is shared by two
regions. ``key_caches[l]`` / ``value_caches[l]`` are views [max_num_seqs, max_model_len,
num_kv_heads, head_dim] over it, the layout of ``paged_kernels.contiguous_attention``. Writing
token t of a slot commits the page holding it in each region; ``release`` returns a slot's pages
with MADV_DONTNEED, or, with ``deferred_reclaim``, keeps them mapped as a warm slot that the next
``allocate`` reuses without page faults, until ``trim`` reclaims them (and ``return_slack`` the pages
a shorter sequence in a reused slot does not reach).

Words: a slot's ``reserved`` tokens are those its sequence may have written (the scheduler reserves
before a step writes, as ``allocate_slots`` does for blocks); its ``touched`` tokens are the most
it has reserved since its pages were last returned: pages may be resident up to there.

Invariants (``check_invariants`` asserts them; the state-machine test runs it after every step):
- every slot is exactly one of free (no page resident), warm (pages kept, no sequence) or live;
- a live slot has reserved <= touched <= max_model_len; a warm slot has touched > 0 and nothing
  reserved; a free slot has touched == 0;
- ``committed_pages`` == 2 * num_layers * sum over slots of pages(touched), pages(n) being the
  pages n tokens span from a region's start;
- the OS agrees: the mapping's resident bytes (mincore) are at most ``committed_bytes``, a free
  slot has none, and no region has a page resident past pages(touched). When every reserved token
  has been written and huge pages were granted where asked, resident equals committed (tests).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from paged.os_memory import (AnonymousMapping, base_page_bytes, huge_page_bytes_of_host, huge_pages_unavailable,
                             round_up)


@dataclass
class SwappedKV:
    """A swapped-out sequence: its ``num_tokens`` tokens of K and V for every layer, in CPU memory
    outside the mapping ([2 * num_layers, num_tokens, num_kv_heads, head_dim]: K of layer l at 2l,
    V at 2l + 1)."""
    kv: torch.Tensor
    num_tokens: int


class VirtualKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_num_seqs: int, max_model_len: int, *, huge_pages: bool = False,
                 deferred_reclaim: bool = False):
        """``huge_pages``: back the cache with transparent huge pages (MADV_HUGEPAGE), so each region
        grows 2 MiB at a time; ValueError where the host has them off. ``deferred_reclaim``: keep a
        released slot's pages for the next sequence (see the module docstring)."""
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if huge_pages and (reason := huge_pages_unavailable()) is not None:
            raise ValueError(f"huge_pages: {reason}")
        self.num_layers, self.max_num_seqs, self.max_model_len = num_layers, max_num_seqs, max_model_len
        self.huge_pages, self.deferred_reclaim = huge_pages, deferred_reclaim
        self.page_bytes = huge_page_bytes_of_host() if huge_pages else base_page_bytes()
        self.token_bytes = num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.region_bytes = round_up(max_model_len * self.token_bytes, self.page_bytes)
        self.regions_per_slot = 2 * num_layers
        self.slot_bytes = self.regions_per_slot * self.region_bytes
        self.mapping = AnonymousMapping(max_num_seqs * self.slot_bytes, alignment=self.page_bytes,
                                        huge_pages=huge_pages)
        flat = self.mapping.tensor().view(dtype)
        size = (max_num_seqs, max_model_len, num_kv_heads, head_dim)
        element = flat.element_size()
        stride = (self.slot_bytes // element, num_kv_heads * head_dim, head_dim, 1)
        self.key_caches = [flat.as_strided(size, stride, 2 * layer * self.region_bytes // element)
                           for layer in range(num_layers)]
        self.value_caches = [flat.as_strided(size, stride, (2 * layer + 1) * self.region_bytes // element)
                             for layer in range(num_layers)]
        self.free_slots: deque[int] = deque(range(max_num_seqs))
        self.warm_slots: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.reserved: dict[int, int] = {}  # live slot -> tokens reserved
        self.touched = [0] * max_num_seqs
        self.committed_pages = 0
        self.peak_committed_pages = 0

    # ---- accounting -------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        """Pages (all layers, K and V) that a slot holding ``num_tokens`` tokens commits."""
        return self.regions_per_slot * self._region_pages(num_tokens)

    def _region_pages(self, num_tokens: int) -> int:
        return -(-num_tokens * self.token_bytes // self.page_bytes)

    @property
    def committed_bytes(self) -> int:
        return self.committed_pages * self.page_bytes

    @property
    def num_free_slots(self) -> int:
        """Slots ``allocate`` can hand out: free and warm ones."""
        return len(self.free_slots) + len(self.warm_slots)

    def pages_to_grow(self, slot: int, num_tokens: int) -> int:
        """Pages that ``reserve(slot, num_tokens)`` would commit (0 where they are resident)."""
        return max(0, self.pages_for(num_tokens) - self.pages_for(self.touched[slot]))

    def resident_bytes(self) -> int:
        """The mapping's bytes in memory now, asked of the OS (mincore)."""
        return self.mapping.resident_bytes()

    def _set_touched(self, slot: int, num_tokens: int) -> None:
        self.committed_pages += self.pages_for(num_tokens) - self.pages_for(self.touched[slot])
        self.touched[slot] = num_tokens
        self.peak_committed_pages = max(self.peak_committed_pages, self.committed_pages)

    # ---- slots ------------------------------------------------------------------------------
    def next_slot(self) -> int | None:
        """The slot ``allocate`` would hand out now (nothing changes), None when all are live."""
        if self.warm_slots:
            return next(reversed(self.warm_slots))
        return self.free_slots[0] if self.free_slots else None

    def allocate(self) -> int | None:
        """A slot for a new sequence, None when all are live. A warm slot first (most recently
        released: its pages are the likeliest to be in the CPU caches), else a free one."""
        if self.warm_slots:
            slot, _ = self.warm_slots.popitem(last=True)
        elif self.free_slots:
            slot = self.free_slots.popleft()
        else:
            return None
        self.reserved[slot] = 0
        return slot

    def reserve(self, slot: int, num_tokens: int) -> None:
        """The sequence in ``slot`` will hold ``num_tokens`` tokens once the next step has written
        them (never fewer than before). Call before the step; admission checks ``pages_to_grow``."""
        if slot not in self.reserved:
            raise ValueError(f"slot {slot} holds no sequence")
        if not self.reserved[slot] <= num_tokens <= self.max_model_len:
            raise ValueError(f"slot {slot}: cannot reserve {num_tokens} tokens (holds {self.reserved[slot]}, "
                             f"max_model_len {self.max_model_len})")
        self.reserved[slot] = num_tokens
        if num_tokens > self.touched[slot]:
            self._set_touched(slot, num_tokens)

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` is finished (or preempted for recompute): its pages go back to
        the OS, or, with deferred reclaim, stay for the next sequence."""
        if self.reserved.pop(slot, None) is None:
            raise ValueError(f"slot {slot} holds no sequence")
        if self.deferred_reclaim and self.touched[slot] > 0:
            self.warm_slots[slot] = None
        else:
            self._return_pages(slot)
            self.free_slots.append(slot)

    def trim(self, max_pages: int) -> int:
        """Deferred reclaim: give warm slots' pages back, least recently released first, until at
        most ``max_pages`` are committed (or no warm slot is left). Returns the pages freed."""
        before = self.committed_pages
        while self.committed_pages > max_pages and self.warm_slots:
            slot, _ = self.warm_slots.popitem(last=False)
            self._return_pages(slot)
            self.free_slots.append(slot)
        return before - self.committed_pages

    def slack_pages(self, slot: int) -> int:
        """Pages a live slot holds past its reserved tokens (a longer sequence's, before it took
        the slot warm): ``return_slack`` can give them back."""
        return self.pages_for(self.touched[slot]) - self.pages_for(self.reserved[slot])

    def return_slack(self, slot: int) -> int:
        """Give a live slot's pages past its reserved tokens back to the OS; returns the pages freed."""
        keep = self._region_pages(self.reserved[slot]) * self.page_bytes
        length = self._region_pages(self.touched[slot]) * self.page_bytes - keep
        if length <= 0:
            return 0
        for region in range(self.regions_per_slot):
            self.mapping.release(slot * self.slot_bytes + region * self.region_bytes + keep, length)
        before = self.committed_pages
        self._set_touched(slot, self.reserved[slot])
        return before - self.committed_pages

    def _return_pages(self, slot: int) -> None:
        # Only the pages that may be resident: madvise's cost grows with the range it walks.
        length = self._region_pages(self.touched[slot]) * self.page_bytes
        for region in range(self.regions_per_slot):
            self.mapping.release(slot * self.slot_bytes + region * self.region_bytes, length)
        self._set_touched(slot, 0)

    # ---- swap -------------------------------------------------------------------------------
    def swap_out(self, slot: int) -> SwappedKV:
        """Copy the slot's reserved tokens (all layers, K and V) to CPU memory, then return its
        pages to the OS (never kept warm: swapping is for memory pressure) and free the slot."""
        num_tokens = self.reserved.get(slot)
        if num_tokens is None:
            raise ValueError(f"slot {slot} holds no sequence")
        caches = [cache for layer in range(self.num_layers)
                  for cache in (self.key_caches[layer], self.value_caches[layer])]
        kv = torch.stack([cache[slot, :num_tokens] for cache in caches])
        del self.reserved[slot]
        self._return_pages(slot)
        self.free_slots.append(slot)
        return SwappedKV(kv, num_tokens)

    def swap_in(self, swapped: SwappedKV) -> int | None:
        """A slot holding the swapped sequence's tokens again, None when no slot is available."""
        slot = self.allocate()
        if slot is None:
            return None
        self.reserve(slot, swapped.num_tokens)
        for layer in range(self.num_layers):
            self.key_caches[layer][slot, :swapped.num_tokens] = swapped.kv[2 * layer]
            self.value_caches[layer][slot, :swapped.num_tokens] = swapped.kv[2 * layer + 1]
        return slot

    # ---- checks -----------------------------------------------------------------------------
    def check_invariants(self, check_os: bool = True) -> None:
        """Assert the invariants in the module docstring; ``check_os``: also ask the OS (mincore)."""
        free, warm, live = set(self.free_slots), set(self.warm_slots), set(self.reserved)
        assert len(free) == len(self.free_slots), "a slot is free twice"
        assert not (free & warm or free & live or warm & live), "a slot is in two states"
        assert free | warm | live == set(range(self.max_num_seqs)), "a slot is lost"
        for slot in free:
            assert self.touched[slot] == 0, f"free slot {slot} has touched tokens"
        for slot in warm:
            assert self.touched[slot] > 0, f"warm slot {slot} keeps no pages"
        for slot, reserved in self.reserved.items():
            assert 0 <= reserved <= self.touched[slot] <= self.max_model_len, f"slot {slot} reserved past touched"
        assert self.committed_pages == sum(self.pages_for(n) for n in self.touched), "page counter drifted"
        if not check_os:
            return
        assert self.resident_bytes() <= self.committed_bytes, "more resident than committed"
        for slot in range(self.max_num_seqs):
            kept = self._region_pages(self.touched[slot]) * self.page_bytes
            for region in range(self.regions_per_slot):
                start = slot * self.slot_bytes + region * self.region_bytes
                assert self.mapping.resident_bytes(start + kept, self.region_bytes - kept) == 0, \
                    f"slot {slot} region {region} has pages resident past its touched tokens"
