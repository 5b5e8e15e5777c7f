"""The TorchServe adapter: the only module that knows TorchServe's context, framing and backend socket.

TorchServe runs the handler in ``asyncCommunication`` mode: every request is its own ``handle``
coroutine on the worker's asyncio loop; the engine steps on its own thread (paged/async_engine.py)
and the serving logic lives in handler/paged_handler/service.py. The rules of TorchServe 0.12 this module
follows (docs/serving.md explains each):

- ``handle`` never raises: one raise is delivered to every in-flight request of the worker.
  Errors become a status and a JSON body for that request only.
- Every final response carries ``ts_stream_next: false``, otherwise the frontend keeps the job in
  its map for ever. A REST response whose first message already says ``false`` never gets its
  headers, so a 200 answer goes out as one intermediate chunk (its first character) and the rest
  as the final message; a >= 400 answer is written whole first (the frontend sends it with a
  Content-Length and closes the connection, as it does for every >= 400) and an empty final
  message then ends the job.
- Two threads write to the backend socket (this loop for intermediate chunks, TorchServe's
  response thread for final messages): every write goes through one lock.
- Intermediate chunks go through one ``BackendWriter`` per worker (handler/paged_handler/
  backend_writer.py): the chunks of every stream that advanced in one engine step leave as one
  backend message. A request's queued chunks are written before ``handle`` returns its final
  message, so the final always comes after them.
- Client headers reach the handler unchanged, so a ``describe: True`` header proves nothing:
  describe data is given only to a request that can only come from the management API.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from typing import Any

from paged.async_engine import AsyncLLMEngine

from paged_handler.backend_writer import BackendWriter, RequestChannel
from paged_handler.errors import INTERNAL_ERROR, RequestError, phrase
from paged_handler.lifecycle import ParentWatchdog, exit_when_drained
from paged_handler.prefixes import engine_factory_with_prefixes
from paged_handler.service import RESPONSE_MARGIN_BYTES, Answer, LLMService
from paged_handler.settings import HANDLER_DEFAULTS, parse_handler_config

logger = logging.getLogger(__name__)

_DEBUG_HEADERS = os.environ.get("PAGED_DEBUG_HEADERS") == "1"
_SECRET_HEADER_WORDS = ("auth", "token", "key", "secret", "cookie", "password", "session")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_JSON_TYPES = ("application/json", "")


# ---------------------------------------------------------------------------- the backend socket
class LockedSocket:
    """The backend socket with ``sendall`` under one lock (reads and everything else pass through).

    ``messages`` / ``bytes_sent`` count every write to the frontend (each ``sendall`` is one
    whole backend message), for describe and ``make bench-serve``."""

    def __init__(self, sock):
        self._sock = sock
        self._lock = threading.Lock()
        self.messages = 0
        self.bytes_sent = 0

    def sendall(self, data) -> None:
        with self._lock:
            self._sock.sendall(data)
            self.messages += 1
            self.bytes_sent += len(data)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def serialize_backend_writes() -> None:
    """Make TorchServe hand every writer the locked socket.

    The worker calls ``Service.set_cl_socket`` right after ``initialize`` returns; from then on
    the request contexts and the response thread both take the socket from that Service.
    """
    from ts.service import Service

    if getattr(Service.set_cl_socket, "locks_writes", False):
        return
    original = Service.set_cl_socket

    def set_cl_socket(self, cl_socket):
        original(self, cl_socket if isinstance(cl_socket, LockedSocket) else LockedSocket(cl_socket))

    set_cl_socket.locks_writes = True
    Service.set_cl_socket = set_cl_socket


# ---------------------------------------------------------------------------- reading a request
def request_headers(context) -> dict:
    try:
        return dict(context.get_all_request_header(0) or {})
    except Exception:  # noqa: BLE001
        return {}


def redacted(headers: dict) -> dict:
    """Headers safe to log: values of anything that looks like a credential are replaced."""
    return {k: ("<redacted>" if any(w in str(k).lower() for w in _SECRET_HEADER_WORDS) else v)
            for k, v in headers.items()}


def is_describe(headers: dict, row: dict) -> bool:
    """True only for TorchServe's describe call (management API, ``?customized=true``).

    The frontend marks it with ``describe: True``, but a client can send that header on an
    inference request. A describe job carries no parameters at all; an inference request always
    has some (its body, form fields or query parameters), except an empty form post, which has a
    form Content-Type; and /predictions requests always carry the frontend's ``url_path``.
    """
    if headers.get("describe") != "True" or row or "url_path" in headers or "explain" in headers:
        return False
    return not any(str(k).lower() == "content-type" and str(v).lower().startswith(_FORM_TYPES)
                   for k, v in headers.items())


def is_rest(headers: dict) -> bool:
    """REST requests carry HTTP headers (and /predictions ones ``url_path``); gRPC ones carry none."""
    return "url_path" in headers or any(str(k).lower() in ("host", "content-length", "transfer-encoding")
                                        for k in headers)


def route_of(headers: dict, rest: bool) -> str:
    if not rest:
        return "grpc"
    path = (headers.get("url_path") or "").strip("/")
    if path.startswith("v1/"):
        path = path[3:]
    routes = {"": "native", "predictions": "native", "completions": "completions",
              "chat/completions": "chat", "models": "models"}
    if path not in routes:
        raise RequestError(f"unknown route '{path[:100]}'; use v1/completions, v1/chat/completions or v1/models",
                           404, "not_found")
    return routes[path]


def body_of(row: dict, headers: dict, rest: bool) -> Any:
    """The request body as TorchServe handed it over (bytes, str, or JSON it already decoded)."""
    if not rest:
        return row.get("data", row.get("body"))
    if "body" not in row:
        raise RequestError("send the request as a JSON body with Content-Type: application/json "
                           "(form data is not accepted)")
    ctype = headers.get("body", {}).get("content-type", "") if isinstance(headers.get("body"), dict) else ""
    if (ctype or "").lower() not in _JSON_TYPES:
        raise RequestError(f"Content-Type must be application/json, got {ctype[:100]!r}")
    return row["body"]


# ---------------------------------------------------------------------------- the handler
class TorchServeHandler:
    """One engine per worker; TorchServe's ``initialize`` / ``handle`` entry points."""

    engine_factory = None  # None: paged.engine.LLMEngine (tests put a fake engine here)

    def __init__(self):
        self.initialized = False
        self.service: LLMService | None = None
        self.settings: dict = dict(HANDLER_DEFAULTS)
        self.metrics = None
        self.open_requests = 0
        self.watchdog: ParentWatchdog | None = None
        self.writer = BackendWriter(HANDLER_DEFAULTS["max_response_bytes"] - RESPONSE_MARGIN_BYTES)

    # ------------------------------------------------------------------ load
    def initialize(self, context) -> None:
        from paged_handler.metrics import ServingMetrics
        from paged_handler.tokenization import TokenizerPool

        self.watchdog = ParentWatchdog().start()
        serialize_backend_writes()
        model_dir = context.system_properties.get("model_dir") or "."
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        try:
            config, settings = parse_handler_config(yaml_cfg.get("handler"), model_dir)
        except (ValueError, TypeError) as exc:
            logger.error("invalid `handler:` settings in model-config.yaml: %s", exc)
            raise ValueError(f"invalid `handler:` settings in model-config.yaml: {exc}") from None
        self.settings = settings
        self.writer = BackendWriter(settings["max_response_bytes"] - RESPONSE_MARGIN_BYTES)
        model_name = context.model_name or "llm"
        logger.info("loading paged engine: %s", json.dumps(config.to_dict()))
        factory = self.engine_factory
        if settings["shared_prefixes"]:
            factory = engine_factory_with_prefixes(settings["shared_prefixes"], model_dir, factory)
        engine = AsyncLLMEngine(config, engine_factory=factory, on_dead=self._engine_died,
                                restart_budget=(settings["engine_restarts_per_hour"], 3600.0))
        try:
            engine.start(timeout=settings["load_timeout_s"])
        except Exception as exc:
            logger.error("engine failed to load: %s", exc)
            engine.shutdown(5)
            raise
        tokenizers = TokenizerPool(config.model, settings["tokenizer_threads"], settings["max_pending_tokenizations"])
        self.metrics = ServingMetrics(context.metrics, model_name, settings["metrics_interval_s"])
        self.service = LLMService(engine, tokenizers, settings, model_name, self.metrics)
        logger.info("paged engine ready in %.1f s (pid %d, max_model_len=%s, vocab=%s, engine-thread probe %s)",
                    engine.load_time_s or 0.0, os.getpid(), engine.max_model_len, engine.vocab_size, engine.probe)
        self.initialized = True

    def _engine_died(self, exc: BaseException) -> None:
        """On the engine thread, once the engine failed beyond its rebuild budget and every request
        was failed: let their answers out, then end the worker so TorchServe starts a fresh one."""
        exit_when_drained(f"the engine stopped: {exc!r}", busy=lambda: self.open_requests)

    # ------------------------------------------------------------------ requests
    async def handle(self, data, context):
        self.open_requests += 1
        channel = None
        try:
            channel = self.writer.channel(context.cl_socket, context.request_ids[0])
            return await self._handle(data, context, channel)
        except Exception:  # noqa: BLE001 - never raise out of handle (it would fail every request)
            logger.exception("unexpected error while framing a response")
            return [INTERNAL_ERROR.message]
        finally:
            if channel is not None:
                channel.flush()  # this request's chunks are written before its final message
            self.open_requests -= 1

    async def _handle(self, data, context, channel: RequestChannel):
        headers = request_headers(context)
        row = data[0] if data and isinstance(data[0], dict) else {}
        if _DEBUG_HEADERS:
            logger.info("request headers: %s; parameters: %s", redacted(headers), sorted(row))
        if is_describe(headers, row):
            info = await self.describe(context.cl_socket)
            return self._final(context, Answer(200, "application/json", json.dumps(info)))
        rest = is_rest(headers)
        streamed = threading.Event()

        def send(chunk: str, content_type: str) -> None:
            if not streamed.is_set():  # the final message carries the stream's content type too
                context.set_response_content_type(0, content_type)
                streamed.set()
            channel.send(chunk, content_type)

        try:
            if self.service is None:
                raise RequestError("model is not loaded", 503, "unavailable")
            self.metrics.touch(self.service.engine)
            route = route_of(headers, rest)
            raw = None if route == "models" else body_of(row, headers, rest)
            rid = context.get_request_id(0) or uuid.uuid4().hex
            answer = await self.service.serve(route, raw, rid, send)
        except RequestError as err:
            answer = self._error_answer(err)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug must not reach the client as internal text
            logger.exception("unexpected handler error")
            answer = self._error_answer(INTERNAL_ERROR)
        if not rest or streamed.is_set():
            return self._final(context, answer, keep_status=streamed.is_set())
        if answer.status >= 400:
            return self._error_final(context, answer)
        return self._split_final(context, answer, channel)

    def _error_answer(self, err: RequestError) -> Answer:
        if err.status in (429, 503) and self.metrics is not None:
            self.metrics.request_rejected()
        return Answer(err.status, "application/json", json.dumps(err.body(), ensure_ascii=False))

    # ------------------------------------------------------------------ framing
    @staticmethod
    def _write_open(context, body: str) -> None:
        """A whole response to the frontend now, through TorchServe's own framing, that leaves the
        job open (a final message ends it). Stream chunks do not come here: they go through the
        worker's BackendWriter."""
        from ts.protocol.otf_message_handler import create_predict_response

        msg = create_predict_response([body], context.request_ids, "Intermediate", 200, context,
                                      ts_stream_next=False)
        context.cl_socket.sendall(msg)

    @staticmethod
    def _final(context, answer: Answer, keep_status: bool = False) -> list[str]:
        """The final message, ending the frontend's job (gRPC, describe, and streams)."""
        if not keep_status:
            context.set_response_status(answer.status, phrase(answer.status))
            context.set_response_content_type(0, answer.content_type)
        context.set_response_header(0, "ts_stream_next", "false")
        return [answer.body]

    @staticmethod
    def _split_final(context, answer: Answer, channel: RequestChannel) -> list[str]:
        """A 200 REST answer: its first character as a chunk (so the client gets headers), the rest
        as the final message. The body bytes are unchanged; only the framing becomes chunked."""
        context.set_response_status(answer.status, phrase(answer.status))
        context.set_response_content_type(0, answer.content_type)
        channel.send(answer.body[:1], answer.content_type)
        context.set_response_header(0, "ts_stream_next", "false")
        return [answer.body[1:]]

    def _error_final(self, context, answer: Answer) -> list[str]:
        """A >= 400 REST answer: written whole now, then an empty final message ends the job."""
        context.set_response_status(answer.status, phrase(answer.status))
        context.set_response_content_type(0, answer.content_type)
        self._write_open(context, answer.body)
        context.set_response_header(0, "ts_stream_next", "false")
        return [""]

    # ------------------------------------------------------------------ describe
    async def describe(self, backend_socket=None) -> dict:
        """What describe shows: the service's facts, and this worker's process, threads and the
        backend messages it wrote so far (``make bench-serve`` reads the last two)."""
        info = await self.service.describe() if self.service is not None else {"loaded": False}
        from ts.service import Service

        info["worker"] = {"pid": os.getpid(), "parent_pid": self.watchdog.parent_pid if self.watchdog else None,
                          "open_requests": self.open_requests,
                          "backend_writes_locked": bool(getattr(Service.set_cl_socket, "locks_writes", False)),
                          "threads": {str(t.native_id): t.name for t in threading.enumerate()}}
        if isinstance(backend_socket, LockedSocket):
            w = self.writer
            info["worker"]["backend"] = {"messages": backend_socket.messages, "bytes": backend_socket.bytes_sent,
                                         "stream_messages": w.messages, "stream_predictions": w.predictions,
                                         "stream_chunks": w.chunks}
        return info
