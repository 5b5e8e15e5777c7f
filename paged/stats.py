"""What the engine's parts report about themselves: plain dataclasses, read between steps.

Each part makes its own stats (``BlockManager.make_stats``, ``Scheduler.make_stats``), so the
engine reads counters and never reaches into the pools. ``kv_stats_dict`` flattens them into the
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

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclass(frozen=True)
class SchedulerStats:
    """The queues, preemptions and KV use over steps (``Scheduler.make_stats``)."""

    kv: KVCacheStats
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
    kv = stats.kv
    return {
        "num_blocks": kv.num_blocks,
        "block_size": kv.block_size,
        "free_blocks": kv.free_blocks,
        "cached_free_blocks": kv.cached_free_blocks,
        "used_blocks": kv.used_blocks,
        "used_token_slots": kv.used_blocks * kv.block_size,
        "live_tokens": stats.live_tokens,
        "kv_usage": kv.used_blocks / kv.num_blocks,
        "num_cpu_blocks": kv.num_cpu_blocks,
        "free_cpu_blocks": kv.free_cpu_blocks,
        "prefix_queries": kv.prefix_queries,
        "prefix_hits": kv.prefix_hits,
        "prefix_hit_rate": kv.prefix_hit_rate,
        "cpu_prefix_hits": kv.cpu_prefix_hits,
        "cpu_prefix_blocks": kv.cpu_prefix_blocks,
        "cpu_prefix_cached_blocks": kv.cpu_prefix_cached_blocks,
        "pinned_blocks": kv.pinned_blocks,
        "num_shared_prefixes": len(kv.pinned),
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
