"""Tensor parallel: Megatron-style sharded Llama layers and the torchrun-launched worker group.

See docs/tensor_parallel.md. The public names load lazily, so ``python -m paged.parallel.launch``
arms its parent-death signal before anything imports torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TensorParallelExecutor": "paged.parallel.executor",
    "WorkerGroupSpec": "paged.parallel.executor",
    "WorkerGroupError": "paged.parallel.executor",
    "StepPlan": "paged.parallel.step",
    "ParallelContext": "paged.parallel.context",
    "build_sharded_model": "paged.parallel.sharded_model",
    "shard_layout": "paged.parallel.partition",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'paged.parallel' has no attribute {name!r}")
