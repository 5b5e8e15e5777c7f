"""From one step's logits to token decisions: sampling with its fan-out, and beam search.

The ``Decoder`` decides and creates the new ``Sequence`` objects a decision needs (forked samples,
forked beams, finished beam hypotheses), but touches no block and no queue: the scheduler applies
the decisions (``Scheduler.update_from_output``). A request forks once, at its first sampled
token: ``best_of`` samples (or ``beam_width`` beams) then share the prompt's blocks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from paged import beam_search
from paged.errors import RequestFailedError
from paged.outputs import FinishReason
from paged.sampler import Sampler
from paged.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class NewToken:
    """``seq`` grows by ``token``. ``cumulative_logprob`` replaces the sequence's running total
    (beam scores); otherwise ``logprob`` is added to it when known."""
    seq: Sequence
    token: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    cumulative_logprob: float | None = None


@dataclass
class StepDecisions:
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, child), applied first
    new_tokens: list[NewToken] = field(default_factory=list)
    dropped: list[Sequence] = field(default_factory=list)   # beams that end here without a result
    failed: dict[str, tuple[SequenceGroup, RequestFailedError]] = field(default_factory=dict)


def generated_length(seq: Sequence) -> int:
    """Generated tokens, not counting a final end token (how hypotheses are length-normalized)."""
    ends_with_stop = seq.finish_reason == FinishReason.STOP and seq.num_output_tokens > 0
    return seq.num_output_tokens - int(ends_with_stop)


def beam_rank_score(seq: Sequence) -> float:
    return beam_search.normalized_score(seq.cumulative_logprob, generated_length(seq),
                                        seq.group.params.length_penalty)


class Decoder:
    def __init__(self, sampler: Sampler, eos_token_ids: list[int], new_seq_id: Callable[[], int]):
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.new_seq_id = new_seq_id

    def decide(self, seqs: list[Sequence], logits: torch.Tensor) -> StepDecisions:
        """``logits[i]`` scores the next token of ``seqs[i]``."""
        decisions = StepDecisions()
        beam_rows: dict[int, list[int]] = {}
        sample_rows = []
        for row, seq in enumerate(seqs):
            if seq.group.params.use_beam_search:
                beam_rows.setdefault(id(seq.group), []).append(row)
            else:
                sample_rows.append(row)
        for rows in beam_rows.values():
            self._beam_step([seqs[r] for r in rows], logits[rows], decisions)
        if sample_rows:
            if len(sample_rows) != logits.shape[0]:
                logits = logits[sample_rows]
            self._sample_step([seqs[r] for r in sample_rows], logits, decisions)
        return decisions

    # ---- sampling -----------------------------------------------------------------------------
    def _sample_step(self, seqs: list[Sequence], logits: torch.Tensor, decisions: StepDecisions) -> None:
        counts = [1 if seq.group.forked else seq.group.params.num_seqs for seq in seqs]
        for seq, result in zip(seqs, self.sampler.sample(logits, seqs, counts)):
            group = seq.group
            if result.error is not None:
                decisions.failed[group.request_id] = (group, result.error)
                continue
            targets = [seq]
            if not group.forked:
                group.forked = True
                for _ in result.token_ids[1:]:
                    child = seq.fork(self.new_seq_id())
                    group.seqs.append(child)
                    decisions.forks.append((seq, child))
                    targets.append(child)
            chosen = result.chosen_logprobs or [None] * len(targets)
            tops = result.logprobs or [None] * len(targets)
            for target, token, logprob, top in zip(targets, result.token_ids, chosen, tops):
                decisions.new_tokens.append(NewToken(target, token, logprob, top))

    # ---- beam search --------------------------------------------------------------------------
    def _beam_step(self, beams: list[Sequence], logits: torch.Tensor, decisions: StepDecisions) -> None:
        """Advance the beams of one request that were scored this step (usually all of them)."""
        group = beams[0].group
        params = group.params
        group.forked = True
        finished = [beam_rank_score(s) for s in group.seqs if s.is_finished]
        live = [s for s in group.seqs if not s.is_finished]
        if beam_search.search_is_done(finished, max(beam_rank_score(s) for s in live), params.beam_width):
            decisions.dropped.extend(live)  # no live beam can still beat the finished hypotheses
            return
        waiting_beams = [s for s in group.seqs if not s.is_finished and s not in beams]
        num_keep = params.beam_width - len(waiting_beams)
        end_tokens = set() if params.ignore_eos else set(self.eos_token_ids) | set(params.stop_token_ids)
        scores = torch.tensor([s.cumulative_logprob for s in beams], dtype=torch.float64)
        logits = logits.float()  # the executor's may be in the model's dtype
        if not bool(torch.isfinite(logits).all()):
            decisions.failed[group.request_id] = (group, RequestFailedError(
                "the model produced non-finite logits for this request", 500))
            return
        continuing, ending = beam_search.select_candidates(scores, torch.log_softmax(logits, dim=-1),
                                                           num_keep, end_tokens)
        for candidate in ending:  # a finished hypothesis holds no blocks
            hypothesis = beams[candidate.parent].fork(self.new_seq_id())
            hypothesis.token_ids.append(candidate.token)
            hypothesis.cumulative_logprob = candidate.score
            hypothesis.status, hypothesis.finish_reason = SequenceStatus.FINISHED, FinishReason.STOP
            group.seqs.append(hypothesis)
        # The first candidate of a parent extends the parent; each further one extends a fork.
        taken: set[int] = set()
        for candidate in continuing:
            parent = beams[candidate.parent]
            target = parent
            if candidate.parent in taken:
                target = parent.fork(self.new_seq_id())
                group.seqs.append(target)
                decisions.forks.append((parent, target))
            taken.add(candidate.parent)
            decisions.new_tokens.append(NewToken(target, candidate.token,
                                                 cumulative_logprob=candidate.score))
        decisions.dropped.extend(beam for index, beam in enumerate(beams) if index not in taken)
