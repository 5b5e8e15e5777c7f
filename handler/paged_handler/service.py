"""The serving core, protocol-neutral: admit a request, run it on the engine, stream or collect it.

One path for every route: decode and validate the body (handler/paged_handler/schemas.py), tokenize off the
event loop (handler/paged_handler/tokenization.py), check it against the engine's limits, then one stream loop
turns engine outputs into chunks with the route's response format (handler/paged_handler/formats.py). Nothing
here knows TorchServe: the adapter (handler/paged_handler/ts_adapter.py) hands in the body and a ``send``
callable for intermediate chunks, and frames the returned ``Answer``.

Every check that can refuse a request runs before the engine sees it, so a refused request costs
no engine work: body size and shape, field types and ranges, prompt length in characters (before
tokenizing), then the engine's own ``RequestValidator`` (prompt and answer within the context,
token ids in the vocabulary, sequences within ``max_num_seqs``), and the largest possible answer
within the frontend's response limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from paged.async_engine import AsyncLLMEngine
from paged.errors import InvalidRequestError
from paged.outputs import RequestOutput
from paged.request_validator import RequestLimits, RequestValidator
from paged.sampling_params import SamplingParams

from paged_handler import formats
from paged_handler.errors import RequestError, from_engine_error
from paged_handler.formats import ChoiceTracker, Delta, ResponseContext, ResponseFormat
from paged_handler.schemas import ChatRequest, CompletionRequest, NativeRequest, decode_body, make_sampling_params, validate
from paged_handler.tokenization import TokenizerPool

logger = logging.getLogger(__name__)

ROUTES = ("native", "grpc", "completions", "chat", "models")
RESPONSE_MARGIN_BYTES = 16 * 1024  # the frontend's message framing around a body
Send = Callable[[str, str], None]  # (chunk, content type)


@dataclass
class Answer:
    """The final response of a request: status, content type and body (the last chunk of a stream)."""

    status: int
    content_type: str
    body: str
    streamed: bool = False


@dataclass
class Prepared:
    """A request that passed every check: what the engine runs and how the answer looks."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    format: ResponseFormat


@contextlib.contextmanager
def _refusal():
    """The engine's refusal (InvalidRequestError) as a 400 naming the same field."""
    try:
        yield
    except InvalidRequestError as exc:
        raise RequestError(exc.message, param=exc.param) from None


