"""Before the scheduler: a request's prompt as token ids, checked, and the ``SequenceGroup`` it runs as.

Text prompts are tokenized here; token-id prompts are checked against the vocabulary. Every check
that can refuse a request runs before it is queued (``RequestValidator``: the context, the
vocabulary, ``max_num_seqs``; then ``Scheduler.check_fits``: whether the pool can ever hold it),
so a refused request leaves no trace. A sampled request gets its own seeded generator (its
``seed``, or one derived from the engine's seed and the request's arrival order).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from paged.config import EngineConfig
from paged.request_validator import RequestValidator
from paged.sampling_params import SamplingParams
from paged.scheduler import Scheduler
from paged.sequence import SequenceGroup


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer, validator: RequestValidator, scheduler: Scheduler,
                 new_seq_id: Callable[[], int]):
        self.config = config
        self.tokenizer = tokenizer
        self.validator = validator
        self.scheduler = scheduler
        self.new_seq_id = new_seq_id
        self.num_requests = 0   # requests made into groups: seeds the generators of unseeded ones

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids); InvalidRequestError for an empty or bad prompt."""
        if isinstance(prompt, str):
            self.validator.check_prompt_text(prompt)
            return prompt, self.tokenizer(prompt).input_ids
        return None, self.validator.check_prompt_ids(prompt)

    def check(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """InvalidRequestError naming the field when the request can never run on this engine."""
        self.validator.check(num_prompt_tokens, params)
        self.scheduler.check_fits(num_prompt_tokens, params)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        text, token_ids = self.tokenize(prompt)
        self.check(len(token_ids), params)
        return text, token_ids

    def make_group(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
                   arrival_time: float | None, stream: bool, internal: bool = False) -> SequenceGroup:
        """The request as the scheduler queues it (its prompt checked already)."""
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else hash((self.config.seed, self.num_requests)) & (2**63 - 1)
            generator = torch.Generator().manual_seed(seed)
        arrival = time.time() if arrival_time is None else arrival_time
        deadline = arrival + self.config.request_timeout_s if self.config.request_timeout_s else None
        group = SequenceGroup(request_id, text, token_ids, params, self.new_seq_id(), arrival, generator,
                              deadline, stream, internal)
        self.num_requests += 1
        return group
