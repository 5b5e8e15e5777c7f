"""Turns logits into next tokens: penalties, temperature, top-k / top-p / min-p, seeded draws.

Each request draws from its own torch.Generator (seeded from the request's ``seed`` or from the
engine seed and the request's arrival index), so a seeded request's tokens do not depend on what
else is in the batch. Rows that are greedy without penalties or logprobs take one batched argmax
and no softmax (``paged_kernels.sampling.greedy_tokens``): their chosen logprob is not computed (None).

A row that yields no token (its logits are not finite, or the request's own parameters leave no
token allowed) fails that request alone: its result carries a ``RequestFailedError``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paged_kernels.sampling import greedy_tokens

from paged.errors import RequestFailedError
from paged.sampling_params import SamplingParams
from paged.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]                      # one per requested sample (best_of at a fork, else 1)
    logprobs: list[dict[int, float]] | None   # per sample: chosen token first, then top alternatives
    chosen_logprobs: list[float] | None       # None: not computed (greedy without logprobs)
    error: RequestFailedError | None = None   # set: no token, the request fails


def _no_usable_token(row: torch.Tensor) -> bool:
    """NaN or +inf anywhere (softmax turns either into NaN), or nothing above -inf."""
    return bool(torch.isnan(row).any()) or bool((row == float("inf")).any()) or \
        not bool((row > float("-inf")).any())


def _failed(message: str, status: int) -> SampleResult:
    return SampleResult([], None, None, RequestFailedError(message, status))


def _apply_penalties(logits: torch.Tensor, seq: Sequence, params: SamplingParams) -> torch.Tensor:
    output_ids = seq.output_token_ids
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                   values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    return logits


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0 or params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        if params.min_p > 0.0:
            logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def _needs_row_processing(self, seq: Sequence, params: SamplingParams, num_samples: int) -> bool:
        return (not params.greedy or num_samples > 1 or params.logprobs is not None
                or params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                or params.frequency_penalty != 0.0 or seq.num_output_tokens < params.min_tokens)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], num_samples: list[int]) -> list[SampleResult]:
        """logits [len(seqs), vocab] (fp32, or the model's dtype: rows that need more than an
        argmax compute on an fp32 copy) -> one SampleResult per sequence (the caller's logits are
        not modified)."""
        results: list[SampleResult | None] = [None] * len(seqs)
        greedy_rows = []
        for row, (seq, count) in enumerate(zip(seqs, num_samples)):
            params = seq.group.params
            if self._needs_row_processing(seq, params, count):
                results[row] = self._sample_row_safely(logits[row], seq, params, count)
            else:
                greedy_rows.append(row)
        if greedy_rows:
            rows = logits if len(greedy_rows) == logits.shape[0] else \
                logits[torch.tensor(greedy_rows, dtype=torch.long)]
            for row, token in zip(greedy_rows, greedy_tokens(rows).tolist()):
                results[row] = SampleResult([token], None, None) if token >= 0 else \
                    _failed("the model produced non-finite logits for this request", 500)
        return results

    def _sample_row_safely(self, logits: torch.Tensor, seq: Sequence, params: SamplingParams,
                           count: int) -> SampleResult:
        if _no_usable_token(logits):
            return _failed("the model produced non-finite logits for this request", 500)
        try:
            return self._sample_row(logits.to(torch.float32, copy=True), seq, params, count)
        except Exception as exc:  # noqa: BLE001 - one request's sampling must not fail the batch
            return _failed(f"sampling failed: {type(exc).__name__}", 500)

    def _sample_row(self, logits: torch.Tensor, seq: Sequence, params: SamplingParams, count: int) -> SampleResult:
        logits = _apply_penalties(logits, seq, params)
        if seq.num_output_tokens < params.min_tokens:
            banned = [t for t in self.eos_token_ids + params.stop_token_ids if t < logits.shape[-1]]
            if banned:
                logits[banned] = float("-inf")
        if _no_usable_token(logits):
            return _failed("the request's sampling parameters leave no token to choose (its penalties make "
                           "the logits non-finite, or min_tokens with stop_token_ids exclude every token)", 400)
        logprobs = torch.log_softmax(logits, dim=-1)
        if params.greedy:
            tokens = [int(logits.argmax())] * count
        else:
            probs = torch.softmax(_filter(logits, params), dim=-1)
            tokens = torch.multinomial(probs, count, replacement=True, generator=seq.group.generator).tolist()
        top = {}
        if params.logprobs:
            values, ids = torch.topk(logprobs, params.logprobs)
            top = dict(zip(ids.tolist(), values.tolist()))
        chosen = [float(logprobs[t]) for t in tokens]
        per_sample = [{t: lp, **{k: v for k, v in top.items() if k != t}} for t, lp in zip(tokens, chosen)]
        return SampleResult(tokens, per_sample, chosen)