class LLMService:
    def __init__(self, engine: AsyncLLMEngine, tokenizers: TokenizerPool, settings: dict, model_name: str,
                 metrics=None):
        self.engine = engine
        self.tokenizers = tokenizers
        self.settings = settings
        self.model_name = model_name
        self.served_name = settings.get("served_model_name") or model_name
        self.metrics = metrics
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.validator = RequestValidator(RequestLimits.for_engine(engine.config, engine.vocab_size,
                                                                   engine.max_model_len))
        # a token spans at most longest_token_chars characters, so a longer text cannot fit
        self.max_prompt_chars = engine.max_model_len * (tokenizers.longest_token_chars + 1)
        self.response_budget = settings["max_response_bytes"] - RESPONSE_MARGIN_BYTES

    # ------------------------------------------------------------------ entry
    async def serve(self, route: str, raw: Any, request_id: str, send: Send) -> Answer:
        """Answer one request. ``send(chunk, content_type)`` delivers an intermediate chunk.

        Raises RequestError when the request is refused before anything was sent; a failure after
        that ends the stream with the format's error chunk.
        """
        if route == "models":
            return Answer(200, "application/json",
                          formats.dumps(formats.models_response(self.served_name, self.max_model_len)))
        body = decode_body(raw, self.settings["max_request_bytes"])
        if route in ("native", "grpc"):
            prepared = await self._prepare_native(body, request_id, grpc=route == "grpc")
        elif route == "completions":
            prepared = await self._prepare_completion(body, request_id)
        elif route == "chat":
            prepared = await self._prepare_chat(body, request_id)
        else:
            raise ValueError(f"unknown route {route!r}")
        if prepared.stream:
            return await self._stream(prepared, send)
        return await self._collect(prepared)

    # ------------------------------------------------------------------ per route
    async def _prepare_native(self, body: dict, request_id: str, grpc: bool) -> Prepared:
        req = validate(NativeRequest, body)
        if grpc and req.stream:
            # TorchServe 0.12 cannot tell a Predictions call from a StreamPredictions one, and a
            # second message on a Predictions call makes the frontend drop the worker: over gRPC,
            # every answer is exactly one message (docs/serving.md).
            raise RequestError("stream: true is not offered over gRPC; send stream: false (Predictions and "
                               "StreamPredictions then return the whole answer) or stream over REST",
                               param="stream")
        kwargs = req.sampling_kwargs()
        ids = await self._prompt_ids(req.prompt)
        fmt_class = formats.GrpcFormat if grpc else formats.NativeFormat
        ctx = ResponseContext(request_id, self.served_name, kwargs.get("logprobs"),
                              token_text=self.tokenizers.token_text)
        return self._finish_checks(request_id, ids, kwargs, req.stream, fmt_class(ctx))

    async def _prepare_completion(self, body: dict, request_id: str) -> Prepared:
        req = validate(CompletionRequest, body)
        req.check_options()
        self._check_model(req.model)
        kwargs = req.sampling_kwargs()
        kwargs.setdefault("max_tokens", 16)  # OpenAI's default for completions
        ids = await self._prompt_ids(req.single_prompt())
        ctx = ResponseContext("cmpl-" + request_id, self.served_name, kwargs.get("logprobs"),
                              include_usage=bool(req.stream_options and req.stream_options.include_usage),
                              token_text=self.tokenizers.token_text)
        return self._finish_checks(request_id, ids, kwargs, req.stream, formats.CompletionFormat(ctx))

    async def _prepare_chat(self, body: dict, request_id: str) -> Prepared:
        req = validate(ChatRequest, body)
        req.check_options()
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if sum(len(m["content"]) for m in messages) > self.max_prompt_chars:
            raise RequestError(f"messages are longer than the model's context ({self.max_model_len} tokens)",
                               param="messages")
        ids = await self.tokenizers.encode_chat(messages, req.add_generation_prompt)
        if not ids:
            raise RequestError("messages render to an empty prompt", param="messages")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"messages take {len(ids)} tokens; the model's context is {self.max_model_len}",
                               param="messages")
        kwargs = req.sampling_kwargs()
        kwargs.setdefault("max_tokens", self.max_model_len - len(ids))  # what fits the context
        ctx = ResponseContext("chatcmpl-" + request_id, self.served_name, kwargs.get("logprobs"),
                              include_usage=bool(req.stream_options and req.stream_options.include_usage),
                              token_text=self.tokenizers.token_text)
        return self._finish_checks(request_id, ids, kwargs, req.stream, formats.ChatFormat(ctx))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.served_name, self.model_name):
            shown = model if len(model) <= 80 else model[:77] + "..."
            raise RequestError(f"The model `{shown}` does not exist.", 404, "not_found", param="model")

    # ------------------------------------------------------------------ checks
    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            with _refusal():
                self.validator.check_prompt_text(prompt)
            if len(prompt) > self.max_prompt_chars:
                raise RequestError(f"prompt of {len(prompt)} characters is longer than the model's context "
                                   f"({self.max_model_len} tokens)", param="prompt")
            return await self.tokenizers.encode(prompt)
        with _refusal():
            return self.validator.check_prompt_ids(prompt)

    def _finish_checks(self, request_id: str, ids: list[int], kwargs: dict, stream: bool,
                       fmt: ResponseFormat) -> Prepared:
        with _refusal():
            self.validator.check_prompt_length(len(ids))  # a prompt too long is the first fault named
            params = make_sampling_params(kwargs)
            self.validator.check(len(ids), params)
        if not stream:
            size = fmt.max_answer_bytes(params.n, params.max_tokens, self.tokenizers.longest_token_json_bytes,
                                        len(str(self.vocab_size)) + 1)
            if size > self.response_budget:
                raise RequestError(f"the answer could reach {size} bytes, more than this server sends in one "
                                   f"response ({self.response_budget}); lower max_tokens, n or logprobs, or set "
                                   "stream: true", param="max_tokens")
        return Prepared(request_id, ids, params, stream, fmt)

    # ------------------------------------------------------------------ the stream loop
    async def _outputs(self, p: Prepared) -> AsyncIterator[RequestOutput]:
        """Engine outputs, with engine errors turned into RequestError and a wall-clock backstop."""
        timeout = self.engine.config.request_timeout_s
        agen = self.engine.generate(p.request_id, p.prompt_ids, p.params,
                                    deadline_s=None if timeout is None else timeout + 10.0, stream=p.stream)
        try:
            while True:
                try:
                    out = await agen.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - every engine error becomes a client answer
                    err = from_engine_error(exc, timeout)
                    if err.status >= 500:
                        logger.error("request %s failed: %r", p.request_id, exc)
                    raise err from None
                yield out
        finally:
            await agen.aclose()

    async def _collect(self, p: Prepared) -> Answer:
        t_start, t_first, last = time.time(), None, None
        async for out in self._outputs(p):
            if t_first is None and any(c.token_ids for c in out.outputs):
                t_first = time.time()
            last = out
        self._record(last, t_start, t_first)
        return Answer(200, p.format.content_type, p.format.full(last))

    async def _stream(self, p: Prepared, send: Send) -> Answer:
        """Stream one request. Outputs are cumulative, so an output left unsent (``stream_interval``
        > 1 holds a chunk until that many tokens are new) loses nothing: the next chunk carries
        everything since the last one, and what is still held goes out before the closing or
        error chunk."""
        fmt = p.format
        ctype = fmt.stream_content_type
        tracker = ChoiceTracker(self.tokenizers.token_text)
        interval = self.settings["stream_interval"]
        t_start, t_first, last, sent, sent_tokens = time.time(), None, None, False, 0

        def send_deltas(out: RequestOutput) -> bool:
            deltas = tracker.deltas(out)
            for chunk in self._chunks(fmt, deltas) if deltas else ():
                send(chunk, ctype)
            return bool(deltas)

        try:
            async for out in self._outputs(p):
                last = out
                if not sent and (opening := fmt.opening(out)) is not None:
                    send(opening, ctype)
                    sent = True
                if interval > 1 and sent_tokens and not out.finished:
                    tokens = sum(len(c.token_ids) for c in out.outputs)
                    if tokens - sent_tokens < interval:
                        continue  # held: the next chunk carries these tokens too
                if send_deltas(out):
                    t_first = t_first or time.time()
                    sent = True
                    if interval > 1:
                        sent_tokens = sum(len(c.token_ids) for c in out.outputs)
        except RequestError as err:
            if not sent:
                raise
            if last is not None:
                send_deltas(last)
            return Answer(200, ctype, fmt.stream_error(err), streamed=True)
        if last is not None and send_deltas(last):
            sent = True
        self._record(last, t_start, t_first)
        return Answer(200, ctype, fmt.closing(last), streamed=sent)

    def _chunks(self, fmt: ResponseFormat, deltas: list[Delta]) -> list[str]:
        """The deltas as chunks that each fit the response limit (a delta can be large when a
        client reads slowly and outputs coalesce, or when a beam search reports at its end)."""
        chunk = fmt.chunk(deltas)
        if len(chunk) * 4 <= self.response_budget or len(chunk.encode("utf-8")) <= self.response_budget:
            return [chunk]
        if len(deltas) > 1:
            return [c for d in deltas for c in self._chunks(fmt, [d])]
        d = deltas[0]
        if len(d.text) <= 1 and len(d.token_ids) <= 1:
            return [chunk]
        cut_text, cut_ids = len(d.text) // 2, len(d.token_ids) // 2
        head_ids = d.token_ids[:cut_ids]
        head = Delta(d.index, d.text[:cut_text], head_ids, None if d.logprobs is None else d.logprobs[:cut_ids],
                     d.token_offset)
        tail_offset = d.token_offset + sum(len(self.tokenizers.token_text(t)) for t in head_ids) \
            if d.logprobs is not None else d.token_offset
        tail = Delta(d.index, d.text[cut_text:], d.token_ids[cut_ids:],
                     None if d.logprobs is None else d.logprobs[cut_ids:], tail_offset)
        return self._chunks(fmt, [head]) + self._chunks(fmt, [tail])

    def _record(self, out: RequestOutput | None, t_start: float, t_first: float | None) -> None:
        if out is None or self.metrics is None:
            return
        m = out.metrics
        gen = max((len(c.token_ids) for c in out.outputs), default=0)
        first = m.first_token_time if m and m.first_token_time else t_first
        arrival = m.arrival_time if m and m.arrival_time else t_start
        end = m.finished_time if m and m.finished_time else time.time()
        ttft = (first - arrival) if first else None
        tpot = ((end - first) / (gen - 1)) if first and gen > 1 else None
        self.metrics.request_finished(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                                      ttft, tpot)

    # ------------------------------------------------------------------ describe
    async def describe(self) -> dict:
        eng = self.engine
        info: dict[str, Any] = {
            "loaded": True,
            "engine_config": eng.config.to_dict(),
            "handler_settings": self.settings,
            "max_model_len": eng.max_model_len,
            "vocab_size": eng.vocab_size,
            "inflight_requests": eng.num_inflight(),
            "engine_running": eng.is_running,
            "engine_error": repr(eng.first_error) if eng.first_error else None,  # the first fault, kept
            "engine_restarts": eng.restarts,
            "load_time_s": eng.load_time_s,
            "engine_thread_probe": eng.probe,
        }
        try:
            info["kv_stats"] = await asyncio.wait_for(eng.kv_stats(), 10)
        except Exception as exc:  # noqa: BLE001
            info["kv_stats"] = eng.stats_snapshot()
            info["kv_stats_error"] = repr(exc)
        # fast paths chosen at load (with tensor parallel: the ranks and their pids), pinned
        # shared prefixes with their hits, and the block size the traffic so far recommends
        for key, read in (("performance", lambda e: e.performance_info()),
                          ("shared_prefixes", lambda e: e.shared_prefixes()),
                          ("block_size", lambda e: e.block_size_report())):
            try:
                info[key] = await asyncio.wait_for(asyncio.wrap_future(eng.call(read)), 10)
            except Exception as exc:  # noqa: BLE001
                info[f"{key}_error"] = repr(exc)
        return info
