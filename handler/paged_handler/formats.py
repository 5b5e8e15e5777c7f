"""Response formats, one per protocol: native (NDJSON streams), gRPC (native JSON, one object per
message), OpenAI completions and OpenAI chat (server-sent events).

A format only turns engine outputs into text; the stream loop (handler/paged_handler/service.py) decides when to
send what, and the TorchServe adapter (handler/paged_handler/ts_adapter.py) how it travels. ``max_answer_bytes``
bounds the size of a whole non-streamed answer before generation starts, so that an answer that
could outgrow the frontend's response limit is refused instead of killing the worker.
"""
from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from paged.outputs import RequestOutput

from paged_handler.errors import RequestError

SSE_DONE = "data: [DONE]\n\n"
_FLOAT_BYTES = 26      # a float as JSON ("-1.2345678901234567e-05") and its separator
_CHOICE_BYTES = 256    # one choice's fixed keys (index, finish_reason, message, ...)
_ANSWER_BYTES = 1024   # id, object, model, usage, ...


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def now() -> int:
    return int(time.time())


@dataclass
class Delta:
    """What one choice added since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per new token: chosen first, then alternatives
    token_offset: int = 0                     # characters of token texts before this delta


@dataclass
class ChoiceTracker:
    """Turns cumulative engine outputs into per-choice deltas (outputs only grow by appending)."""

    token_text: Callable[[int], str]
    sent_text: dict[int, int] = field(default_factory=dict)
    sent_ids: dict[int, int] = field(default_factory=dict)
    token_chars: dict[int, int] = field(default_factory=dict)

    def deltas(self, out: RequestOutput) -> list[Delta]:
        res = []
        for c in out.outputs:
            t0, i0 = self.sent_text.get(c.index, 0), self.sent_ids.get(c.index, 0)
            text, ids = c.text[t0:], list(c.token_ids[i0:])
            if not text and not ids:
                continue
            logprobs = None if c.logprobs is None else list(c.logprobs[i0:i0 + len(ids)])
            offset = self.token_chars.get(c.index, 0)
            self.sent_text[c.index], self.sent_ids[c.index] = len(c.text), len(c.token_ids)
            if logprobs is not None:
                self.token_chars[c.index] = offset + sum(len(self.token_text(t)) for t in ids)
            res.append(Delta(c.index, text, ids, logprobs, offset))
        return res


def usage(out: RequestOutput) -> dict:
    p = len(out.prompt_token_ids)
    c = sum(len(o.token_ids) for o in out.outputs)
    u = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if out.num_cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": out.num_cached_tokens}
    return u


def top_alternatives(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one position (the engine lists the chosen token first and then
    the top k, so the chosen one is among them only when it ranks that high)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def whole(out: RequestOutput) -> list[Delta]:
    """Every choice of a finished output as one delta each (non-streamed answers)."""
    return [Delta(c.index, c.text, list(c.token_ids), None if c.logprobs is None else list(c.logprobs))
            for c in sorted(out.outputs, key=lambda c: c.index)]


@dataclass
class ResponseContext:
    """What a format needs to know about the request it answers."""

    request_id: str
    model: str
    logprobs: int | None = None       # top alternatives per token asked for; None: no logprobs
    include_usage: bool = False
    token_text: Callable[[int], str] = str
    created: int = field(default_factory=now)


class ResponseFormat(ABC):
    content_type = "application/json"
    stream_content_type = "application/json"

    def __init__(self, ctx: ResponseContext):
        self.ctx = ctx

    @abstractmethod
    def full(self, out: RequestOutput) -> str:
        """The whole non-streamed answer."""

    def opening(self, out: RequestOutput) -> str | None:
        """A chunk sent before any text (OpenAI chat: the role), or None."""
        return None

    @abstractmethod
    def chunk(self, deltas: list[Delta]) -> str:
        """One streamed chunk carrying the new text of the choices in ``deltas``."""

    @abstractmethod
    def closing(self, out: RequestOutput) -> str:
        """The last chunk of a stream: finish reasons, usage."""

    @abstractmethod
    def stream_error(self, err: RequestError) -> str:
        """The last chunk of a stream that failed after it started."""

    @staticmethod
    def error(err: RequestError) -> str:
        return dumps(err.body())

    @abstractmethod
    def per_token_bytes(self, token_bytes: int, id_bytes: int, k: int | None) -> int:
        """Most JSON bytes one generated token can add to a full answer."""

    def max_answer_bytes(self, n: int, max_tokens: int, token_bytes: int, id_bytes: int) -> int:
        """An upper bound of ``len(full(...))`` in bytes for n choices of max_tokens tokens."""
        return _ANSWER_BYTES + n * (_CHOICE_BYTES + max_tokens * self.per_token_bytes(
            token_bytes, id_bytes, self.ctx.logprobs))


# ---------------------------------------------------------------------------- native and gRPC
class NativeFormat(ResponseFormat):
    """The native JSON (docs/serving.md, "Requests"): choices with text and token_ids; streams are NDJSON lines."""

    stream_content_type = "application/x-ndjson"
    separator = "\n"

    def _logprobs(self, ids: list[int], logprobs: list[dict[int, float]]) -> list[dict]:
        return [{"token_id": t, "logprob": lp.get(t), "top": {str(k): v for k, v in lp.items()}}
                for t, lp in zip(ids, logprobs)]

    def _choice(self, d: Delta, finish_reason: str | None) -> dict:
        ch = {"index": d.index, "text": d.text, "token_ids": d.token_ids, "finish_reason": finish_reason}
        if d.logprobs is not None:
            ch["logprobs"] = self._logprobs(d.token_ids, d.logprobs)
        return ch

    def full(self, out: RequestOutput) -> str:
        reasons = {c.index: c.finish_reason for c in out.outputs}
        return dumps({"id": self.ctx.request_id, "object": "completion",
                      "choices": [self._choice(d, reasons[d.index]) for d in whole(out)],
                      "usage": usage(out)})

    def chunk(self, deltas: list[Delta]) -> str:
        return dumps({"id": self.ctx.request_id, "object": "completion.chunk",
                      "choices": [self._choice(d, None) for d in deltas]}) + self.separator

    def closing(self, out: RequestOutput) -> str:
        choices = [{"index": c.index, "text": "", "token_ids": [], "finish_reason": c.finish_reason}
                   for c in sorted(out.outputs, key=lambda c: c.index)]
        return dumps({"id": self.ctx.request_id, "object": "completion.chunk", "choices": choices,
                      "usage": usage(out)}) + self.separator

    def stream_error(self, err: RequestError) -> str:
        return self.error(err) + self.separator

    def per_token_bytes(self, token_bytes: int, id_bytes: int, k: int | None) -> int:
        size = token_bytes + id_bytes
        if k is not None:  # {"token_id":..,"logprob":..,"top":{"id":lp,...}}
            size += 40 + id_bytes + _FLOAT_BYTES + (k + 1) * (id_bytes + 3 + _FLOAT_BYTES)
        return size


class GrpcFormat(NativeFormat):
    """The native JSON over gRPC: each message is one JSON object (no NDJSON line ends), and an
    error travels in the body with its code (TorchServe 0.12's gRPC path drops per-request status)."""

    separator = ""


# ---------------------------------------------------------------------------- OpenAI
class _OpenAIFormat(ResponseFormat):
    stream_content_type = "text/event-stream"
    object_name = ""

    def _event(self, choices: list[dict], usage_: dict | None = None) -> str:
        obj = {"id": self.ctx.request_id, "object": self.object_name, "created": self.ctx.created,
               "model": self.ctx.model, "choices": choices}
        if usage_ is not None:
            obj["usage"] = usage_
        return "data: " + dumps(obj) + "\n\n"

    @abstractmethod
    def _finish_choice(self, index: int, reason: str | None) -> dict:
        """The closing event's entry for choice ``index`` that finished for ``reason``."""

    def closing(self, out: RequestOutput) -> str:
        tail = self._event([self._finish_choice(c.index, c.finish_reason)
                            for c in sorted(out.outputs, key=lambda c: c.index)])
        if self.ctx.include_usage:
            tail += self._event([], usage(out))
        return tail + SSE_DONE

    def stream_error(self, err: RequestError) -> str:
        return "data: " + self.error(err) + "\n\n" + SSE_DONE


class CompletionFormat(_OpenAIFormat):
    """``/v1/completions``; ``logprobs`` is OpenAI's object of parallel lists."""

    object_name = "text_completion"

    def _logprobs(self, d: Delta) -> dict | None:
        if d.logprobs is None:
            return None
        k = self.ctx.logprobs or 0
        text = self.ctx.token_text
        tokens, offsets, offset = [], [], d.token_offset
        for t in d.token_ids:
            tokens.append(text(t))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens[:len(d.logprobs)],
                "token_logprobs": [lp.get(t) for t, lp in zip(d.token_ids, d.logprobs)],
                "top_logprobs": [{text(a): v for a, v in top_alternatives(lp, k)} for lp in d.logprobs],
                "text_offset": offsets[:len(d.logprobs)]}

    def full(self, out: RequestOutput) -> str:
        reasons = {c.index: c.finish_reason for c in out.outputs}
        choices = [{"index": d.index, "text": d.text, "logprobs": self._logprobs(d),
                    "finish_reason": reasons[d.index]} for d in whole(out)]
        return dumps({"id": self.ctx.request_id, "object": self.object_name, "created": self.ctx.created,
                      "model": self.ctx.model, "choices": choices, "usage": usage(out)})

    def chunk(self, deltas: list[Delta]) -> str:
        return self._event([{"index": d.index, "text": d.text, "logprobs": self._logprobs(d),
                             "finish_reason": None} for d in deltas])

    def _finish_choice(self, index: int, reason: str | None) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def per_token_bytes(self, token_bytes: int, id_bytes: int, k: int | None) -> int:
        size = token_bytes
        if k is not None:  # tokens, token_logprobs, top_logprobs, text_offset
            size += (token_bytes + 3) + _FLOAT_BYTES + 2 + k * (token_bytes + 4 + _FLOAT_BYTES) + 12
        return size


