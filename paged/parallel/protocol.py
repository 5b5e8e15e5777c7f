"""The messages between the engine and its ranks (pickled over ``paged.parallel.channel``).

Start-up: rank -> ``Hello``; engine -> ``WorkerInit``; rank joins the process group, maps the
shared segments it can reach, loads its shards -> ``Ready``.
Each step: engine -> ``ModelInput`` (``paged.model_runner``) to every rank; while it runs, a rank
sends a ``Heartbeat`` every ``heartbeat_period_s``; at the end -> ``Done`` (its logits shard is in
the shared buffer) or ``ShardLogits`` followed by one raw frame of fp32 logits (ranks that cannot
map the buffer, e.g. on another node). A rank whose step raised sends ``RankFailed`` and exits.
End: engine -> ``Stop`` (or just closes the connections: ranks exit on EOF too).
"""
from __future__ import annotations

from dataclasses import dataclass

from paged.config import EngineConfig
from paged.parallel.shared_segment import SegmentInfo


@dataclass(frozen=True)
class Hello:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    host: str
    pid: int


@dataclass(frozen=True)
class WorkerInit:
    config: EngineConfig             # the engine's own: every rank builds its ModelRunner from it
    num_blocks: int                  # KV blocks in every rank's pool (block ids mean the same on all ranks)
    num_cpu_blocks: int
    threads_per_rank: int | None     # None: the host's cores / ranks on this host
    heartbeat_period_s: float
    max_logits_rows: int
    logits_segment: SegmentInfo | None     # the shared logits buffer; None: logits go over the channel
    all_reduce_segment: SegmentInfo | None  # the shared-memory all-reduce arena; None: the group's backend


@dataclass(frozen=True)
class Ready:
    rank: int
    logits_in_shared_memory: bool
    all_reduce: str                  # "shared memory", or the process group's backend ("gloo", "nccl")
    num_kv_heads: int                # KV heads in this rank's pool
    load_seconds: float
    performance: dict                # the rank's ModelRunner.performance_info() (GEMM path, compile, threads)


@dataclass(frozen=True)
class Heartbeat:
    rank: int


@dataclass(frozen=True)
class StepTiming:
    """Where a rank's step went: the whole step and its all-reduces (seconds, which include
    waiting for the slowest rank to arrive; how many; bytes summed)."""
    step_s: float
    collective_s: float
    collective_calls: int
    collective_bytes: int


@dataclass(frozen=True)
class Done:
    rank: int
    timing: StepTiming


@dataclass(frozen=True)
class ShardLogits:
    """Announces one raw frame of ``rows x cols`` fp32 logits (this rank's vocabulary shard)."""
    rank: int
    rows: int
    cols: int
    timing: StepTiming


@dataclass(frozen=True)
class RankFailed:
    rank: int
    error: str                       # the traceback, for the engine's error message and log


@dataclass(frozen=True)
class Stop:
    pass
