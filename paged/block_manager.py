"""The KV block pool: per-sequence block tables, reference counts, copy-on-write, swap, prefix cache,
pinned prefixes and (through ``CpuBlockPool``) the CPU tier of the prefix cache. The KV manager of
``kv_memory: paged`` (the protocol: paged/kv_manager.py).

Invariants (``check_invariants`` asserts them; the property tests call it after every operation):
- every device block is in exactly one of: held (ref_count > 0: named by block tables and/or
  pins), the free list, or the evictable LRU of cached-but-unused blocks (ref_count == 0,
  content still valid);
- a block's ref_count equals the number of block-table entries, over all sequences, naming it,
  plus the number of pinned prefixes holding it; a pinned block carries a prefix hash;
- the same holds for the CPU pool's swap tables (``paged/cpu_block_pool.py`` lists the rest);
- only full blocks whose KV is computed carry a prefix hash, and a hash names one block, on the
  device or on the CPU tier, never both;
- a pending load copies a CPU block the plan reads into a device block that is held.
Blocks that a sequence will write into are never shared: a write into a shared partly filled
block first copies it (copy-on-write), and cached full blocks are never written again.

Block moves decided while planning a step run, in ``KVCache.apply``, in this order: swap-outs and
CPU-tier offloads (device -> CPU), then swap-ins and CPU-tier loads (CPU -> device), then
copy-on-write copies, then the model writes. So a device block's old content leaves before its
new content arrives; on the CPU side the pool never reuses a block within the plan that reads it.

One class of ~500 lines on purpose: every operation below moves reference counts that the
invariants above relate across the device pool, the prefix cache, pins and the swap tables, and
``check_invariants`` must see all of them at once.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from typing import TYPE_CHECKING

from paged.cpu_block_pool import CpuBlockPool
from paged.errors import InvalidRequestError
from paged.prefix_cache import PrefixCache, hash_block_tokens
from paged.stats import KVCacheStats, PinnedPrefixStats

if TYPE_CHECKING:
    from paged.sampling_params import SamplingParams
    from paged.sequence import Sequence


@dataclass(frozen=True)
class CpuHit:
    """A prefix-cache hit that lives in the CPU tier: ``cpu_block_id`` holds the block's KV.
    ``find_cached_prefix`` returns these beside plain device block ids."""
    cpu_block_id: int


class BlockManager:
    shared_memory = None  # the executor allocates the pools (paged/kv_manager.py)

    def __init__(self, num_blocks: int, num_cpu_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True, num_cpu_prefix_blocks: int = 0, *, block_bytes: int = 0):
        """``num_cpu_blocks``: the whole CPU pool; ``num_cpu_prefix_blocks`` of it at most may hold
        the CPU tier of the prefix cache (0: no tier). ``block_bytes``: one block's K and V over
        all layers (what the stats and the swap cost count in bytes)."""
        if num_blocks <= 0 or block_size <= 0 or num_cpu_blocks < 0:
            raise ValueError("num_blocks and block_size must be positive, num_cpu_blocks >= 0")
        if num_cpu_prefix_blocks and not enable_prefix_caching:
            raise ValueError("the CPU tier of the prefix cache needs prefix caching enabled")
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.peak_blocks_off_free_list = 0   # since start: the most blocks holding KV at once
        self._empty(enable_prefix_caching, num_cpu_prefix_blocks)

    def _empty(self, enable_prefix_caching: bool, num_cpu_prefix_blocks: int) -> None:
        self.ref_counts = [0] * self.num_blocks
        self.free_block_ids: deque[int] = deque(range(self.num_blocks))
        self.prefix_cache = PrefixCache(enabled=enable_prefix_caching)
        self.block_tables: dict[int, list[int]] = {}
        # Hashes of the leading full blocks of each sequence that are registered in the cache.
        self.seq_block_hashes: dict[int, list[int]] = {}
        self.cpu_pool = CpuBlockPool(self.num_cpu_blocks, num_cpu_prefix_blocks)
        self.cpu_block_tables: dict[int, list[int]] = {}
        # Pinned prefixes: key -> the device blocks each holds one reference to.
        self.pins: dict[Hashable, list[int]] = {}
        self.pin_hit_tokens: dict[Hashable, int] = {}
        self.cpu_hit_tokens = 0
        self._loads: list[tuple[int, int]] = []  # CPU-tier loads of the plan being built: (cpu, device)

    def reset(self) -> None:
        """Forget every block, as if the pool had just been built: cached prefixes, pins and the CPU
        tier go too (their KV is gone, e.g. with a failed tensor-parallel group); the prefix
        query counters carry over. Only while no sequence holds blocks."""
        assert not self.block_tables and not self.cpu_block_tables, "reset while sequences hold blocks"
        queried, hit = self.prefix_cache.queried_tokens, self.prefix_cache.hit_tokens
        self._empty(self.prefix_cache.enabled, self.cpu_pool.num_prefix_blocks)
        self.prefix_cache.queried_tokens, self.prefix_cache.hit_tokens = queried, hit

    def make_stats(self) -> KVCacheStats:
        """The pool's counters now (no work beyond counting)."""
        return KVCacheStats(
            num_blocks=self.num_blocks, block_size=self.block_size, free_blocks=self.num_free_blocks,
            cached_free_blocks=self.prefix_cache.num_evictable, num_cpu_blocks=self.num_cpu_blocks,
            free_cpu_blocks=self.num_free_cpu_blocks, prefix_queries=self.prefix_cache.queried_tokens,
            prefix_hits=self.prefix_cache.hit_tokens, cpu_prefix_hits=self.cpu_hit_tokens,
            cpu_prefix_blocks=self.cpu_pool.num_prefix_blocks, cpu_prefix_cached_blocks=self.cpu_pool.num_cached,
            pinned_blocks=self.num_pinned_blocks,
            pinned={key: PinnedPrefixStats(len(blocks) * self.block_size, self.pin_hit_tokens[key])
                    for key, blocks in self.pins.items()},
            block_bytes=self.block_bytes, blocks_off_free_list=self.num_blocks - len(self.free_block_ids),
            peak_blocks_off_free_list=self.peak_blocks_off_free_list)

    def describe(self) -> dict:
        """The memory model and its granularity (see ``paged.kv_manager.KVManager.describe``)."""
        return {"kv_memory": "paged", "block_size": self.block_size, "block_bytes": self.block_bytes,
                "num_blocks": self.num_blocks, "budget_bytes": self.num_blocks * self.block_bytes,
                "prefix_caching": self.prefix_caching_enabled, "refuses": []}

    # ---- accounting -------------------------------------------------------------------------
    @property
    def prefix_caching_enabled(self) -> bool:
        return self.prefix_cache.enabled

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used ones plus cached ones nobody holds."""
        return len(self.free_block_ids) + self.prefix_cache.num_evictable

    @property
    def num_free_cpu_blocks(self) -> int:
        """CPU blocks a swap-out can take: free ones plus CPU-tier ones (evicted on demand)."""
        return self.cpu_pool.num_free

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pinned_block_set())

    def _pinned_block_set(self) -> set[int]:
        return {block_id for blocks in self.pins.values() for block_id in blocks}

    def block_table(self, seq_id: int) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self.block_tables

    # ---- device blocks ----------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
            self.peak_blocks_off_free_list = max(self.peak_blocks_off_free_list,
                                                 self.num_blocks - len(self.free_block_ids))
        else:
            evicted = self.prefix_cache.pop_lru()
            if evicted is None:
                raise RuntimeError("KV block pool exhausted (the scheduler should have checked)")
            block_id, block_hash = evicted
            self.cpu_pool.offload(block_id, block_hash)
        self.ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        assert self.ref_counts[block_id] >= 0, f"block {block_id} released too often"
        if self.ref_counts[block_id] == 0:
            if not self.prefix_cache.park(block_id):
                self.free_block_ids.append(block_id)

    def _needs_copy_on_write(self, seq_id: int, num_computed_tokens: int) -> bool:
        """Is the block that the next token is written into partly filled and shared?"""
        table = self.block_tables.get(seq_id, [])
        index = num_computed_tokens // self.block_size
        return (num_computed_tokens % self.block_size != 0 and index < len(table)
                and self.ref_counts[table[index]] > 1)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens (the only ceil-division by the block size)."""
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> int:
        """Free blocks needed to hold ``num_new_tokens`` more tokens after the computed ones."""
        have = len(self.block_tables.get(seq_id, []))
        grow = max(0, self.blocks_for(num_computed_tokens + num_new_tokens) - have)
        return grow + int(self._needs_copy_on_write(seq_id, num_computed_tokens))

    def can_allocate(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq_id, num_computed_tokens, num_new_tokens) <= self.num_free_blocks

    def allocate_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> list[tuple[int, int]] | None:
        """Make the table cover ``num_computed_tokens + num_new_tokens`` slots, writable from
        ``num_computed_tokens`` on, and return the (src, dst) block copies copy-on-write needs.

        ``new_computed_blocks``: prefix-cache hits (from ``find_cached_prefix``) that start an empty
        table; ``num_computed_tokens`` then counts their tokens. Returns None, changing nothing,
        when the free blocks are short.
        """
        hits = new_computed_blocks or []
        if hits:
            assert not self.block_tables.get(seq_id), "prefix hits only start an empty table"
            parked = sum(1 for b in hits if not isinstance(b, CpuHit) and self.ref_counts[b] == 0)
            loads = sum(1 for b in hits if isinstance(b, CpuHit))  # each needs a device block
            needed = self.blocks_for(num_computed_tokens + num_new_tokens) - len(hits) + loads
            if needed > self.num_free_blocks - parked:
                return None
            self._take_cached_prefix(seq_id, hits)
        elif not self.can_allocate(seq_id, num_computed_tokens, num_new_tokens):
            return None
        table = self.block_tables.setdefault(seq_id, [])
        self.seq_block_hashes.setdefault(seq_id, [])
        copies = []
        if self._needs_copy_on_write(seq_id, num_computed_tokens):
            index = num_computed_tokens // self.block_size
            shared = table[index]
            fresh = self._take_block()
            self._release(shared)
            table[index] = fresh
            copies.append((shared, fresh))
        for _ in range(self.blocks_for(num_computed_tokens + num_new_tokens) - len(table)):
            table.append(self._take_block())
        return copies

    def check_request_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise InvalidRequestError when the request could need more blocks at once than the pool
        has outside pinned prefixes (it could never run)."""
        needed = self.blocks_for_request(num_prompt_tokens, params.max_tokens, params.num_seqs)
        pinned = self.num_pinned_blocks
        if needed > self.num_blocks - pinned:
            held = f", {pinned} of them pinned by shared prefixes" if pinned else ""
            raise InvalidRequestError("max_tokens", f"request needs up to {needed} KV blocks but the whole pool "
                                                    f"has {self.num_blocks}{held} (short by "
                                                    f"{needed - self.num_blocks + pinned})")

    def check_pin_fits(self, token_ids: list[int], max_model_len: int) -> None:
        """Raise InvalidRequestError unless pinning the full blocks of ``token_ids`` leaves room
        for one request of ``max_model_len`` tokens (or prefix caching is off)."""
        if not self.prefix_caching_enabled:
            raise InvalidRequestError("prompt", "shared prefixes need enable_prefix_caching=True")
        pinned_after = self.num_pinned_blocks_with(token_ids)
        room = self.max_blocks_for_one_sequence(max_model_len)
        if pinned_after + room > self.num_blocks:
            raise InvalidRequestError(
                "prompt", f"pinning this prefix ({len(token_ids)} tokens) would make {pinned_after} of the "
                          f"pool's {self.num_blocks} blocks pinned, leaving {self.num_blocks - pinned_after}; one "
                          f"request of max_model_len={max_model_len} tokens needs up to {room}")

    def blocks_for_request(self, num_prompt_tokens: int, max_tokens: int, num_seqs: int) -> int:
        """The most blocks one request can hold at once: the prompt's blocks are shared; every
        sequence may own its generated blocks plus one copy of the shared partial block."""
        return self.blocks_for(num_prompt_tokens) + num_seqs * (self.blocks_for(max_tokens) + 1)

    def num_unfilled_slots(self, seq_id: int, num_computed_tokens: int) -> int:
        """Slots of the sequence's blocks that hold no computed token (its share of KV waste)."""
        return len(self.block_tables.get(seq_id, [])) * self.block_size - num_computed_tokens

    def max_blocks_for_one_sequence(self, max_model_len: int) -> int:
        """Bounds ``blocks_for_request(p, m, 1)`` for every ``p + m <= max_model_len``: the room a
        single-sequence request of the longest allowed length may need."""
        return self.blocks_for(max_model_len) + 2

    def usage_sample(self, running: list[Sequence]) -> tuple[float, int, int] | None:
        """(live token slots / allocated slots of the blocks in use, distinct blocks held, blocks
        held if nothing were shared) after a step; None while no block is in use."""
        used_blocks = self.num_blocks - self.num_free_blocks
        if used_blocks == 0:
            return None
        allocated = used_blocks * self.block_size
        waste = sum(self.num_unfilled_slots(seq.seq_id, seq.num_computed_tokens) for seq in running)
        return (max(0, allocated - waste) / allocated, *self.sharing_counts())

    def sharing_counts(self) -> tuple[int, int]:
        """(distinct blocks the block tables name, block-table entries): what the sequences hold,
        and what they would hold if nothing were shared."""
        tables = self.block_tables.values()
        return len(self._distinct(tables)), sum(len(t) for t in tables)

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """The child shares every block of the parent (copy-on-write on a later write)."""
        table = list(self.block_tables[parent_seq_id])
        for block_id in table:
            self.ref_counts[block_id] += 1
        self.block_tables[child_seq_id] = table
        self.seq_block_hashes[child_seq_id] = list(self.seq_block_hashes.get(parent_seq_id, []))

    def free(self, seq_id: int) -> None:
        """Give back every block the sequence holds, on the device or in the swap pool."""
        for block_id in reversed(self.block_tables.pop(seq_id, [])):
            self._release(block_id)
        for cpu_block_id in self.cpu_block_tables.pop(seq_id, []):
            self.cpu_pool.release(cpu_block_id)
        self.seq_block_hashes.pop(seq_id, None)

    # ---- prefix cache -----------------------------------------------------------------------
    def _block_hashes(self, token_ids: list[int], num_blocks: int) -> Iterable[int]:
        parent = None
        for index in range(num_blocks):
            parent = hash_block_tokens(parent, token_ids[index * self.block_size:(index + 1) * self.block_size])
            yield parent

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        """A request's first admission looked up its prompt: count the tokens and the hits."""
        self.prefix_cache.record_query(num_prompt_tokens, num_hit_tokens)

    def find_cached_prefix(self, token_ids: list[int]) -> list[int | CpuHit]:
        """Cached blocks holding a leading run of ``token_ids``: device block ids, or ``CpuHit``
        for blocks the CPU tier holds. At least the last token is always left to compute (its
        logits are needed), so a fully cached prompt still runs one token."""
        if not self.prefix_cache.enabled:
            return []
        hits: list[int | CpuHit] = []
        for block_hash in self._block_hashes(token_ids, (len(token_ids) - 1) // self.block_size):
            block_id = self.prefix_cache.lookup(block_hash)
            if block_id is not None:
                hits.append(block_id)
                continue
            cpu_block_id = self.cpu_pool.lookup(block_hash)
            if cpu_block_id is None:
                break
            hits.append(CpuHit(cpu_block_id))
        return hits

    def _take_cached_prefix(self, seq_id: int, hits: list[int | CpuHit]) -> None:
        """Start the (empty) table of ``seq_id`` with the hit blocks, shared; CPU-tier hits get a
        device block each and a load in the plan."""
        # CPU-tier hits leave the tier first, so taking device blocks below (which may offload
        # evicted blocks into the tier) cannot hand their CPU blocks out before the loads run.
        hashes = {hit: self.cpu_pool.take_hit(hit.cpu_block_id) for hit in hits if isinstance(hit, CpuHit)}
        for hit in hits:
            if not isinstance(hit, CpuHit):
                if self.ref_counts[hit] == 0:
                    self.prefix_cache.unpark(hit)
                self.ref_counts[hit] += 1
        table = []
        for hit in hits:
            if isinstance(hit, CpuHit):
                block_id = self._take_block()
                self.prefix_cache.register(hashes[hit], block_id)
                self._loads.append((hit.cpu_block_id, block_id))
                self.cpu_hit_tokens += self.block_size
                table.append(block_id)
            else:
                table.append(hit)
        self._count_pin_hits(table)
        self.block_tables[seq_id] = table
        self.seq_block_hashes[seq_id] = [self.prefix_cache.hash_of(b) for b in table]

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the sequence's full, computed blocks in the prefix cache."""
        if not self.prefix_cache.enabled or seq_id not in self.block_tables:
            return
        hashes = self.seq_block_hashes.setdefault(seq_id, [])
        table = self.block_tables[seq_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        parent = hashes[-1] if hashes else None
        for index in range(len(hashes), num_full):
            parent = hash_block_tokens(parent, token_ids[index * self.block_size:(index + 1) * self.block_size])
            self.prefix_cache.register(parent, table[index])
            if self.prefix_cache.lookup(parent) == table[index]:
                self.cpu_pool.drop(parent)  # computed again on the device: that copy wins
            hashes.append(parent)

    # ---- pinned prefixes ----------------------------------------------------------------------
    def num_pinned_blocks_with(self, token_ids: list[int]) -> int:
        """Pinned blocks there would be if the full blocks of ``token_ids`` were pinned too
        (those already pinned by another prefix count once)."""
        pinned = self._pinned_block_set()
        num_full = len(token_ids) // self.block_size
        shared = 0
        for block_hash in self._block_hashes(token_ids, num_full):
            if self.prefix_cache.lookup(block_hash) not in pinned:
                break
            shared += 1
        return len(pinned) + num_full - shared

    def pin_prefix(self, key: Hashable, token_ids: list[int]) -> int:
        """Pin the device blocks that cache the full blocks of ``token_ids`` (from the first, up
        to the first block not cached on the device) under ``key``: eviction never takes them
        until ``unpin_prefix(key)``. Returns the number of tokens pinned; pinning a key again
        changes nothing."""
        if key in self.pins:
            return len(self.pins[key]) * self.block_size
        blocks = []
        for block_hash in self._block_hashes(token_ids, len(token_ids) // self.block_size):
            block_id = self.prefix_cache.lookup(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        for block_id in blocks:
            if self.ref_counts[block_id] == 0:
                self.prefix_cache.unpark(block_id)
            self.ref_counts[block_id] += 1
        self.pins[key] = blocks
        self.pin_hit_tokens[key] = 0
        return len(blocks) * self.block_size

    def unpin_prefix(self, key: Hashable) -> int:
        """Let go of the pinned prefix ``key``: its blocks become evictable once nobody else
        holds them. Returns the number of tokens unpinned."""
        blocks = self.pins.pop(key)
        del self.pin_hit_tokens[key]
        for block_id in reversed(blocks):  # tail first: the head stays cached longest
            self._release(block_id)
        return len(blocks) * self.block_size

    def _count_pin_hits(self, table: list[int]) -> None:
        if self.pins:
            held = set(table)
            for key, blocks in self.pins.items():
                self.pin_hit_tokens[key] += sum(1 for b in blocks if b in held) * self.block_size

    # ---- the plan ---------------------------------------------------------------------------
    def take_prefix_moves(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The CPU-tier moves decided since the last call, for the plan being built: offloads as
        (device, cpu) pairs and loads as (cpu, device) pairs. Call once per plan (an offload
        superseded later in the same plan is dropped only until then)."""
        loads, self._loads = self._loads, []
        return self.cpu_pool.take_offloads(), loads

    def end_plan(self) -> None:
        """The last plan ran (or was dropped): the CPU blocks it read are free again."""
        self.cpu_pool.end_plan()

    def drop_prefix_moves(self, offloads: list[tuple[int, int]], loads: list[tuple[int, int]]) -> None:
        """A plan failed, so its moves may not have run: forget the names of the blocks they
        were to fill (the CPU copies of ``offloads``, the device blocks of ``loads``)."""
        self.cpu_pool.forget_offloads(offloads)
        for _, block_id in loads:
            self.prefix_cache.forget(block_id)  # its holders are in the failed plan and end too
        self.end_plan()

    # ---- swap -------------------------------------------------------------------------------
    @staticmethod
    def _distinct(tables: Iterable[list[int]]) -> set[int]:
        return {block_id for table in tables for block_id in table}

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        return len(self._distinct(self.block_tables[s] for s in seq_ids)) <= self.num_free_cpu_blocks

    def swap_out_bytes(self, seq_ids: list[int]) -> int:
        """Bytes a swap-out of the sequences copies: each distinct block once."""
        return len(self._distinct(self.block_table(s) for s in seq_ids)) * self.block_bytes

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Move the sequences' blocks to the CPU pool; a block shared among them moves once.
        Returns (device block, cpu block) copies, to run before the device blocks are reused."""
        mapping: dict[int, int] = {}
        for seq_id in seq_ids:
            cpu_table = []
            for block_id in self.block_tables.pop(seq_id):
                if block_id not in mapping:
                    mapping[block_id] = self.cpu_pool.take()
                else:
                    self.cpu_pool.hold(mapping[block_id])
                cpu_block_id = mapping[block_id]
                cpu_table.append(cpu_block_id)
                self._release(block_id)
            self.cpu_block_tables[seq_id] = cpu_table
        return list(mapping.items())

    def num_blocks_to_swap_in(self, seq_ids: list[int]) -> int:
        return len(self._distinct(self.cpu_block_tables[s] for s in seq_ids))

    def can_swap_in(self, seq_ids: list[int], num_tokens_after: list[int]) -> bool:
        """Is there room to bring the sequences back and grow each to ``num_tokens_after[i]``
        tokens (one copy-on-write each included)?"""
        growth = sum(max(0, self.blocks_for(n) - len(self.cpu_block_tables[s])) + 1
                     for s, n in zip(seq_ids, num_tokens_after))
        return self.num_blocks_to_swap_in(seq_ids) + growth <= self.num_free_blocks

    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Bring swapped sequences back; returns (cpu block, device block) copies."""
        mapping: dict[int, int] = {}
        for seq_id in seq_ids:
            table = []
            for cpu_block_id in self.cpu_block_tables.pop(seq_id):
                if cpu_block_id not in mapping:
                    mapping[cpu_block_id] = self._take_block()
                else:
                    self.ref_counts[mapping[cpu_block_id]] += 1
                table.append(mapping[cpu_block_id])
                self.cpu_pool.release(cpu_block_id, read_by_plan=True)
            self.block_tables[seq_id] = table
            # The fresh device blocks carry no hashes; register them again from scratch.
            self.seq_block_hashes[seq_id] = []
        return list(mapping.items())

    # ---- checks -----------------------------------------------------------------------------
    @staticmethod
    def _count_references(tables: Iterable[list[int]], num_blocks: int) -> list[int]:
        counts = [0] * num_blocks
        for table in tables:
            for block_id in table:
                counts[block_id] += 1
        return counts

    def check_invariants(self) -> None:
        """Assert the invariants in the module docstring (used by tests)."""
        counts = self._count_references(list(self.block_tables.values()) + list(self.pins.values()),
                                        self.num_blocks)
        assert counts == self.ref_counts, "ref counts differ from block-table and pin references"
        free = set(self.free_block_ids)
        evictable = set(self.prefix_cache.evictable_block_ids())
        assert len(free) == len(self.free_block_ids), "a block is on the free list twice"
        assert not free & evictable, "a block is both free and evictable"
        for block_id in range(self.num_blocks):
            unused = block_id in free or block_id in evictable
            assert unused == (self.ref_counts[block_id] == 0), f"block {block_id} both free and used, or lost"
        for block_id in free:
            assert self.prefix_cache.hash_of(block_id) is None, "a free-list block still carries a hash"
        for block_id in self._pinned_block_set():
            assert self.prefix_cache.hash_of(block_id) is not None, f"pinned block {block_id} has no hash"
        assert set(self.pin_hit_tokens) == set(self.pins)
        self.prefix_cache.check_invariants()

        cpu_counts = self._count_references(self.cpu_block_tables.values(), self.num_cpu_blocks)
        self.cpu_pool.check_invariants(cpu_counts, self.prefix_cache)
        for cpu_block_id, block_id in self._loads:
            assert cpu_block_id in self.cpu_pool.read_ids and self.ref_counts[block_id] > 0, "a load without its blocks"
