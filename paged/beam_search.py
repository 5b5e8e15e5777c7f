"""Beam search decisions: which (beam, token) continuations survive a step, which end.

Pure functions over log-probabilities; the engine applies the decisions by forking, extending
and freeing sequences (beams share their common blocks through the block manager's fork and
copy-on-write, so a beam costs only the blocks where it differs). The rules follow the classic
formulation that HF transformers uses: every beam's candidates compete on cumulative logprob,
the best ``2 * width`` are considered in order, an end-of-sequence candidate ranked within the
top ``width`` becomes a finished hypothesis, the others continue until ``width`` beams live.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BeamCandidate:
    parent: int      # index of the parent beam among the beams scored this step
    token: int
    score: float     # cumulative logprob including ``token``


def normalized_score(cumulative_logprob: float, num_generated: int, length_penalty: float) -> float:
    return cumulative_logprob / (max(num_generated, 1) ** length_penalty)


def select_candidates(beam_scores: torch.Tensor, logprobs: torch.Tensor, num_keep: int,
                      end_token_ids: set[int]) -> tuple[list[BeamCandidate], list[BeamCandidate]]:
    """beam_scores [B] cumulative logprobs, logprobs [B, V] of the next token.

    Returns (continuing, ending): at most ``num_keep`` continuing candidates, best first, and the
    end-token candidates that ranked within the first ``num_keep``.
    """
    vocab = logprobs.shape[1]
    totals = (logprobs.double() + beam_scores.double()[:, None]).view(-1)
    top_scores, top_index = totals.topk(min(2 * num_keep, totals.numel()))
    continuing, ending = [], []
    for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
        candidate = BeamCandidate(parent=index // vocab, token=index % vocab, score=score)
        if candidate.token in end_token_ids:
            if rank < num_keep:
                ending.append(candidate)
            continue
        continuing.append(candidate)
        if len(continuing) == num_keep:
            break
    return continuing, ending


def search_is_done(finished_scores: list[float], best_running_score: float, width: int) -> bool:
    """No live beam can still beat the worst of the ``width`` best finished hypotheses."""
    if len(finished_scores) < width:
        return False
    worst_kept = sorted(finished_scores, reverse=True)[width - 1]
    return best_running_score <= worst_kept
