"""The CPU block pool: blocks of swapped-out sequences, and the CPU tier of the prefix cache.

Preemption by swap and the CPU tier share one pool. The tier copies a cached device block that is
being evicted into a CPU block (an offload) instead of dropping it, and a later prefix hit copies
it back (a load). Neither starves the other: the tier takes a block only while it holds fewer than
``num_prefix_blocks``, and a swap-out that finds no free block evicts the tier's least recently
used block, so swapping never fails because the tier filled the pool (live sequences outrank a
cache); the tier gets its room back as swapped sequences return.

Invariants (``check_invariants``):
- every block is in exactly one of: held by swapped sequences (``ref_counts`` > 0, counted by the
  block manager's CPU tables), the free list, the tier (unheld, named by a hash, in its LRU), or
  the blocks the plan being built reads (unheld, unnamed: swap-in and tier-load sources);
- the tier holds at most ``num_prefix_blocks`` blocks;
- a pending offload fills a block the tier holds, or one this plan also reads back.
A block read by the plan being built is free again only at ``end_plan`` (after the runner copied
it out), and an offload whose block the tier gives up within the same plan is dropped, since the
block's next owner writes it: so no block is written twice, or written before it is read, in one
plan, whatever order the runner applies the plan's copies in.
"""
from __future__ import annotations

from collections import deque

from paged.prefix_cache import PrefixCache


class CpuBlockPool:
    def __init__(self, num_blocks: int, num_prefix_blocks: int = 0):
        if not 0 <= num_prefix_blocks <= num_blocks:
            raise ValueError(f"num_cpu_prefix_blocks must be in [0, num_cpu_blocks={num_blocks}], "
                             f"got {num_prefix_blocks}")
        self.num_blocks = num_blocks
        self.num_prefix_blocks = num_prefix_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        # The tier: every entry is parked, since nobody holds a CPU-tier block.
        self.prefix_cache = PrefixCache(enabled=num_prefix_blocks > 0)
        self.read_ids: list[int] = []
        self._offloads: dict[int, int] = {}   # cpu block -> the device block it copies
        self.num_offloads = 0

    @property
    def num_free(self) -> int:
        """Blocks a swap-out can take: free ones plus tier ones (evicted on demand)."""
        return len(self.free_ids) + self.prefix_cache.num_evictable

    @property
    def num_cached(self) -> int:
        return self.prefix_cache.num_evictable

    # ---- swap -------------------------------------------------------------------------------
    def take(self) -> int:
        """A block for a swap-out, held once: a free one, else the tier's least recently used."""
        block_id = self.free_ids.popleft() if self.free_ids else self._evict()
        if block_id is None:
            raise RuntimeError("CPU block pool exhausted (the scheduler should have checked)")
        self.ref_counts[block_id] = 1
        return block_id

    def hold(self, block_id: int) -> None:
        self.ref_counts[block_id] += 1

    def release(self, block_id: int, read_by_plan: bool = False) -> None:
        """``read_by_plan``: the plan being built still copies the block out (a swap-in)."""
        self.ref_counts[block_id] -= 1
        assert self.ref_counts[block_id] >= 0, f"cpu block {block_id} released too often"
        if self.ref_counts[block_id] == 0:
            (self.read_ids if read_by_plan else self.free_ids).append(block_id)

    # ---- the prefix tier --------------------------------------------------------------------
    def offload(self, device_block_id: int, block_hash: int) -> None:
        """A cached device block is being evicted: copy it into the tier if there is room."""
        if not self.num_prefix_blocks:
            return
        if self.prefix_cache.num_evictable < self.num_prefix_blocks and self.free_ids:
            block_id = self.free_ids.popleft()
        else:
            block_id = self._evict()
            if block_id is None:
                return  # swapped sequences hold the whole pool: the block is dropped
        self.prefix_cache.register(block_hash, block_id)
        self.prefix_cache.park(block_id)
        self._offloads[block_id] = device_block_id
        self.num_offloads += 1

    def lookup(self, block_hash: int) -> int | None:
        return self.prefix_cache.lookup(block_hash)

    def take_hit(self, block_id: int) -> int:
        """A prefix hit loads the block back to the device: it leaves the tier (its hash goes to
        the device copy) and is read by this plan. Returns its hash."""
        block_hash = self.prefix_cache.forget(block_id)
        assert block_hash is not None, f"cpu block {block_id} is not in the tier"
        self.read_ids.append(block_id)
        return block_hash

    def drop(self, block_hash: int) -> None:
        """The block was computed again on the device; the device copy wins."""
        block_id = self.prefix_cache.lookup(block_hash)
        if block_id is not None:
            self.prefix_cache.forget(block_id)
            self._offloads.pop(block_id, None)
            self.free_ids.append(block_id)

    def _evict(self) -> int | None:
        block_id = self.prefix_cache.evict_lru()
        if block_id is not None:
            self._offloads.pop(block_id, None)  # its next owner's content supersedes the copy
        return block_id

    # ---- the plan ---------------------------------------------------------------------------
    def take_offloads(self) -> list[tuple[int, int]]:
        """(device block, cpu block) copies decided since the last call."""
        offloads = [(device, cpu) for cpu, device in self._offloads.items()]
        self._offloads = {}
        return offloads

    def end_plan(self) -> None:
        """The plan ran (or was dropped): the blocks it read are free again."""
        self.free_ids.extend(self.read_ids)
        self.read_ids = []

    def forget_offloads(self, offloads: list[tuple[int, int]]) -> None:
        """A plan failed: its offloads may not have run, so the tier forgets what they filled."""
        for _, block_id in offloads:
            if self.prefix_cache.forget(block_id) is not None:
                self.free_ids.append(block_id)

    def check_invariants(self, held_counts: list[int], device_cache: PrefixCache) -> None:
        """``held_counts``: references per block from the swapped sequences' tables."""
        assert held_counts == self.ref_counts, "cpu ref counts differ from cpu block tables"
        free, tier, read = set(self.free_ids), set(self.prefix_cache.evictable_block_ids()), set(self.read_ids)
        assert len(free) == len(self.free_ids), "a cpu block is on the free list twice"
        assert len(read) == len(self.read_ids), "a cpu block is read twice by one plan"
        assert not (free & tier or free & read or tier & read), "a cpu block is in two places"
        for block_id in range(self.num_blocks):
            unused = block_id in free or block_id in tier or block_id in read
            assert unused == (self.ref_counts[block_id] == 0), f"cpu block {block_id} both free and used, or lost"
        assert len(tier) <= self.num_prefix_blocks, "the CPU tier outgrew its share"
        assert self.prefix_cache.num_cached == len(tier), "a CPU-tier block is named but not parked"
        self.prefix_cache.check_invariants()
        for block_id in tier:
            assert device_cache.lookup(self.prefix_cache.hash_of(block_id)) is None, \
                "a hash names blocks in both tiers"
        for block_id in self._offloads:
            assert block_id in tier or block_id in read, "an offload fills a block the tier lost"
