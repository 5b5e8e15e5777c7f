"""The KV block pool: per-sequence block tables, reference counts, copy-on-write, swap, prefix cache.

Invariants (``check_invariants`` asserts them; the property tests call it after every operation):
- every device block is in exactly one of: some block table(s) (ref_count > 0), the free list,
  or the evictable LRU of cached-but-unused blocks (ref_count == 0, content still valid);
- a block's ref_count equals the number of block-table entries, over all sequences, naming it;
- the same holds for the CPU swap pool;
- only full blocks whose KV is computed carry a prefix hash, and a hash names one block.
Blocks that a sequence will write into are never shared: a write into a shared partly filled
block first copies it (copy-on-write), and cached full blocks are never written again.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from paged.prefix_cache import PrefixCache, hash_block_tokens


class BlockManager:
    def __init__(self, num_blocks: int, num_cpu_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0 or num_cpu_blocks < 0:
            raise ValueError("num_blocks and block_size must be positive, num_cpu_blocks >= 0")
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.prefix_cache = PrefixCache(enabled=enable_prefix_caching)
        self.block_tables: dict[int, list[int]] = {}
        # Hashes of the leading full blocks of each sequence that are registered in the cache.
        self.seq_block_hashes: dict[int, list[int]] = {}
        self.cpu_ref_counts = [0] * num_cpu_blocks
        self.free_cpu_block_ids: deque[int] = deque(range(num_cpu_blocks))
        self.cpu_block_tables: dict[int, list[int]] = {}

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used ones plus cached ones nobody holds."""
        return len(self.free_block_ids) + self.prefix_cache.num_evictable

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self.free_cpu_block_ids)

    def block_table(self, seq_id: int) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self.block_tables

    # ---- device blocks ----------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            block_id = self.prefix_cache.evict_lru()
            if block_id is None:
                raise RuntimeError("KV block pool exhausted (the scheduler should have checked)")
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
            parked = sum(1 for b in hits if self.ref_counts[b] == 0)
            needed = self.blocks_for(num_computed_tokens + num_new_tokens) - len(hits)
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

    def blocks_for_request(self, num_prompt_tokens: int, max_tokens: int, num_seqs: int) -> int:
        """The most blocks one request can hold at once: the prompt's blocks are shared; every
        sequence may own its generated blocks plus one copy of the shared partial block."""
        return self.blocks_for(num_prompt_tokens) + num_seqs * (self.blocks_for(max_tokens) + 1)

    def num_unfilled_slots(self, seq_id: int, num_computed_tokens: int) -> int:
        """Slots of the sequence's blocks that hold no computed token (its share of KV waste)."""
        return len(self.block_tables.get(seq_id, [])) * self.block_size - num_computed_tokens

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
            self._release_cpu(cpu_block_id)
        self.seq_block_hashes.pop(seq_id, None)

    # ---- prefix cache -----------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding a leading run of ``token_ids``. At least the last token is always
        left to compute (its logits are needed), so a fully cached prompt still runs one token."""
        if not self.prefix_cache.enabled:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits, parent = [], None
        for index in range(max_blocks):
            parent = hash_block_tokens(parent, token_ids[index * self.block_size:(index + 1) * self.block_size])
            block_id = self.prefix_cache.lookup(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _take_cached_prefix(self, seq_id: int, hit_block_ids: list[int]) -> None:
        """Start the (empty) table of ``seq_id`` with the hit blocks, shared."""
        for block_id in hit_block_ids:
            if self.ref_counts[block_id] == 0:
                self.prefix_cache.unpark(block_id)
            self.ref_counts[block_id] += 1
        self.block_tables[seq_id] = list(hit_block_ids)
        self.seq_block_hashes[seq_id] = [self.prefix_cache.hash_of(b) for b in hit_block_ids]

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
            hashes.append(parent)

    # ---- swap -------------------------------------------------------------------------------
    def _release_cpu(self, cpu_block_id: int) -> None:
        self.cpu_ref_counts[cpu_block_id] -= 1
        if self.cpu_ref_counts[cpu_block_id] == 0:
            self.free_cpu_block_ids.append(cpu_block_id)

    @staticmethod
    def _distinct(tables: Iterable[list[int]]) -> set[int]:
        return {block_id for table in tables for block_id in table}

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        return len(self._distinct(self.block_tables[s] for s in seq_ids)) <= self.num_free_cpu_blocks

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Move the sequences' blocks to the CPU pool; a block shared among them moves once.
        Returns (device block, cpu block) copies, to run before the device blocks are reused."""
        mapping: dict[int, int] = {}
        for seq_id in seq_ids:
            cpu_table = []
            for block_id in self.block_tables.pop(seq_id):
                if block_id not in mapping:
                    mapping[block_id] = self.free_cpu_block_ids.popleft()
                cpu_block_id = mapping[block_id]
                self.cpu_ref_counts[cpu_block_id] += 1
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
                self._release_cpu(cpu_block_id)
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
        counts = self._count_references(self.block_tables.values(), self.num_blocks)
        assert counts == self.ref_counts, "ref counts differ from block-table references"
        free = set(self.free_block_ids)
        evictable = set(self.prefix_cache.evictable_block_ids())
        assert len(free) == len(self.free_block_ids), "a block is on the free list twice"
        assert not free & evictable, "a block is both free and evictable"
        for block_id in range(self.num_blocks):
            unused = block_id in free or block_id in evictable
            assert unused == (self.ref_counts[block_id] == 0), f"block {block_id} both free and used, or lost"
        for block_id in free:
            assert self.prefix_cache.hash_of(block_id) is None, "a free-list block still carries a hash"
        self.prefix_cache.check_invariants()
        cpu_counts = self._count_references(self.cpu_block_tables.values(), self.num_cpu_blocks)
        assert cpu_counts == self.cpu_ref_counts, "cpu ref counts differ from cpu block tables"
        cpu_free = set(self.free_cpu_block_ids)
        assert len(cpu_free) == len(self.free_cpu_block_ids)
        for block_id in range(self.num_cpu_blocks):
            assert (block_id in cpu_free) == (self.cpu_ref_counts[block_id] == 0), f"cpu block {block_id}"
