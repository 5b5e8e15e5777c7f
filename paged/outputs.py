"""What the engine hands back to callers."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.StrEnum):
    """Why a sequence ended. A str enum: each member equals (and serializes as) its value, so the
    words a client sees ("stop", "length", ...) are the same whether it reads JSON or the objects."""

    STOP = "stop"        # an end token, a stop token or a stop string
    LENGTH = "length"    # max_tokens or max_model_len
    ABORT = "abort"      # the caller aborted the request
    TIMEOUT = "timeout"  # request_timeout_s passed
    ERROR = "error"      # the request failed (see RequestOutput.error)


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    Invariant: across the outputs of one request over time, ``text`` and ``token_ids`` only grow
    by appending (text withheld while it could still be the start of a stop string), so a streamer
    can send ``text[len(already_sent):]``. Every output the engine hands out owns fresh lists
    (never the engine's own), so a consumer on another thread may keep them without copying.
    Beam-search requests report once, when finished (their beams change from step to step).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # None unless logprobs were asked for (or beams)
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, chosen first
    finish_reason: FinishReason | None = None  # None while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Set when this request failed alone (finished is then True): a paged.errors.RequestFailedError
    # whose ``status`` says whose fault it was (400: its own parameters, 500: the engine's).
    error: Exception | None = None
