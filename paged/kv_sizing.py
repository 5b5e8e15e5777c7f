"""How much KV memory the engine gets, from the configuration and the model's shape, and what
moving it costs against recomputing it (the choice of ``preemption_mode: auto``).

``kv_memory: paged``: a pool of blocks (``KVCacheLayout``). ``kv_memory: virtual``: a budget of
memory pages over slots reserved in address space (``VirtualKVLayout``, paged/virtual_kv.py).

With tensor parallel every rank holds ``num_blocks`` blocks of its own KV heads, so the memory
settings are per rank (as vLLM's are per GPU); a block id names the same block on every rank.
The CPU pool serves both preemption by swap (``swap_space_bytes``) and the CPU tier of the prefix
cache (``cpu_prefix_cache_bytes``); the tier never takes more than its share.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paged.config import EngineConfig
from paged.models.llama import ModelArgs
from paged.os_memory import base_page_bytes, huge_page_bytes_of_host, huge_pages_unavailable
from paged.parallel.partition import kv_bytes_per_token_per_rank

DEFAULT_KV_CACHE_BYTES = 1 << 30   # the device pool when neither num_kv_blocks nor kv_cache_memory_bytes is set


@dataclass(frozen=True)
class KVCacheLayout:
    block_size: int
    block_bytes: int            # one block's K and V over all layers (one rank's heads)
    num_blocks: int             # the device pool
    num_cpu_blocks: int         # the CPU pool: swap space plus the CPU prefix tier
    num_cpu_prefix_blocks: int  # the most the tier may take of the CPU pool


@dataclass(frozen=True)
class VirtualKVLayout:
    """``kv_memory: virtual``: ``max_num_seqs`` slots of ``max_model_len`` tokens reserved in address
    space (nothing committed), and a budget of ``num_pages`` pages of ``page_bytes`` that the
    committed ones may not exceed (``kv_cache_memory_bytes``); swapped-out sequences take at most
    ``swap_space_bytes`` of CPU memory."""
    max_num_seqs: int
    max_model_len: int
    page_bytes: int             # 4 KiB, or the transparent huge page size with kv_huge_pages
    num_pages: int              # the budget
    token_bytes: int            # one token's K and V over all layers
    swap_space_bytes: int
    huge_pages: bool
    deferred_reclaim: bool


def plan_kv_cache(config: EngineConfig, args: ModelArgs,
                  max_model_len: int | None = None) -> KVCacheLayout | VirtualKVLayout:
    """The KV memory the configuration asks for; ValueError when a memory setting holds no block
    (or page) or the model cannot be split over ``tensor_parallel_size`` (before anything
    starts). ``max_model_len``: the engine's resolved context (kv_memory virtual sizes its slots by it)."""
    if config.kv_memory == "virtual":
        return _plan_virtual(config, args, max_model_len or config.max_model_len or args.max_position_embeddings)
    element_size = getattr(torch, config.dtype).itemsize   # config.dtype names a torch dtype
    block_bytes = kv_bytes_per_token_per_rank(args, config.tensor_parallel_size) * element_size * config.block_size
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        num_blocks = (config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES) // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes {config.kv_cache_memory_bytes} holds no block "
                             f"of {block_bytes} bytes")
    num_cpu_prefix_blocks = config.cpu_prefix_cache_bytes // block_bytes
    if config.cpu_prefix_cache_bytes and not num_cpu_prefix_blocks:
        raise ValueError(f"cpu_prefix_cache_bytes {config.cpu_prefix_cache_bytes} holds no block of "
                         f"{block_bytes} bytes")
    num_cpu_blocks = config.swap_space_bytes // block_bytes + num_cpu_prefix_blocks
    return KVCacheLayout(config.block_size, block_bytes, num_blocks, num_cpu_blocks, num_cpu_prefix_blocks)


def _plan_virtual(config: EngineConfig, args: ModelArgs, max_model_len: int) -> VirtualKVLayout:
    huge_pages = bool(config.kv_huge_pages)
    if huge_pages and (reason := huge_pages_unavailable()) is not None:
        raise ValueError(f"kv_huge_pages: {reason}")
    page_bytes = huge_page_bytes_of_host() if huge_pages else base_page_bytes()
    budget = config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
    if budget < page_bytes:
        raise ValueError(f"kv_cache_memory_bytes {budget} holds no page of {page_bytes} bytes")
    token_bytes = args.kv_bytes_per_token * getattr(torch, config.dtype).itemsize
    deferred = True if config.kv_deferred_reclaim is None else config.kv_deferred_reclaim
    return VirtualKVLayout(config.max_num_seqs, max_model_len, page_bytes, budget // page_bytes, token_bytes,
                           config.swap_space_bytes, huge_pages, deferred)


@dataclass
class PreemptionCostModel:
    """Rough seconds to recompute tokens vs to move blocks out and back in.

    The two rates are orders of magnitude, not measurements: on the 2-core AVX-512 hosts of
    docs/performance.md the fp32 GEMM peak measured ~440 GFLOP/s (a whole step runs below it)
    and DRAM reads ~28 GB/s (a copy also writes). The choice does not hinge on them: recomputing
    a token costs ``flops_per_token * copy_bytes_per_s / (2 * kv_bytes_per_token *
    compute_flops_per_s)`` times what swapping its KV costs, ~220 for the default 39 M model and
    more for larger models, so swap wins whenever the CPU pool has room for the victim. The KV
    manager says how many bytes a swap moves (whole blocks, or the written tokens of a slot)."""
    flops_per_token: float
    compute_flops_per_s: float = 2.5e11
    copy_bytes_per_s: float = 2.0e10

    @classmethod
    def for_model(cls, args: ModelArgs) -> "PreemptionCostModel":
        """~2 FLOPs per weight per recomputed token."""
        num_params = args.num_layers * (args.hidden_size * (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
                                        + args.num_heads * args.head_dim * args.hidden_size
                                        + 3 * args.hidden_size * args.intermediate_size)
        return cls(flops_per_token=2.0 * num_params)

    def prefers_swap(self, num_tokens_to_recompute: int, num_bytes_to_move: int) -> bool:
        recompute_s = num_tokens_to_recompute * self.flops_per_token / self.compute_flops_per_s
        swap_s = 2 * num_bytes_to_move / self.copy_bytes_per_s
        return swap_s < recompute_s
