"""Sequences and requests (sequence groups): the unit the scheduler and block manager track."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from paged.outputs import FinishReason, RequestMetrics
from paged.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # no KV in the pool (new, or preempted by recompute)
    RUNNING = "running"    # its KV lives in the device pool
    SWAPPED = "swapped"    # its KV lives in the CPU swap pool
    FINISHED = "finished"


class Sequence:
    """One token stream. Invariant: the KV of ``token_ids[:num_computed_tokens]`` is in the cache;
    the scheduler makes ``num_computed_tokens`` chase ``num_tokens`` (prefill, chunked prefill,
    recompute after preemption and decode are all the same move)."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], group: "SequenceGroup"):
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.group = group
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        self.finish_reason: FinishReason | None = None
        # Detokenizer state: text decoded so far and the token window offsets.
        self.text = ""
        self.prefix_offset = max(0, self.num_prompt_tokens - 6)
        self.read_offset = self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, seq_id: int) -> "Sequence":
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id = seq_id
        child.token_ids = list(self.token_ids)
        child.logprobs = list(self.logprobs)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")


class SequenceGroup:
    """A request: its sampling params and the sequences generated for it (``best_of`` samples fork
    from one prompt sequence once the prompt is computed, sharing its blocks)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, first_seq_id: int, arrival_time: float | None,
                 generator: torch.Generator | None, deadline: float | None, stream: bool = True,
                 internal: bool = False):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seqs = [Sequence(first_seq_id, prompt_token_ids, self)]
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.generator = generator
        self.deadline = deadline
        self.forked = params.num_seqs == 1
        self.num_cached_tokens = 0
        # stream: report after every step that produced text; otherwise only once, when finished
        self.stream = stream and not params.use_beam_search
        self.error: Exception | None = None  # set when the request failed alone
        # made by the engine itself (a shared prefix's computation): left out of the length profile
        self.internal = internal

    def seqs_with_status(self, status: SequenceStatus) -> list[Sequence]:
        return [seq for seq in self.seqs if seq.status == status]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


@dataclass
class ScheduledSeq:
    """One sequence in a step: its next ``num_new_tokens`` uncomputed tokens run; ``samples``:
    the step computes its last token, so its next token is sampled from this step's logits."""
    seq: Sequence
    num_new_tokens: int
    samples: bool
