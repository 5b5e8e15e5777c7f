"""The KV manager: what the scheduler asks of KV memory, with one implementation per memory model.

``BlockManager`` (paged/block_manager.py, ``kv_memory: paged``): blocks of a preallocated pool named
by block tables, shared by reference count. ``VirtualKVManager`` (paged/virtual_kv_manager.py,
``kv_memory: virtual``): one contiguous slot of reserved address space per sequence, pages
committed by the operating system as tokens are written. The scheduler talks to this protocol
alone, so it never branches on the memory model; ``make_kv_manager`` is the one place that does.

A sequence's table is its blocks (virtual: its one slot, seen as a single block of
``block_size == max_model_len`` tokens, so a token at position p of slot s lands at flat index
``s * max_model_len + p``, the contiguous layout's). Calls that answer None or False change nothing.
Prefix caching, pins, forks and the CPU tier exist only where blocks can be shared: the virtual
manager finds no cached prefix, refuses pins and requests of several sequences up front
(``check_request_fits``), and never plans block moves.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from paged.config import EngineConfig
    from paged.kv_sizing import KVCacheLayout, VirtualKVLayout
    from paged.models.llama import ModelArgs
    from paged.sampling_params import SamplingParams
    from paged.sequence import Sequence
    from paged.stats import KVCacheStats, VirtualKVStats


class KVManager(Protocol):
    block_size: int                # tokens per entry of a sequence's table
    prefix_caching_enabled: bool
    # Memory the manager commits and returns itself, which the in-process executor writes
    # through (virtual: the VirtualKVCache); None where the executor allocates its own pools.
    shared_memory: Any

    # ---- admission ------------------------------------------------------------------------
    def check_request_fits(self, num_prompt_tokens: int, params: "SamplingParams") -> None:
        """InvalidRequestError naming the field when the request could never run here."""

    def check_pin_fits(self, token_ids: list[int], max_model_len: int) -> None:
        """InvalidRequestError unless pinning ``token_ids`` leaves room for one longest request."""

    # ---- sequences ------------------------------------------------------------------------
    def allocate_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int,
                       new_computed_blocks: list | None = None) -> list[tuple[int, int]] | None:
        """Room for ``num_new_tokens`` more tokens: the copy-on-write copies, or None when short."""

    def block_table(self, seq_id: int) -> list[int]: ...

    def free(self, seq_id: int) -> None: ...

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None: ...

    # ---- prefix cache and pins --------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> list: ...

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None: ...

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None: ...

    def pin_prefix(self, key: Hashable, token_ids: list[int]) -> int: ...

    def unpin_prefix(self, key: Hashable) -> int: ...

    # ---- preemption by swap -----------------------------------------------------------------
    def can_swap_out(self, seq_ids: list[int]) -> bool: ...

    def swap_out_bytes(self, seq_ids: list[int]) -> int:
        """What swapping the sequences out would copy (and back in): the cost model's figure."""

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]: ...

    def can_swap_in(self, seq_ids: list[int], num_tokens_after: list[int]) -> bool: ...

    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]: ...

    # ---- the plan -----------------------------------------------------------------------------
    def take_prefix_moves(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]: ...

    def end_plan(self) -> None: ...

    def drop_prefix_moves(self, offloads: list[tuple[int, int]], loads: list[tuple[int, int]]) -> None: ...

    # ---- state ------------------------------------------------------------------------------
    def usage_sample(self, running: list["Sequence"]) -> tuple[float, int, int] | None:
        """After a step: (live tokens / token capacity the running sequences hold, units held,
        units they would hold unshared), or None when nothing is held."""

    def make_stats(self) -> "KVCacheStats | VirtualKVStats": ...

    def describe(self) -> dict:
        """The memory model, its granularity and what it refuses (describe, performance_info)."""

    def reset(self) -> None: ...

    def check_invariants(self) -> None: ...


def make_kv_manager(config: "EngineConfig", layout: "KVCacheLayout | VirtualKVLayout", args: "ModelArgs") -> KVManager:
    """The block manager for ``kv_memory: paged``, the virtual KV manager (which reserves its
    memory now) for ``kv_memory: virtual``."""
    if config.kv_memory == "virtual":
        from paged.virtual_kv_manager import VirtualKVManager

        return VirtualKVManager.for_layout(layout, args, config.dtype)
    from paged.block_manager import BlockManager

    return BlockManager(layout.num_blocks, layout.num_cpu_blocks, layout.block_size, config.enable_prefix_caching,
                        layout.num_cpu_prefix_blocks, block_bytes=layout.block_bytes)
