"""Prefix cache: content hashes of full KV blocks, and an LRU of cached blocks nobody holds.

A full block is named by the hash of (hash of the previous block, its tokens), so equal hashes
mean equal whole prefixes. A cached block whose last holder lets go is parked in the LRU rather
than freed: a later prompt with the same prefix takes it back for free, and an allocation that
finds no never-used block evicts the least recently parked one.

The same class serves the CPU tier (``BlockManager``'s copy of evicted device blocks): there every
cached block is parked, since nobody holds a CPU-tier block; a hit moves it back to the device.
"""
from __future__ import annotations

from collections import OrderedDict


def hash_block_tokens(parent_hash: int | None, tokens: list[int]) -> int:
    return hash((parent_hash, tuple(tokens)))


class PrefixCache:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._block_of_hash: dict[int, int] = {}
        self._hash_of_block: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def evictable_block_ids(self) -> list[int]:
        return list(self._evictable)

    def lookup(self, block_hash: int) -> int | None:
        return self._block_of_hash.get(block_hash)

    def hash_of(self, block_id: int) -> int | None:
        return self._hash_of_block.get(block_id)

    def register(self, block_hash: int, block_id: int) -> None:
        """Name a full, computed block by its hash (first writer wins; duplicates stay unnamed)."""
        if block_hash in self._block_of_hash or block_id in self._hash_of_block:
            return
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash

    def park(self, block_id: int) -> bool:
        """The block's last holder let go: keep it for reuse if it is cached. Returns whether kept."""
        if block_id not in self._hash_of_block:
            return False
        self._evictable[block_id] = None
        return True

    def unpark(self, block_id: int) -> None:
        del self._evictable[block_id]

    @property
    def num_cached(self) -> int:
        """Blocks that carry a hash (held or parked)."""
        return len(self._hash_of_block)

    def evict_lru(self) -> int | None:
        """Forget the least recently parked block and hand it out, or None if none is parked."""
        entry = self.pop_lru()
        return None if entry is None else entry[0]

    def pop_lru(self) -> tuple[int, int] | None:
        """Like ``evict_lru``, and also say which hash the block held: (block id, hash)."""
        if not self._evictable:
            return None
        block_id, _ = self._evictable.popitem(last=False)
        block_hash = self._hash_of_block.pop(block_id)
        del self._block_of_hash[block_hash]
        return block_id, block_hash

    def forget(self, block_id: int) -> int | None:
        """Drop the block's name (and its place in the LRU if parked); returns the hash it had."""
        block_hash = self._hash_of_block.pop(block_id, None)
        if block_hash is not None:
            del self._block_of_hash[block_hash]
            self._evictable.pop(block_id, None)
        return block_hash

    def record_query(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.queried_tokens += num_queried_tokens
        self.hit_tokens += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def check_invariants(self) -> None:
        assert len(self._block_of_hash) == len(self._hash_of_block)
        for block_hash, block_id in self._block_of_hash.items():
            assert self._hash_of_block[block_id] == block_hash, "hash maps disagree"
        for block_id in self._evictable:
            assert block_id in self._hash_of_block, "an evictable block has no hash"
