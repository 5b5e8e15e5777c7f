"""TorchServe handler (asyncCommunication mode) over one persistent paged engine per worker.

Every request is its own ``handle`` coroutine on the worker's asyncio loop; the engine steps on
its own thread (paged.async_engine). Nothing here runs torch ops: the asyncio thread only parses
JSON, validates, tokenizes (Rust tokenizers) and writes chunks.

Rules this file follows (TorchServe 0.12 traps): ``handle`` never raises (one raise is delivered
to every in-flight request of the worker) -- errors become a status + JSON body for that request
only; a stream always sends one intermediate chunk before its final return; the engine lives on
``self``, never on the (per-request deep-copied) context.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from paged.async_engine import AsyncLLMEngine
from paged.config import EngineConfig
from paged.errors import EngineDeadError, EngineOverloadedError

from handler import openai_api as oa
from handler.metrics import ServingMetrics
from handler.schemas import (ChatRequest, CompletionRequest, NativeRequest, RequestError, check_prompt_ids,
                             decode_body, guess_param, make_sampling_params, phrase, validate)

logger = logging.getLogger(__name__)

# handler-only settings of the model-config.yaml `handler:` section (the rest goes to EngineConfig)
HANDLER_DEFAULTS = {
    "served_model_name": None,      # name in OpenAI answers; default: the TorchServe model name
    "max_request_bytes": 1 << 20,   # bodies above this get 400
    "metrics_interval_s": 1.0,
    "load_timeout_s": 1800,
}
ALIASES = {"request_timeout": "request_timeout_s"}
_DEBUG_HEADERS = os.environ.get("PAGED_DEBUG_HEADERS") == "1"


def parse_handler_config(section: dict | None, model_dir: str) -> tuple[EngineConfig, dict]:
    """Split the yaml section into (EngineConfig, handler settings); ValueError with a clear message."""
    section = dict(section or {})
    for alias, real in ALIASES.items():
        if alias in section:
            if real in section:
                raise ValueError(f"give {alias} or {real}, not both")
            section[real] = section.pop(alias)
    settings = dict(HANDLER_DEFAULTS)
    for key in list(section):
        if key in HANDLER_DEFAULTS:
            settings[key] = section.pop(key)
    if not isinstance(settings["max_request_bytes"], int) or settings["max_request_bytes"] <= 0:
        raise ValueError(f"max_request_bytes must be a positive integer, got {settings['max_request_bytes']!r}")
    model = section.pop("model", None) or model_dir
    if not os.path.isabs(model):
        model = os.path.join(model_dir, model)
    section["model"] = model
    if section.get("request_timeout_s") is None:
        section.pop("request_timeout_s", None)
    return EngineConfig.from_dict(section), settings


def _is_grpc(context) -> bool:
    """REST requests carry a ``url_path`` header (possibly empty); gRPC ones carry none."""
    try:
        return context.get_request_header(0, "url_path") is None and \
            context.get_request_header(0, "describe") is None
    except Exception:  # noqa: BLE001
        return False


class LLMHandler:
    """One engine per worker; routes native, OpenAI and describe requests."""

    def __init__(self):
        self.initialized = False
        self.engine: AsyncLLMEngine | None = None
        self.settings: dict = dict(HANDLER_DEFAULTS)
        self.model_name = "llm"
        self.metrics: ServingMetrics | None = None
        self.max_prompt_chars: int | None = None
        self.tokenizer = None

    # ------------------------------------------------------------------ load
    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir") or "."
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        try:
            config, settings = parse_handler_config(yaml_cfg.get("handler"), model_dir)
        except (ValueError, TypeError) as exc:
            logger.error("invalid `handler:` settings in model-config.yaml: %s", exc)
            raise ValueError(f"invalid `handler:` settings in model-config.yaml: {exc}") from None
        self.settings = settings
        self.model_name = context.model_name or "llm"
        logger.info("loading paged engine: %s", json.dumps(config.to_dict()))
        engine = AsyncLLMEngine(config)
        try:
            engine.start(timeout=settings["load_timeout_s"])
        except Exception as exc:
            logger.error("engine failed to load: %s", exc)
            engine.shutdown(5)
            raise
        self.engine = engine
        self.tokenizer = self._own_tokenizer(engine, config.model)
        self.metrics = ServingMetrics(context.metrics, self.model_name, settings["metrics_interval_s"])
        self.max_prompt_chars = self._max_prompt_chars(engine, self.tokenizer)
        logger.info("paged engine ready in %.1f s (max_model_len=%s, vocab=%s, engine-thread probe %s)",
                    engine.load_time_s or 0.0, engine.max_model_len, engine.vocab_size, engine.probe)
        self.initialized = True

    @staticmethod
    def _own_tokenizer(engine: AsyncLLMEngine, model_dir: str):
        """A tokenizer instance of our own for the asyncio thread (chat templates).

        The engine's instance is used by the engine thread (incremental detokenizing), and a
        transformers call mutates the Rust tokenizer's truncation/padding state: sharing one
        instance across threads can fail with "Already borrowed". Built on the engine thread.
        """
        def load(_engine):
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(model_dir)
        try:
            return engine.call(load).result(300)
        except Exception as exc:  # noqa: BLE001 - chat then answers 400, the rest works
            logger.warning("no tokenizer for the handler (chat disabled): %s", exc)
            return None

    @staticmethod
    def _max_prompt_chars(engine: AsyncLLMEngine, tok) -> int | None:
        """Characters beyond which a text prompt cannot fit max_model_len (checked before tokenizing)."""
        if not engine.max_model_len:
            return None
        longest = 16
        try:
            longest = max(longest, max(len(t) for t in tok.get_vocab()))
        except Exception:  # noqa: BLE001
            longest = 64
        return engine.max_model_len * (longest + 4)

    # ------------------------------------------------------------------ entry
    async def handle(self, data, context):
        try:
            result = await self._handle(data, context)
        except RequestError as exc:
            result = self._error(context, exc)
        except Exception as exc:  # noqa: BLE001 - never raise out of handle (kills every request)
            logger.exception("unexpected handler error")
            result = self._error(context, RequestError(f"internal error: {exc!r}", 500, "internal_error"))
        return self._finish(context, result)

    def _finish(self, context, result):
        """Make the final response end the job in TorchServe's frontend.

        In asyncCommunication mode the frontend forgets a job only when its final response carries
        ``ts_stream_next: false``; otherwise the job stays in its in-backend map for ever (a leak,
        and every such job is re-sent to the next worker after a restart). gRPC StreamPredictions
        even throws (and restarts the worker) without the header. But REST turns a *first*
        response marked ``false`` into headers that are never sent (the client hangs). So: REST
        answers that have not streamed yet send their first character as an intermediate chunk
        (the body bytes are unchanged, only the framing becomes chunked), then the rest as final.
        Answers >= 400 cannot be chunked (the frontend closes the connection after their head), so
        they stay plain and their jobs stay in that map: a TorchServe 0.12 limitation.
        """
        try:
            describe = context.get_request_header(0, "describe") == "True"
            if describe:
                return result
            streamed = getattr(context, "_paged_streamed", False)
            status = context.get_response_status(0)[0] or 200
            if not _is_grpc(context) and not streamed:
                body = result[0] if isinstance(result, list) and result else None
                if status >= 400 or not isinstance(body, str) or len(body) < 2:
                    # TorchServe closes the connection after the head of a >= 400 answer, so it
                    # cannot be chunked: a plain answer (the frontend keeps that job; see docs)
                    return result
                self._send(context, body[0])
                result = [body[1:]]
            context.set_response_header(0, "ts_stream_next", "false")
        except Exception:  # noqa: BLE001 - never raise out of handle
            logger.exception("could not finish the response framing")
        return result

    def _error(self, context, exc: RequestError):
        if exc.status in (429, 503) and self.metrics:
            self.metrics.request_rejected()
        context.set_response_status(exc.status, phrase(exc.status))
        try:
            context.set_response_content_type(0, "application/json")
        except Exception:  # noqa: BLE001
            pass
        return [oa.dumps(exc.body())]

    async def _handle(self, data, context):
        if _DEBUG_HEADERS:
            logger.info("request headers: %s; data keys: %s", context.get_all_request_header(0),
                        [list(r) for r in data] if data else data)
        if context.get_request_header(0, "describe") == "True":
            return [oa.dumps(await self.describe())]
        if self.engine is None:
            raise RequestError("model is not loaded", 503, "unavailable")
        self.metrics.touch(self.engine)
        path = (context.get_request_header(0, "url_path") or "").strip("/")
        row = data[0] if data else {}
        raw = row.get("data") if isinstance(row, dict) else None
        if raw is None and isinstance(row, dict):
            raw = row.get("body")
        if path in ("", "predictions"):
            return await self._native(raw, context)
        if path.startswith("v1/"):
            path = path[3:]
        if path == "completions":
            return await self._openai(raw, context, chat=False)
        if path == "chat/completions":
            return await self._openai(raw, context, chat=True)
        if path == "models":
            return [oa.dumps(oa.models_response(self._served_name(), self.engine.max_model_len, oa.now()))]
        raise RequestError(f"unknown route '{path}'; use v1/completions, v1/chat/completions or v1/models",
                           404, "not_found")

    def _served_name(self) -> str:
        return self.settings.get("served_model_name") or self.model_name

    # ------------------------------------------------------------------ engine access
    def _check_prompt(self, prompt) -> None:
        check_prompt_ids(prompt, self.engine.vocab_size)
        if isinstance(prompt, str) and self.max_prompt_chars and len(prompt) > self.max_prompt_chars:
            raise RequestError(f"prompt of {len(prompt)} characters is longer than the model's context "
                               f"({self.engine.max_model_len} tokens)", param="prompt")
        if isinstance(prompt, list) and self.engine.max_model_len and len(prompt) >= self.engine.max_model_len:
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit the model's context "
                               f"({self.engine.max_model_len} tokens)", param="prompt")

    async def _outputs(self, rid: str, prompt, params) -> AsyncIterator:
        """Engine outputs with errors mapped to RequestError and a wall-clock backstop."""
        timeout = self.engine.config.request_timeout_s
        agen = self.engine.generate(rid, prompt, params,
                                    deadline_s=None if timeout is None else timeout + 10.0)
        try:
            while True:
                try:
                    out = await agen.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestError(f"request exceeded its deadline of {timeout} s", 408, "timeout") from None
                except ValueError as exc:
                    raise RequestError(str(exc), 400, param=guess_param(str(exc))) from None
                except EngineOverloadedError as exc:
                    raise RequestError(f"server overloaded: {exc}; retry later", 503, "overloaded") from None
                except EngineDeadError as exc:
                    raise RequestError(f"engine unavailable: {exc}", 500, "engine_dead") from None
                yield out
        finally:
            await agen.aclose()

    def _record(self, out, t_start: float, t_first: float | None, t_end: float) -> None:
        m = out.metrics
        gen = max((len(c.token_ids) for c in out.outputs), default=0)
        first = m.first_token_time if m and m.first_token_time else t_first
        arrival = m.arrival_time if m and m.arrival_time else t_start
        end = m.finished_time if m and m.finished_time else t_end
        ttft = (first - arrival) if first else None
        tpot = ((end - first) / (gen - 1)) if first and gen > 1 else None
        self.metrics.request_finished(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                                      ttft, tpot)

    # ------------------------------------------------------------------ native route
    async def _native(self, raw, context):
        body = decode_body(raw, self.settings["max_request_bytes"])
        req = validate(NativeRequest, body)
        self._check_prompt(req.prompt)
        params = make_sampling_params(req.sampling_kwargs())
        rid = context.get_request_id(0) or uuid.uuid4().hex
        t_start = time.time()
        if not req.stream:
            last = None
            t_first = None
            async for out in self._outputs(rid, req.prompt, params):
                if t_first is None and any(c.token_ids for c in out.outputs):
                    t_first = time.time()
                last = out
            self._record(last, t_start, t_first, time.time())
            context.set_response_content_type(0, "application/json")
            return [oa.dumps(oa.native_response(rid, last))]

        tracker = oa.ChoiceTracker()
        sent_any = False
        t_first = None
        last = None
        agen = self._outputs(rid, req.prompt, params)
        try:
            async for out in agen:
                last = out
                deltas = tracker.deltas(out)
                if deltas or not sent_any:
                    if not sent_any:
                        context.set_response_content_type(0, "application/x-ndjson")
                    if t_first is None and deltas:
                        t_first = time.time()
                    self._send(context, oa.native_chunk(rid, deltas))
                    sent_any = True
        except RequestError as exc:
            if not sent_any:
                raise
            return [oa.dumps(exc.body()) + "\n"]
        self._record(last, t_start, t_first, time.time())
        return [oa.native_final_chunk(rid, last)]

    @staticmethod
    def _send(context, chunk: str) -> None:
        from ts.handler_utils.utils import send_intermediate_predict_response

        send_intermediate_predict_response([chunk], context.request_ids, "Intermediate", 200, context)
        context._paged_streamed = True

    # ------------------------------------------------------------------ OpenAI routes
    async def _openai(self, raw, context, chat: bool):
        body = decode_body(raw, self.settings["max_request_bytes"])
        if chat:
            req = validate(ChatRequest, body)
            prompt = self._chat_prompt(req)
        else:
            req = validate(CompletionRequest, body)
            prompt = req.single_prompt()
        self._check_prompt(prompt)
        kwargs = req.sampling_kwargs()
        kwargs.setdefault("max_tokens", 16 if not chat else max(1, min(4096, (self.engine.max_model_len or 4096) // 2)))
        params = make_sampling_params(kwargs)
        rid = ("chatcmpl-" if chat else "cmpl-") + (context.get_request_id(0) or uuid.uuid4().hex)
        model = self._served_name()
        created = oa.now()
        t_start = time.time()
        if not req.stream:
            last, t_first = None, None
            async for out in self._outputs(rid, prompt, params):
                if t_first is None and any(c.token_ids for c in out.outputs):
                    t_first = time.time()
                last = out
            self._record(last, t_start, t_first, time.time())
            context.set_response_content_type(0, "application/json")
            resp = oa.chat_response if chat else oa.completion_response
            return [oa.dumps(resp(rid, model, last, created))]

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        make_chunk = oa.chat_chunk if chat else oa.completion_chunk
        tracker = oa.ChoiceTracker()
        sent_any = False
        t_first = None
        last = None
        try:
            async for out in self._outputs(rid, prompt, params):
                last = out
                deltas = tracker.deltas(out)
                if not sent_any:
                    context.set_response_content_type(0, "text/event-stream")
                    if chat:  # the role comes first, as OpenAI does
                        first = [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None} for c in out.outputs]
                        self._send(context, make_chunk(rid, model, created, first))
                        sent_any = True
                if deltas:
                    if t_first is None:
                        t_first = time.time()
                    if chat:
                        choices = [{"index": d["index"], "delta": {"content": d["text"]}, "logprobs": None,
                                    "finish_reason": None} for d in deltas]
                    else:
                        choices = [{"index": d["index"], "text": d["text"], "logprobs": None,
                                    "finish_reason": None} for d in deltas]
                    self._send(context, make_chunk(rid, model, created, choices))
                    sent_any = True
                elif not sent_any:
                    self._send(context, ": keep-alive\n\n")
                    sent_any = True
        except RequestError as exc:
            if not sent_any:
                raise
            return ["data: " + oa.dumps(exc.body()) + "\n\n" + oa.SSE_DONE]
        self._record(last, t_start, t_first, time.time())
        outs = sorted(last.outputs, key=lambda c: c.index)
        if chat:
            fin = [{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason} for c in outs]
        else:
            fin = [{"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish_reason} for c in outs]
        tail = make_chunk(rid, model, created, fin)
        if include_usage:
            tail += make_chunk(rid, model, created, [], oa.usage(last))
        return [tail + oa.SSE_DONE]

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        tok = self.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if tok is None:
            raise RequestError("this model has no tokenizer; chat needs one", 400)
        text = None
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=req.add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
                raise RequestError(f"chat template failed: {exc}", 400, param="messages") from None
        if text is None:  # no template in the checkpoint: a plain, documented fallback
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
            if req.add_generation_prompt:
                text += "<|assistant|>\n"
        if self.max_prompt_chars and len(text) > self.max_prompt_chars:
            raise RequestError("messages are longer than the model's context", param="messages")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError("messages render to an empty prompt", param="messages")
        return list(ids)

    # ------------------------------------------------------------------ describe
    async def describe(self) -> dict:
        eng = self.engine
        if eng is None:
            return {"loaded": False}
        info: dict[str, Any] = {
            "loaded": True,
            "engine_config": eng.config.to_dict(),
            "handler_settings": self.settings,
            "max_model_len": eng.max_model_len,
            "vocab_size": eng.vocab_size,
            "inflight_requests": eng.num_inflight(),
            "engine_running": eng.is_running,
            "engine_error": repr(eng.dead_error) if eng.dead_error else None,
            "load_time_s": eng.load_time_s,
            "engine_thread_probe": eng.probe,
        }
        try:
            info["kv_stats"] = await asyncio.wait_for(eng.kv_stats(), 10)
        except Exception as exc:  # noqa: BLE001
            info["kv_stats"] = eng.stats_snapshot()
            info["kv_stats_error"] = repr(exc)
        try:  # fast paths; with tensor parallel also the ranks and their pids
            info["performance"] = await asyncio.wait_for(
                asyncio.wrap_future(eng.call(lambda e: e.performance_info())), 10)
        except Exception as exc:  # noqa: BLE001
            info["performance_error"] = repr(exc)
        return info
