"""Request bodies: decoding (size, UTF-8, JSON shape) and strict pydantic schemas. Pure Python, no torch.

The sampling fields of every route are generated from ``paged.sampling_params`` (its dataclass
fields, the ``LIMITS`` ranges and the ``LIST_LIMITS`` caps), so a bound is written once, there.
Strict mode on purpose: ``"max_tokens": "5"`` or ``true`` is a client bug, not a number; unknown
fields are rejected so a typo (``max_token``) is not silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      conint, conlist, constr, create_model)

from paged.errors import InvalidRequestError
from paged.sampling_params import LIMITS, LIST_LIMITS, SamplingParams

from paged_handler.errors import RequestError

MAX_JSON_DEPTH = 16  # the deepest legal body (chat content parts) is 5 levels
Number = Union[StrictInt, StrictFloat]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _sampling_field(name: str, hint: Any) -> tuple[Any, Any]:
    """(type, Field) of one SamplingParams field: optional, bounded as SamplingParams bounds it."""
    if name in LIMITS:
        rng = LIMITS[name]
        bounds: dict[str, float] = {}
        if rng.low is not None:
            bounds["ge" if rng.low_inclusive else "gt"] = rng.low
        if rng.high is not None:
            bounds["le" if rng.high_inclusive else "lt"] = rng.high
        return (StrictInt if rng.integer else Number) | None, Field(None, **bounds)
    if name == "stop":
        most, longest = LIST_LIMITS[name]
        item = constr(strict=True, min_length=1, max_length=longest)
        return item | conlist(item, max_length=most) | None, Field(None)
    if name == "stop_token_ids":
        most, _ = LIST_LIMITS[name]
        return conlist(conint(strict=True, ge=0), max_length=most) | None, Field(None)
    if hint is bool:
        return StrictBool | None, Field(None)
    raise TypeError(f"SamplingParams.{name}: no request schema for this field; add it to handler/paged_handler/schemas.py")


_HINTS = typing.get_type_hints(SamplingParams)
SAMPLING_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))
SamplingFields = create_model("SamplingFields", __base__=_Strict,
                              **{name: _sampling_field(name, _HINTS[name]) for name in SAMPLING_FIELD_NAMES})


class _Request(SamplingFields):
    stream: StrictBool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams arguments the client gave (absent ones keep their defaults)."""
        out = {k: getattr(self, k) for k in SAMPLING_FIELD_NAMES if getattr(self, k) is not None}
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out


class NativeRequest(_Request):
    """``POST /predictions/llm`` (and gRPC): every SamplingParams field, a prompt, ``stream``."""

    prompt: StrictStr | list[StrictInt]


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _OpenAIRequest(_Request):
    model: StrictStr | None = None
    user: StrictStr | None = None
    logit_bias: dict[str, Number] | None = None
    stream_options: StreamOptions | None = None

    def check_options(self) -> None:
        """Refuse what the schema admits but this server does not do."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")


class CompletionRequest(_OpenAIRequest):
    """OpenAI ``/v1/completions`` (one prompt per request)."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def check_options(self) -> None:
        super().check_options()
        if self.echo:
            raise RequestError("echo is not supported", param="echo")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError("only one prompt per request is supported; send one request per prompt",
                                   param="prompt")
            p = p[0]
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


_LOGPROBS = LIMITS["logprobs"]


class ChatRequest(_OpenAIRequest):
    """OpenAI ``/v1/chat/completions``: ``logprobs`` is a switch and ``top_logprobs`` the count."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=LIMITS["max_tokens"].low, le=LIMITS["max_tokens"].high)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=_LOGPROBS.low, le=_LOGPROBS.high)
    add_generation_prompt: StrictBool = True

    def check_options(self) -> None:
        super().check_options()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        out.pop("logprobs", None)
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            out["logprobs"] = self.top_logprobs or 0
        return out


# ---------------------------------------------------------------------------- decoding
def decode_body(raw: Any, max_bytes: int) -> dict:
    """Whatever TorchServe handed over (bytes, str, or already-decoded JSON) -> a checked JSON object.

    Checked: size (bytes, or an estimate for decoded values), UTF-8, JSON, an object at the top,
    nesting depth, and strings that cannot be encoded (lone UTF-16 surrogates such as "\\ud800",
    which JSON can spell but no tokenizer can take).
    """
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise RequestError(f"request body is {len(raw)} bytes; the limit is {max_bytes}")
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if isinstance(raw, str):
        if len(raw) > max_bytes:
            raise RequestError(f"request body is {len(raw)} characters; the limit is {max_bytes}")
        if not raw.strip():
            raise RequestError("request body is empty; send a JSON object")
        try:
            raw = json.loads(raw)
        except RecursionError:
            raise RequestError(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
        except ValueError as exc:  # JSONDecodeError, or an integer literal too long to convert
            raise RequestError(f"request body is not valid JSON: {str(exc)[:200]}") from None
    elif raw is None:
        raise RequestError("request body is empty; send a JSON object")
    if not isinstance(raw, dict):
        raise RequestError(f"request body must be a JSON object, got {type(raw).__name__}")
    size = check_json(raw)
    if size > max_bytes:
        raise RequestError(f"request body is about {size} bytes; the limit is {max_bytes}")
    return raw


def check_json(body: dict) -> int:
    """Walk a decoded body without recursion: depth and encodable strings; returns a size estimate.

    The error names the top-level field that holds the offending value.
    """
    size = 0
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                               param=field)
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, field)
                size += len(key) + 4
                stack.append((item, depth + 1, key if field is None else field))
        elif isinstance(value, list):
            size += 2
            stack.extend((item, depth + 1, field) for item in value)
        elif isinstance(value, str):
            _check_string(value, field)
            size += len(value) + 2
        else:
            size += 8
    return size


def _check_string(text: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"'{field or 'body'}' holds a character that is not valid Unicode text "
                           f"(U+{ord(text[exc.start]):04X}, a lone surrogate) at position {exc.start}",
                           param=field) from None


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


def make_sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    """SamplingParams, with its refusal turned into a 400 naming the field it names."""
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        raise RequestError(exc.message, param=exc.param) from None
