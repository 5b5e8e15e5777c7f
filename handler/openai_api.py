"""Response shapes: the native JSON of DESIGN.md and the OpenAI completions / chat objects.

A ``ChoiceTracker`` turns the engine's cumulative outputs into per-choice deltas (the engine's
invariant: text and token ids only grow by appending).
"""
from __future__ import annotations

import json
import time
from typing import Any

from paged.outputs import RequestOutput


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ChoiceTracker:
    """Remembers what was already sent per choice and yields only the new part."""

    def __init__(self):
        self.sent_text: dict[int, int] = {}
        self.sent_ids: dict[int, int] = {}
        self.last: RequestOutput | None = None

    def deltas(self, out: RequestOutput) -> list[dict]:
        self.last = out
        res = []
        for c in out.outputs:
            t0 = self.sent_text.get(c.index, 0)
            i0 = self.sent_ids.get(c.index, 0)
            text, ids = c.text[t0:], list(c.token_ids[i0:])
            if text or ids:
                self.sent_text[c.index] = len(c.text)
                self.sent_ids[c.index] = len(c.token_ids)
                res.append({"index": c.index, "text": text, "token_ids": ids})
        return res


def usage(out: RequestOutput) -> dict:
    p = len(out.prompt_token_ids)
    c = sum(len(o.token_ids) for o in out.outputs)
    u = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if out.num_cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": out.num_cached_tokens}
    return u


def _logprobs(c) -> list | None:
    if c.logprobs is None:
        return None
    res = []
    for tok, lp in zip(c.token_ids, c.logprobs):
        res.append({"token_id": tok, "logprob": lp.get(tok) if isinstance(lp, dict) else lp,
                    "top": {str(k): v for k, v in lp.items()} if isinstance(lp, dict) else None})
    return res


# ---------------------------------------------------------------------------- native
def native_response(rid: str, out: RequestOutput) -> dict:
    choices = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        ch = {"index": c.index, "text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
        if c.logprobs is not None:
            ch["logprobs"] = _logprobs(c)
        choices.append(ch)
    return {"id": rid, "object": "completion", "choices": choices, "usage": usage(out)}


def native_chunk(rid: str, deltas: list[dict]) -> str:
    choices = [dict(d, finish_reason=None) for d in deltas]
    return dumps({"id": rid, "object": "completion.chunk", "choices": choices}) + "\n"


def native_final_chunk(rid: str, out: RequestOutput) -> str:
    choices = [{"index": c.index, "text": "", "token_ids": [], "finish_reason": c.finish_reason}
               for c in sorted(out.outputs, key=lambda c: c.index)]
    return dumps({"id": rid, "object": "completion.chunk", "choices": choices, "usage": usage(out)}) + "\n"


# ---------------------------------------------------------------------------- OpenAI
def _openai_finish(reason: str | None) -> str | None:
    return reason


def completion_response(rid: str, model: str, out: RequestOutput, created: int) -> dict:
    choices = [{"index": c.index, "text": c.text, "logprobs": None,
                "finish_reason": _openai_finish(c.finish_reason)}
               for c in sorted(out.outputs, key=lambda c: c.index)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(out)}


def _sse_chunk(kind: str, rid: str, model: str, created: int, choices: list[dict], usage_: dict | None) -> str:
    obj = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        obj["usage"] = usage_
    return "data: " + dumps(obj) + "\n\n"


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> str:
    return _sse_chunk("text_completion", rid, model, created, choices, usage_)


def chat_response(rid: str, model: str, out: RequestOutput, created: int) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": None, "finish_reason": _openai_finish(c.finish_reason)}
               for c in sorted(out.outputs, key=lambda c: c.index)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(out)}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> str:
    return _sse_chunk("chat.completion.chunk", rid, model, created, choices, usage_)


def models_response(model: str, max_model_len: int | None, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                         "owned_by": "paged-serve", "max_model_len": max_model_len}]}


SSE_DONE = "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
