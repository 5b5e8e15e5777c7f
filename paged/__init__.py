"""A paged-attention LLM engine (block-paged KV cache, prefix cache, continuous batching).

The public names load lazily, so ``import paged.config`` does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "paged.llm",
    "LLMEngine": "paged.engine",
    "EngineConfig": "paged.config",
    "SamplingParams": "paged.sampling_params",
    "RequestOutput": "paged.outputs",
    "CompletionOutput": "paged.outputs",
    "FinishReason": "paged.outputs",
    "EngineOverloadedError": "paged.errors",
    "EngineDeadError": "paged.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'paged' has no attribute {name!r}")
