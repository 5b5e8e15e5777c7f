"""One request validator, for the engine and the server alike (pure Python, no torch).

A request's own fields are bounded by ``SamplingParams`` (its ``LIMITS``, checked when it is
built). What depends on the engine is checked here, against ``RequestLimits``: the context
(``max_model_len``), the vocabulary, and the sequences one request may run (``max_num_seqs``;
with ``kv_memory: virtual`` only one, since its sequences cannot share the prompt's KV).
``LLMEngine.add_request`` runs these checks, and the handler runs the same ones before a request
reaches the engine's thread, so both refuse with the same ``InvalidRequestError(param, ...)``.
(Whether the KV pool can ever hold the request is the scheduler's answer, ``Scheduler.check_fits``.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from paged.config import EngineConfig
from paged.errors import InvalidRequestError
from paged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged.models.llama import ModelArgs


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int   # prompt + generated tokens
    vocab_size: int
    max_num_seqs: int    # sequences that run at once, over all requests
    kv_memory: str = "paged"   # "virtual": no block sharing, so one sequence per request

    @classmethod
    def for_engine(cls, config: EngineConfig, vocab_size: int, max_model_len: int) -> "RequestLimits":
        """The limits of an engine: its config's, the model's vocabulary and resolved context."""
        return cls(max_model_len=max_model_len, vocab_size=vocab_size, max_num_seqs=config.max_num_seqs,
                   kv_memory=config.kv_memory)

    @classmethod
    def for_model(cls, config: EngineConfig, args: "ModelArgs") -> "RequestLimits":
        """``for_engine`` with the context resolved: ``config.max_model_len``, or the model's limit
        (its position embeddings, and its sliding window, beyond which full attention would give
        other results); ValueError when the config asks for more than the model's limit."""
        limit = args.max_position_embeddings
        if args.sliding_window:
            limit = min(limit, args.sliding_window)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit {limit}")
        return cls.for_engine(config, args.vocab_size, config.max_model_len or limit)


def seqs_param(params: SamplingParams) -> str:
    """The field that sets how many sequences the request runs (``params.num_seqs``)."""
    if params.use_beam_search:
        return "beam_width"
    return "best_of" if params.best_of > params.n else "n"


class RequestValidator:
    def __init__(self, limits: RequestLimits):
        self.limits = limits

    def check_prompt_text(self, prompt: str) -> None:
        if not prompt:
            raise InvalidRequestError("prompt", "prompt must not be empty")

    def check_prompt_ids(self, prompt) -> list[int]:
        """A non-empty list of token ids inside the vocabulary, as a new list."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt", "prompt must be a non-empty string or a non-empty list of token ids")
        vocab_size = self.limits.vocab_size
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise InvalidRequestError("prompt", f"prompt token id {token!r} is outside the vocabulary "
                                                    f"[0, {vocab_size})")
        return list(prompt)

    def check_prompt_length(self, num_prompt_tokens: int) -> None:
        """The prompt leaves room for at least one generated token."""
        if num_prompt_tokens >= self.limits.max_model_len:
            raise InvalidRequestError("prompt", f"prompt ({num_prompt_tokens} tokens) leaves no room to generate "
                                                f"within max_model_len {self.limits.max_model_len}")

    def check(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise InvalidRequestError naming the field when the request cannot run on this engine."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(None, f"params must be SamplingParams, got {type(params).__name__}")
        limits = self.limits
        max_model_len = limits.max_model_len
        self.check_prompt_length(num_prompt_tokens)
        total = num_prompt_tokens + params.max_tokens
        if total > max_model_len:
            raise InvalidRequestError("max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens "
                                                    f"({params.max_tokens}) = {total} exceeds max_model_len "
                                                    f"{max_model_len} by {total - max_model_len}")
        if params.num_seqs > limits.max_num_seqs:
            raise InvalidRequestError(seqs_param(params), f"the request runs {params.num_seqs} sequences at once but "
                                                          f"the engine runs at most max_num_seqs={limits.max_num_seqs}")
        if params.num_seqs > 1 and limits.kv_memory == "virtual":
            raise InvalidRequestError(seqs_param(params), f"the request runs {params.num_seqs} sequences, which share "
                                                          f"its prompt's KV blocks; this engine's kv_memory 'virtual' "
                                                          f"has no blocks to share (one sequence per request: use "
                                                          f"kv_memory 'paged' for n, best_of or beam_width > 1)")
        bad = next((t for t in params.stop_token_ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("stop_token_ids", f"stop token id {bad} is outside the vocabulary "
                                                        f"[0, {limits.vocab_size})")