class ChatFormat(_OpenAIFormat):
    """``/v1/chat/completions``; ``logprobs.content`` lists each token with its top alternatives."""

    object_name = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float | None) -> dict:
        text = self.ctx.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    def _logprobs(self, d: Delta) -> dict | None:
        if d.logprobs is None:
            return None
        k = self.ctx.logprobs or 0
        return {"content": [dict(self._entry(t, lp.get(t)),
                                 top_logprobs=[self._entry(a, v) for a, v in top_alternatives(lp, k)])
                            for t, lp in zip(d.token_ids, d.logprobs)]}

    def full(self, out: RequestOutput) -> str:
        reasons = {c.index: c.finish_reason for c in out.outputs}
        choices = [{"index": d.index, "message": {"role": "assistant", "content": d.text},
                    "logprobs": self._logprobs(d), "finish_reason": reasons[d.index]} for d in whole(out)]
        return dumps({"id": self.ctx.request_id, "object": "chat.completion", "created": self.ctx.created,
                      "model": self.ctx.model, "choices": choices, "usage": usage(out)})

    def opening(self, out: RequestOutput) -> str | None:
        return self._event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for c in sorted(out.outputs, key=lambda c: c.index)])

    def chunk(self, deltas: list[Delta]) -> str:
        return self._event([{"index": d.index, "delta": {"content": d.text}, "logprobs": self._logprobs(d),
                             "finish_reason": None} for d in deltas])

    def _finish_choice(self, index: int, reason: str | None) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}

    def per_token_bytes(self, token_bytes: int, id_bytes: int, k: int | None) -> int:
        size = token_bytes
        if k is not None:  # {"token","logprob","bytes":[...],"top_logprobs":[{...} * k]}
            entry = 40 + token_bytes + _FLOAT_BYTES + 4 * token_bytes
            size += entry + 20 + k * entry
        return size


def models_response(model: str, max_model_len: int | None) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": now(),
                                         "owned_by": "paged-serve", "max_model_len": max_model_len}]}
