"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_N = 64
GREEDY_TEMPERATURE = 1e-5


def _check_number(name: str, value, low=None, high=None, low_inclusive=True, high_inclusive=True, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request (vLLM's names and meanings).

    ``n`` samples are returned out of ``best_of`` drawn (ranked by cumulative logprob);
    ``beam_width`` > 1 selects beam search (greedy over beams, ``n`` <= ``beam_width`` returned).
    temperature 0 is greedy. ``logprobs``: return the logprob of each chosen token (and that many
    top alternatives when > 0).
    """

    n: int = 1
    best_of: int | None = None
    beam_width: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 / 0: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only

    def __post_init__(self) -> None:
        _check_number("n", self.n, 1, MAX_N, integer=True)
        if self.best_of is None:
            self.best_of = self.n
        _check_number("best_of", self.best_of, self.n, MAX_N, integer=True)
        _check_number("beam_width", self.beam_width, 1, MAX_N, integer=True)
        _check_number("temperature", self.temperature, 0.0, 100.0)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_inclusive=False)
        _check_number("top_k", self.top_k, -1, None, integer=True)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        _check_number("max_tokens", self.max_tokens, 1, None, integer=True)
        _check_number("min_tokens", self.min_tokens, 0, self.max_tokens, integer=True)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_inclusive=False)
        _check_number("length_penalty", self.length_penalty, -10.0, 10.0)
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, 0, 20, integer=True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.beam_width > 1:
            if self.n > self.beam_width:
                raise ValueError(f"n ({self.n}) must be <= beam_width ({self.beam_width}) for beam search")
            if self.temperature != 0.0 and self.temperature != 1.0:
                raise ValueError("beam search is deterministic: leave temperature at 0 or 1")
            if self.best_of != self.n:
                raise ValueError("best_of cannot be combined with beam search (use beam_width)")

    @property
    def greedy(self) -> bool:
        # Below GREEDY_TEMPERATURE, logits / temperature overflows: such a request is greedy.
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def num_seqs(self) -> int:
        """How many sequences the request runs at once."""
        return self.beam_width if self.use_beam_search else self.best_of
