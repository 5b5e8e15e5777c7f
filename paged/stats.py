"""What the engine's parts report about themselves: plain dataclasses, read between steps.

Each part makes its own stats (the KV manager's ``make_stats``: ``KVCacheStats`` for paged KV,
``VirtualKVStats`` for virtual; ``Scheduler.make_stats``), so the engine reads counters and never
reaches into the pools. Both memory models report ``resident_kv_bytes`` and
``peak_resident_kv_bytes`` on one scale: memory holding KV (paged: blocks off the free list x block
bytes; virtual: committed pages x page bytes, live or kept warm), so the two compare directly. ``kv_stats_dict`` flattens them into the
dict that ``LLMEngine.kv_stats()`` returns (the keys the handler's describe call, its metrics and
the benchmarks read). Making stats does no work beyond counting: nothing here measures.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PinnedPrefixStats:
    """One pinned shared prefix: the tokens its pinned blocks hold, and the tokens requests took
    from those blocks."""

    pinned_tokens: int
    hit_tokens: int


@dataclass(frozen=True)
class KVCacheStats:
    """The block pool, the prefix cache and its CPU tier (``BlockManager.make_stats``)."""

    num_blocks: int
    block_size: int
    free_blocks: int             # never-used blocks plus cached ones nobody holds
    cached_free_blocks: int      # of those, the cached ones (evicted only when needed)
    num_cpu_blocks: int
    free_cpu_blocks: int
    prefix_queries: int          # prompt tokens looked up in the prefix cache
    prefix_hits: int             # ... and found there
    cpu_prefix_hits: int         # tokens brought back from the CPU tier instead of recomputed
    cpu_prefix_blocks: int       # the tier's share of the CPU pool
    cpu_prefix_cached_blocks: int
    pinned_blocks: int
    pinned: dict[Hashable, PinnedPrefixStats] = field(default_factory=dict)
    block_bytes: int = 0              # one block's K and V over all layers
    blocks_off_free_list: int = 0     # blocks holding KV: held, pinned or cached for reuse
    peak_blocks_off_free_list: int = 0  # ... the most at once since start

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def memory_dict(self) -> dict:
        """The keys of ``kv_stats()`` that are this memory model's own, with the resident KV bytes
        every model reports: blocks holding KV (held, pinned or cached for reuse) x block bytes."""
        return {
            "kv_memory": "paged",
            "resident_kv_bytes": self.blocks_off_free_list * self.block_bytes,
            "peak_resident_kv_bytes": self.peak_blocks_off_free_list * self.block_bytes,
            "kv_budget_bytes": self.num_blocks * self.block_bytes,
            "kv_usage": self.used_blocks / self.num_blocks,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "free_blocks": self.free_blocks,
            "cached_free_blocks": self.cached_free_blocks,
            "used_blocks": self.used_blocks,
            "used_token_slots": self.used_blocks * self.block_size,
            "num_cpu_blocks": self.num_cpu_blocks,
            "free_cpu_blocks": self.free_cpu_blocks,
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
            "prefix_hit_rate": self.prefix_hit_rate,
            "cpu_prefix_hits": self.cpu_prefix_hits,
            "cpu_prefix_blocks": self.cpu_prefix_blocks,
            "cpu_prefix_cached_blocks": self.cpu_prefix_cached_blocks,
            "pinned_blocks": self.pinned_blocks,
            "num_shared_prefixes": len(self.pinned),
        }


@dataclass(frozen=True)
class VirtualKVStats:
    """The slots and committed pages of ``kv_memory: virtual`` (``VirtualKVManager.make_stats``).
    The page counts are the manager's counter, which the OS's own figure (mincore) never exceeds
    and equals once every reserved token is written (tests check it); reading them costs nothing."""

    page_bytes: int
    num_pages: int               # the budget (kv_cache_memory_bytes // page_bytes)
    committed_pages: int         # live slots' pages plus warm ones (deferred reclaim)
    warm_pages: int              # of those, kept by released slots for the next sequence
    peak_committed_pages: int    # the most at once since start
    num_slots: int
    free_slots: int              # slots a new sequence can take (free or warm)
    warm_slots: int
    max_model_len: int
    token_bytes: int             # one token's K and V over all layers
    swap_space_bytes: int
    swap_bytes_used: int         # CPU memory holding swapped-out sequences' tokens
    huge_pages: bool
    deferred_reclaim: bool

    def memory_dict(self) -> dict:
        """The keys of ``kv_stats()`` that are this memory model's own (see ``KVCacheStats.memory_dict``)."""
        return {
            "kv_memory": "virtual",
            "resident_kv_bytes": self.committed_pages * self.page_bytes,
            "peak_resident_kv_bytes": self.peak_committed_pages * self.page_bytes,
            "kv_budget_bytes": self.num_pages * self.page_bytes,
            "kv_usage": (self.committed_pages - self.warm_pages) / self.num_pages,
            "page_bytes": self.page_bytes,
            "num_pages": self.num_pages,
            "committed_pages": self.committed_pages,
            "warm_pages": self.warm_pages,
            "num_slots": self.num_slots,
            "free_slots": self.free_slots,
            "warm_slots": self.warm_slots,
            "max_model_len": self.max_model_len,
            "token_bytes": self.token_bytes,
            "swap_space_bytes": self.swap_space_bytes,
            "swap_bytes_used": self.swap_bytes_used,
            "huge_pages": self.huge_pages,
            "deferred_reclaim": self.deferred_reclaim,
        }


