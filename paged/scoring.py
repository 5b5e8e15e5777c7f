"""Log-likelihood of given text under our engine's model: a quality measure beside the speed ones.

A fast path that hurts the model (a dtype, a quantization, a GEMM kernel) shows up as a lower
mean log-likelihood per token on held-out text than the float32 reference gives. ``SequenceScorer``
runs the engine's own ``ModelRunner`` (the paged KV cache, the attention backend and GEMM paths
the engine would choose, in the dtype and quantization asked for) over a token sequence as one
prefill with logits at every position, and returns the log-probability of each next token.
``hf_token_logprobs`` computes the same numbers with Hugging Face transformers, the reference.

Texts longer than ``max_len`` tokens are scored in consecutive windows of ``max_len`` tokens, each
a fresh context (its first token is not scored); both scorers window the same way, so their
figures compare.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from paged.config import EngineConfig
from paged.model_runner import ModelInput, ModelRunner
from paged.models.llama import ModelArgs


def windows(token_ids: list[int], max_len: int) -> list[list[int]]:
    """``token_ids`` cut into consecutive windows of at most ``max_len`` tokens (the last may be
    shorter); a window of one token scores nothing and is dropped."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    out = [token_ids[i:i + max_len] for i in range(0, len(token_ids), max_len)]
    return [w for w in out if len(w) >= 2]


class SequenceScorer:
    """Next-token log-probabilities from our model. Keyword arguments are ``EngineConfig`` fields
    (``dtype``, ``quantization``, ``linear_backend``, ...); the KV pool holds one window."""

    def __init__(self, model: str, max_len: int = 512, **engine_kwargs):
        self.config = EngineConfig(model=model, **engine_kwargs)
        config = self.config
        if config.block_size == "auto" or config.kv_memory != "paged" or config.tensor_parallel_size != 1:
            raise ValueError("the scorer runs one process on paged blocks of a fixed size: give an integer "
                             "block_size, kv_memory 'paged' and tensor_parallel_size 1")
        self.args = ModelArgs.from_checkpoint(model)
        if max_len > self.args.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's {self.args.max_position_embeddings} positions")
        self.max_len = max_len
        self.runner = ModelRunner(self.config, self.args, math.ceil(max_len / self.config.block_size), 0)
        self.block_size = self.runner.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    def window_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 [len - 1]: log p(token i + 1 | tokens 0..i) for one window of 2..max_len tokens."""
        n = len(token_ids)
        if not 2 <= n <= self.max_len:
            raise ValueError(f"a window holds 2..{self.max_len} tokens, got {n}")
        num_blocks = math.ceil(n / self.block_size)
        # one sequence in blocks 0..num_blocks-1: token p lives at slot p
        inp = ModelInput(input_ids=list(token_ids), positions=list(range(n)), slot_mapping=list(range(n)),
                         seq_lens=[n], query_start_loc=[0, n],
                         block_tables=np.arange(num_blocks, dtype=np.int32)[None, :],
                         logits_indices=list(range(n - 1)))
        logits = self.runner.execute_model_input(inp)
        return _next_token_logprobs(logits, token_ids)

    def token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """fp32: the log-probability of every scored token of ``token_ids`` (see ``windows``)."""
        parts = [self.window_logprobs(w) for w in windows(token_ids, self.max_len)]
        return torch.cat(parts) if parts else torch.empty(0)


def _next_token_logprobs(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Rows of ``logits`` predict tokens 1.. of ``token_ids``: their log-probabilities."""
    targets = torch.tensor(token_ids[1:1 + logits.shape[0]], dtype=torch.long)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]


def hf_token_logprobs(model, token_ids: list[int], max_len: int = 512) -> torch.Tensor:
    """The same figures as ``SequenceScorer.token_logprobs`` from a transformers causal LM."""
    parts = []
    with torch.inference_mode():
        for window in windows(token_ids, max_len):
            logits = model(torch.tensor([window])).logits[0, :-1]
            parts.append(_next_token_logprobs(logits, window))
    return torch.cat(parts) if parts else torch.empty(0)
