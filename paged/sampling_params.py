"""Per-request sampling parameters, validated on construction.

``LIMITS`` is the one table of what a request may ask for: ``SamplingParams`` checks every field
against it, and the server's request schemas (handler/paged_handler/schemas.py) are built from it, so a bound is
stated once. The caps keep any single request's cost bounded: ``n`` / ``best_of`` / ``beam_width``
multiply the work, ``logprobs`` the answer size, and stop strings the per-step matching work.
Penalties are bounded so that no value can turn logits into inf/NaN (a repetition penalty of 1e-300
divides logits by 1e-300).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from paged.errors import InvalidRequestError

MAX_N = 16                    # returned samples and best_of candidates
MAX_BEAM_WIDTH = 16
MAX_LOGPROBS = 20             # top alternatives per token (OpenAI's top_logprobs cap)
MAX_TOKENS = 1 << 20          # a sanity cap; the engine also checks against max_model_len
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 128
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric field (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    integer: bool = False

    def check(self, name: str, value) -> None:
        """Raise InvalidRequestError(name, ...) unless ``value`` is a finite number in range."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.integer and not isinstance(value, int)):
            raise InvalidRequestError(name, f"{name} must be {kind}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(name, f"{name} must be a finite number, got {value!r}")
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            raise InvalidRequestError(name, f"{name} must be {'>=' if self.low_inclusive else '>'} {self.low}, "
                                            f"got {value!r}")
        if self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)):
            raise InvalidRequestError(name, f"{name} must be {'<=' if self.high_inclusive else '<'} {self.high}, "
                                            f"got {value!r}")


# Field name -> allowed range. Cross-field rules (best_of >= n, min_tokens <= max_tokens, beams)
# are checked in SamplingParams.__post_init__.
LIMITS: dict[str, Range] = {
    "n": Range(1, MAX_N, integer=True),
    "best_of": Range(1, MAX_N, integer=True),
    "beam_width": Range(1, MAX_BEAM_WIDTH, integer=True),
    "temperature": Range(0.0, 100.0),
    "top_p": Range(0.0, 1.0, low_inclusive=False),
    "top_k": Range(-1, None, integer=True),
    "min_p": Range(0.0, 1.0),
    "seed": Range(0, 2**63 - 1, integer=True),
    "max_tokens": Range(1, MAX_TOKENS, integer=True),
    "min_tokens": Range(0, MAX_TOKENS, integer=True),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.01, 10.0),
    "length_penalty": Range(-10.0, 10.0),
}

# List fields: (most entries, longest entry in characters or None).
LIST_LIMITS: dict[str, tuple[int, int | None]] = {
    "stop": (MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS),
    "stop_token_ids": (MAX_STOP_TOKEN_IDS, None),
}


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request (vLLM's names and meanings).

    ``n`` samples are returned out of ``best_of`` drawn (ranked by cumulative logprob);
    ``beam_width`` > 1 selects beam search (greedy over beams, ``n`` <= ``beam_width`` returned).
    temperature 0 is greedy. ``logprobs``: return the logprob of each chosen token (and that many
    top alternatives when > 0). Every invalid value raises ``InvalidRequestError`` (a ValueError)
    whose ``param`` names the field.
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
        if self.best_of is None:
            self.best_of = self.n
        for name, allowed in LIMITS.items():
            value = getattr(self, name)
            if value is None and name in ("seed", "logprobs"):
                continue
            allowed.check(name, value)
        if self.best_of < self.n:
            raise InvalidRequestError("best_of", f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens", f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                                                    f"({self.max_tokens})")
        self.stop = self._stop_strings(self.stop)
        self.stop_token_ids = self._stop_token_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.beam_width > 1:
            if self.n > self.beam_width:
                raise InvalidRequestError("n", f"n ({self.n}) must be <= beam_width ({self.beam_width}) "
                                               "for beam search")
            if self.temperature != 0.0 and self.temperature != 1.0:
                raise InvalidRequestError("temperature", "beam search is deterministic: leave temperature at 0 or 1")
            if self.best_of != self.n:
                raise InvalidRequestError("best_of", "best_of cannot be combined with beam search (use beam_width)")

    @staticmethod
    def _stop_strings(stop) -> list[str]:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", f"stop must be a list of non-empty strings, got {stop!r}"[:300])
        most, longest = LIST_LIMITS["stop"]
        if len(stop) > most:
            raise InvalidRequestError("stop", f"stop may hold at most {most} strings, got {len(stop)}")
        too_long = next((s for s in stop if len(s) > longest), None)
        if too_long is not None:
            raise InvalidRequestError("stop", f"each stop string may be at most {longest} characters, "
                                              f"got one of {len(too_long)}")
        return list(stop)

    @staticmethod
    def _stop_token_ids(ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise InvalidRequestError("stop_token_ids",
                                      f"stop_token_ids must be a list of non-negative integers, got {ids!r}"[:300])
        most, _ = LIST_LIMITS["stop_token_ids"]
        if len(ids) > most:
            raise InvalidRequestError("stop_token_ids", f"stop_token_ids may hold at most {most} ids, got {len(ids)}")
        return list(ids)

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