@dataclass(frozen=True)
class SchedulerStats:
    """The queues, preemptions and KV use over steps (``Scheduler.make_stats``)."""

    kv: KVCacheStats | VirtualKVStats
    num_running: int
    num_waiting: int
    num_swapped: int
    live_tokens: int             # computed tokens of the running sequences
    num_recompute_preemptions: int
    num_swap_preemptions: int
    prompt_tokens_total: int
    # Live token slots / allocated slots of the blocks sequences hold, summed over steps (and the
    # number of steps), so a caller can take the mean over any window.
    kv_utilization_sum: float
    kv_utilization_steps: int
    # Blocks the sequences held vs would hold if nothing were shared, summed over the same steps.
    sharing_held_blocks_sum: int
    sharing_unshared_blocks_sum: int


def kv_stats_dict(stats: SchedulerStats, num_steps: int, num_step_faults: int, generated_tokens_total: int,
                  recommended_block_size: int | None) -> dict:
    """The flat dict of ``LLMEngine.kv_stats()``."""
    return {
        **stats.kv.memory_dict(),
        "live_tokens": stats.live_tokens,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "num_swapped": stats.num_swapped,
        "num_recompute_preemptions": stats.num_recompute_preemptions,
        "num_swap_preemptions": stats.num_swap_preemptions,
        "num_steps": num_steps,
        "num_step_faults": num_step_faults,
        "prompt_tokens_total": stats.prompt_tokens_total,
        "generated_tokens_total": generated_tokens_total,
        "mean_kv_utilization": (stats.kv_utilization_sum / stats.kv_utilization_steps
                                if stats.kv_utilization_steps else 1.0),
        "kv_utilization_sum": stats.kv_utilization_sum,
        "kv_utilization_steps": stats.kv_utilization_steps,
        # blocks saved by sharing (prompts of parallel samples, beams, cached prefixes)
        "sharing_held_blocks_sum": stats.sharing_held_blocks_sum,
        "sharing_unshared_blocks_sum": stats.sharing_unshared_blocks_sum,
        "blocks_saved_by_sharing": (1 - stats.sharing_held_blocks_sum / stats.sharing_unshared_blocks_sum
                                    if stats.sharing_unshared_blocks_sum else 0.0),
        "recommended_block_size": recommended_block_size,
    }
