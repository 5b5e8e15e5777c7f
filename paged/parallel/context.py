"""The parallel context a sharded model is built with: who this rank is and how it talks to its peers.

A model built with ``ParallelContext.single()`` is the unsharded model: every collective below is
then the identity and costs nothing, so one model definition serves both paths.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group; None = the default group
    # A faster all-reduce for ranks that share a host (paged.parallel.shm_allreduce); None: the group's.
    local_all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls()

    @classmethod
    def from_default_group(cls, local_all_reduce=None) -> "ParallelContext":
        """The context of the process group this process initialized (``dist.init_process_group``)."""
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_all_reduce=local_all_reduce)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1


class CollectiveClock:
    """The all-reduces this process made since the last ``take()``: seconds, calls and bytes (two
    clock reads per collective, so always on). Ranks report it per step to the benchmark."""
    seconds = 0.0
    calls = 0
    bytes = 0

    @classmethod
    def take(cls) -> tuple[float, int, int]:
        taken = (cls.seconds, cls.calls, cls.bytes)
        cls.seconds, cls.calls, cls.bytes = 0.0, 0, 0
        return taken


@torch.compiler.disable
def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum ``x`` over the ranks in place and return it (identity on a single rank).

    Kept out of compiled graphs: a compiled region ends before the collective and a new one starts
    after it, so the dense code on either side still compiles.
    """
    if ctx.is_parallel:
        started = time.perf_counter()
        if ctx.local_all_reduce is not None:
            ctx.local_all_reduce(x)
        else:
            dist.all_reduce(x, group=ctx.group)
        CollectiveClock.seconds += time.perf_counter() - started
        CollectiveClock.calls += 1
        CollectiveClock.bytes += x.numel() * x.element_size()
    return x


def default_backend(device: str) -> str:
    """NCCL for CUDA ranks, gloo for CPU ranks."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def default_threads_per_rank(local_world_size: int) -> int:
    """Torch threads per rank so the ranks on one host never oversubscribe its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size)
