"""Request schemas (pydantic, strict) and the one error shape every route answers with.

Strict mode on purpose: ``"max_tokens": "5"`` or ``true`` is a client bug, not a number; unknown
fields are rejected so a typo (``max_token``) is not silently ignored. Pure Python: no torch.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from paged.sampling_params import MAX_N, SamplingParams

MAX_TOKENS_CAP = 1 << 20  # anything above is "huge"; the engine then checks against max_model_len
Number = Union[StrictInt, StrictFloat]


class RequestError(Exception):
    """A request-level failure: HTTP status + the OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


_PHRASES = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


def phrase(status: int) -> str:
    return _PHRASES.get(status, "Error")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SamplingFields(_Strict):
    """Fields shared by every route, with the engine's bounds (the engine checks them again)."""

    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: Number | None = Field(None, ge=0.0, le=100.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0.0, le=1.0)
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: StrictInt | None = Field(None, ge=0)
    presence_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Number | None = Field(None, gt=0.0, le=10.0)
    stream: StrictBool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "best_of", "seed", "stop",
                "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
                "repetition_penalty")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out


class NativeRequest(_SamplingFields):
    """``POST /predictions/llm``: the schema of DESIGN.md."""

    prompt: StrictStr | list[StrictInt]
    beam_width: StrictInt | None = Field(None, ge=1, le=MAX_N)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    length_penalty: Number | None = Field(None, ge=-10.0, le=10.0)

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        for k in ("beam_width", "logprobs", "length_penalty"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class CompletionRequest(_SamplingFields):
    """OpenAI ``/v1/completions`` (one prompt per request)."""

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None
    user: StrictStr | None = None
    logit_bias: dict[str, Number] | None = None
    stream_options: StreamOptions | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError("only one prompt per request is supported; send one request per prompt",
                                   param="prompt")
            p = p[0]
        if self.echo:
            raise RequestError("echo is not supported", param="echo")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")
        return p


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_SamplingFields):
    """OpenAI ``/v1/chat/completions``."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    user: StrictStr | None = None
    logit_bias: dict[str, Number] | None = None
    stream_options: StreamOptions | None = None
    add_generation_prompt: StrictBool = True

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            out["logprobs"] = self.top_logprobs or 0
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")
        return out


# ---------------------------------------------------------------------------- parsing helpers
def decode_body(raw: Any, max_bytes: int) -> dict:
    """Whatever TorchServe handed over (bytes, str, or already-decoded JSON) -> a JSON object."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise RequestError(f"request body is {len(raw)} bytes; the limit is {max_bytes}", param=None)
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
        raw = text
    if isinstance(raw, str):
        if len(raw) > max_bytes:
            raise RequestError(f"request body is {len(raw)} characters; the limit is {max_bytes}", param=None)
        if not raw.strip():
            raise RequestError("request body is empty; send a JSON object")
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise RequestError(f"request body is not valid JSON: {exc}") from None
    elif raw is None:
        raise RequestError("request body is empty; send a JSON object")
    if not isinstance(raw, dict):
        raise RequestError(f"request body must be a JSON object, got {type(raw).__name__}")
    # already-decoded bodies (the frontend parsed application/json): bound the prompt size too
    size = _rough_size(raw)
    if size > max_bytes:
        raise RequestError(f"request body is about {size} bytes; the limit is {max_bytes}")
    return raw


def _rough_size(obj: Any) -> int:
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(len(str(k)) + _rough_size(v) for k, v in obj.items())
    if isinstance(obj, list):
        return sum(_rough_size(v) + 1 for v in obj)
    return 8


def validate(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def from_validation_error(exc: ValidationError) -> RequestError:
    errs = exc.errors()
    first = errs[0]
    loc = [str(x) for x in first.get("loc", ())]
    param = loc[0] if loc else None
    if first.get("type") == "missing":
        msg = f"missing required field '{param}'"
    elif first.get("type") == "extra_forbidden":
        msg = f"unknown field '{'.'.join(loc)}'"
    else:
        # a union reports one error per branch; say what was given once, per field
        same = [e for e in errs if e.get("loc", ())[:1] == first.get("loc", ())[:1]]
        reasons = "; ".join(sorted({e["msg"] for e in same}))[:300]
        given = repr(first.get("input"))
        if len(given) > 60:
            given = given[:57] + "..."
        msg = f"invalid value for '{param}' ({given}): {reasons}"
    return RequestError(msg, param=param)


_PARAM_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "best_of", "beam_width", "seed",
                "stop_token_ids", "stop", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "length_penalty", "logprobs")


def guess_param(message: str) -> str | None:
    """Best effort: the field an engine ValueError names (SamplingParams messages start with it)."""
    low = message.lower()
    first = low.split(" ", 1)[0].strip("'\"():,")
    if first in _PARAM_NAMES:
        return first
    if "prompt" in low or "token id" in low or "vocab" in low or "max_model_len" in low \
            or "kv block" in low or "pool" in low:
        return "prompt" if "max_tokens" not in low else "max_tokens"
    for name in _PARAM_NAMES:
        if re.search(rf"\b{re.escape(name)}\b", low):
            return name
    return None


def make_sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RequestError(str(exc), param=guess_param(str(exc))) from None


def check_prompt_ids(prompt: str | list[int], vocab_size: int | None) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        return
    if not prompt:
        raise RequestError("prompt must not be empty", param="prompt")
    if vocab_size is not None:
        bad = [t for t in prompt if t < 0 or t >= vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               param="prompt")
