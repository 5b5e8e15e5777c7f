"""A persistent engine on its own thread, fed from asyncio coroutines (what the handler uses).

Why a dedicated thread that also *builds* the engine: on CPU, once one thread of a process has
run torch ops (used the OpenMP pool), small GEMMs run 2-3x slower in every other thread
(docs/serving.md, "One torch thread"). So weight loading, the warm-up step, every ``step()``
and every rebuild after a fault run on the one engine thread, and the asyncio side never touches
torch: it only passes typed messages through a thread-safe inbox (requests, aborts, calls) and
receives ``RequestOutput`` snapshots back through ``loop.call_soon_threadsafe`` (one wake-up per
step and event loop, not one per request).

This module imports no torch itself; ``paged.engine`` is imported on the engine thread.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from paged.config import EngineConfig
from paged.errors import EngineDeadError, EngineOverloadedError, RequestFailedError
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineOverloadedError", "RequestFailedError"]

_WARMUP_ID = "__async_engine_warmup__"


def _default_factory(config: EngineConfig):
    from paged.engine import LLMEngine  # imported here: on the engine thread

    return LLMEngine(config)


class _Stream:
    """The asyncio side of one request: a queue of RequestOutput snapshots or an exception."""

    __slots__ = ("request_id", "loop", "queue")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()


# ---- messages from the asyncio side to the engine thread (through one deque) --------------------
@dataclass
class AddRequest:
    """Queue a request. ``cancelled`` is set by the asyncio side when the caller left while the
    message still waited in the inbox: the engine thread then drops it without any work."""

    stream: _Stream
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    report_every_step: bool = True  # False: the engine reports the request once, when finished
    cancelled: bool = False


@dataclass
class Abort:
    """Forget a request and free its blocks (unknown or finished ids are ignored)."""

    request_id: str


@dataclass
class Call:
    """Run ``fn(engine)`` between steps and complete ``future`` with its result."""

    fn: Callable[[Any], Any]
    future: concurrent.futures.Future


Message = AddRequest | Abort | Call


class AsyncLLMEngine:
    """Owns one ``LLMEngine`` on a background thread.

    ``start()`` blocks until the engine is built and warmed up (raising what the build raised);
    ``generate()`` is an async iterator of cumulative ``RequestOutput`` snapshots.

    Admission: at most ``max_pending_adds`` requests (default: the config's
    ``max_waiting_requests``) may wait in the inbox for the engine thread; more are refused with
    EngineOverloadedError at once, so a burst can never pile up unbounded work for that thread.
    Faults: a request the engine fails alone (a finished output carrying ``error``) raises that
    error in its own ``generate()`` only. If ``step()`` raises, that engine cannot go on: every
    request in flight fails with EngineDeadError. Then, while ``restart_budget`` allows it
    (at most N rebuilds within a sliding window of seconds), a fresh engine is built on the same
    thread (the only thread that runs torch) and serves the requests still in the inbox and every
    later one; otherwise the loop stops for good, and ``on_dead`` (if given) is called once, on
    the engine thread. ``first_error`` keeps the first fault whatever happens after it.
    """

    def __init__(self, config: EngineConfig,
                 engine_factory: Callable[[EngineConfig], Any] | None = None,
                 warmup: bool = True, idle_wait_s: float = 0.5,
                 stats_interval_s: float = 0.25,
                 max_pending_adds: int | None = None,
                 on_dead: Callable[[BaseException], None] | None = None,
                 restart_budget: tuple[int, float] = (0, 3600.0)):
        self.config = config
        self._factory = engine_factory or _default_factory
        self._warmup = warmup
        self._idle_wait_s = idle_wait_s
        self._stats_interval_s = stats_interval_s
        self._max_pending_adds = max_pending_adds or config.max_waiting_requests
        self._on_dead = on_dead
        self._restart_budget = restart_budget
        self._restart_times: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.first_error: BaseException | None = None
        self._inbox: collections.deque[Message] = collections.deque()
        self._pending_adds = 0  # AddRequests in the inbox; guarded by _pending_lock
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine = None
        self._load_error: BaseException | None = None
        self._dead: BaseException | None = None
        self._streams: dict[str, _Stream] = {}  # touched on the engine thread only
        self._stats: dict = {}
        self._stats_time = 0.0
        self.tokenizer = None
        self.vocab_size: int | None = None
        self.max_model_len: int | None = None
        self.eos_token_ids: list[int] = []
        self.engine_thread_id: int | None = None
        self.load_time_s: float | None = None
        self.probe: dict = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> "AsyncLLMEngine":
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine already started")
        self._thread = threading.Thread(target=self._run, name="paged-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"engine did not load within {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; in-flight requests fail with EngineDeadError. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        """The error that stopped the loop for good (None while it runs or rebuilds)."""
        return self._dead

    # ------------------------------------------------------------------ asyncio side
    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       arrival_time: float | None = None, deadline_s: float | None = None,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs; several outputs ready at once are coalesced to the newest.

        ``prompt`` should be token ids (tokenize before calling: the engine thread then does no
        tokenizer work); a string is tokenized by the engine. ``stream=False``: only the finished
        output is wanted, and the engine builds no intermediate ones. The engine hands out fresh
        ``RequestOutput`` / ``CompletionOutput`` objects every step, so they are passed through
        without copying. Raises EngineOverloadedError when the inbox is full, what
        ``add_request`` raises (InvalidRequestError, EngineOverloadedError), RequestFailedError
        if the engine failed this request, EngineDeadError if the loop dies, TimeoutError after
        ``deadline_s`` (a backstop; the engine's own ``request_timeout_s`` normally ends the
        request first). Leaving the iteration early (break, aclose, cancellation, deadline)
        aborts the request in the engine, or drops it unseen if it is still in the inbox.
        """
        self._check_alive()
        with self._pending_lock:
            if self._pending_adds >= self._max_pending_adds:
                raise EngineOverloadedError(f"{self._pending_adds} requests are already waiting to enter "
                                            "the engine")
            self._pending_adds += 1
        loop = asyncio.get_running_loop()
        request_stream = _Stream(request_id, loop)
        add = AddRequest(request_stream, prompt, params, arrival_time or time.time(), report_every_step=stream)
        self._post(add)
        if self._dead is not None:  # died between the check and the post: nobody drains the inbox
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        timer = None
        if deadline_s is not None:
            timer = loop.call_later(deadline_s, request_stream.queue.put_nowait,
                                    TimeoutError(f"request {request_id} exceeded its {deadline_s:.0f} s deadline"))
        finished = False
        error: BaseException | None = None  # arrived behind an output: raised after yielding it
        try:
            while True:
                item = error or await request_stream.queue.get()
                error = None
                while not isinstance(item, BaseException) and not request_stream.queue.empty():
                    nxt = request_stream.queue.get_nowait()  # coalesce: outputs are cumulative
                    if isinstance(nxt, BaseException):
                        error = nxt
                        break
                    item = nxt
                if isinstance(item, BaseException):
                    # the engine side already forgot the request, except after our own deadline
                    finished = not isinstance(item, TimeoutError)
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if not finished:
                add.cancelled = True
                self._post(Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._post(Abort(request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps (thread-safe reads, probes)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead is not None or self._thread is None or not self._thread.is_alive():
            fut.set_exception(EngineDeadError(f"engine is not running: {self._dead!r}"))
            return fut
        self._post(Call(fn, fut))
        return fut

    async def kv_stats(self) -> dict:
        """Exact ``engine.kv_stats()``, read on the engine thread."""
        return await asyncio.wrap_future(self.call(lambda e: e.kv_stats()))

    def stats_snapshot(self) -> dict:
        """The latest stats the engine thread published (at most ``stats_interval_s`` old)."""
        return dict(self._stats)

    def num_inflight(self) -> int:
        """Requests the engine thread holds plus those still waiting in the inbox."""
        return len(self._streams) + self._pending_adds

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        if self._thread is None or not self._ready.is_set():
            raise EngineDeadError("engine not started")
        if not self._thread.is_alive():
            raise EngineDeadError("engine thread exited")

    def _post(self, msg: Message) -> None:
        self._inbox.append(msg)
        self._wake.set()

    def _run(self) -> None:
        self.engine_thread_id = threading.get_ident()
        try:
            engine = self._build()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            logger.exception("engine failed to load")
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                self._loop(engine)
            except BaseException as exc:  # noqa: BLE001
                logger.exception("engine.step() raised; failing every request in flight")
                _drop_frames(exc)  # its frames hold the old engine, which must be freed before a rebuild
                if self.first_error is None:
                    self.first_error = exc
                _close_quietly(engine)  # a tensor-parallel engine's ranks go with it
                engine = self._engine = None
                if self._take_restart():
                    self._fail_streams(exc)
                    engine = self._rebuild(exc)
                    if engine is not None:
                        continue
                self._fail_all(exc)
                if self._on_dead is not None:
                    try:
                        self._on_dead(exc)
                    except Exception:  # noqa: BLE001
                        logger.exception("on_dead callback failed")
                return
            self._fail_all(EngineDeadError("engine shut down"))
            _close_quietly(engine)
            return

    def _build(self):
        """Build (and warm up) an engine on this thread; publish what callers read from it."""
        t0 = time.perf_counter()
        engine = self._factory(self.config)
        self._engine = engine
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.vocab_size = getattr(engine, "vocab_size", None)
        self.max_model_len = getattr(engine, "max_model_len", None)
        self.eos_token_ids = list(getattr(engine, "eos_token_ids", []) or [])
        if self._warmup:
            self._warm_up(engine)
        self.probe = _gemm_probe()
        self._publish_stats(force=True)
        self.load_time_s = time.perf_counter() - t0
        return engine

    def _take_restart(self) -> bool:
        """Spend one rebuild of the budget (at most N within the sliding window), if one is left."""
        allowed, window_s = self._restart_budget
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= allowed or self._stop.is_set():
            return False
        self._restart_times.append(now)
        self.restarts += 1
        return True

    def _rebuild(self, cause: BaseException):
        """A fresh engine on this thread (None if building it fails)."""
        logger.warning("rebuilding the engine in process (restart %d) after: %r", self.restarts, cause)
        gc.collect()  # the old engine's KV pool and weights go before the new ones are allocated
        try:
            return self._build()
        except BaseException:  # noqa: BLE001
            logger.exception("rebuilding the engine failed")
            return None

    def _warm_up(self, engine) -> None:
        vocab = int(getattr(engine, "vocab_size", 2) or 2)
        ids = [i % vocab for i in range(1, 9)]
        engine.add_request(_WARMUP_ID, ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        for _ in range(64):
            outs = engine.step()
            if any(o.request_id == _WARMUP_ID and o.finished for o in outs):
                break
        else:
            engine.abort_request(_WARMUP_ID)

    def _loop(self, engine) -> None:
        """Drain the inbox and step until stopped; an exception from ``step()`` ends the loop."""
        while not self._stop.is_set():
            busy = bool(self._streams) or engine.has_unfinished_requests()
            if not busy and not self._inbox:
                self._publish_stats(force=True)
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            self._wake.clear()
            self._drain_inbox(engine)
            if not engine.has_unfinished_requests():
                continue
            self._dispatch(engine.step())
            self._publish_stats()

    def _drain_inbox(self, engine) -> None:
        while self._inbox:
            msg = self._inbox.popleft()
            if isinstance(msg, AddRequest):
                with self._pending_lock:
                    self._pending_adds -= 1
                self._add(engine, msg)
            elif isinstance(msg, Abort):
                if self._streams.pop(msg.request_id, None) is not None:
                    try:
                        engine.abort_request(msg.request_id)
                    except Exception:  # noqa: BLE001 - a finished request may already be gone
                        logger.debug("abort of %s failed", msg.request_id, exc_info=True)
            elif isinstance(msg, Call):
                if msg.future.set_running_or_notify_cancel():
                    try:
                        msg.future.set_result(msg.fn(engine))
                    except BaseException as exc:  # noqa: BLE001
                        msg.future.set_exception(exc)

    def _add(self, engine, msg: AddRequest) -> None:
        stream = msg.stream
        if msg.cancelled:
            return
        if stream.request_id in self._streams:
            self._send(stream, ValueError(f"duplicate request id {stream.request_id!r}"))
            return
        try:
            engine.add_request(stream.request_id, msg.prompt, msg.params, arrival_time=msg.arrival_time,
                               stream=msg.report_every_step)
        except Exception as exc:  # noqa: BLE001 - InvalidRequestError, EngineOverloadedError, ...
            self._send(stream, exc)
            return
        self._streams[stream.request_id] = stream

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            error = getattr(out, "error", None)
            if out.finished or error is not None:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out if error is None else error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed
                pass

    def _send(self, stream: _Stream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(_deliver, [(stream, item)])
        except RuntimeError:
            pass

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_time < self._stats_interval_s:
            return
        self._stats_time = now
        try:
            self._stats = dict(self._engine.kv_stats())
        except Exception:  # noqa: BLE001 - stats must never kill the loop
            logger.debug("kv_stats failed", exc_info=True)

    def _fail_streams(self, exc: BaseException) -> None:
        """Fail every request the engine held (the inbox is kept for a rebuilt engine)."""
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop died: {exc!r}")
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            self._send(stream, err)

    def _fail_all(self, exc: BaseException) -> None:
        """Stop for good: fail every request and pending command; the first cause is the one kept."""
        if self._dead is None:
            self._dead = self.first_error or exc
        self._fail_streams(exc)
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop died: {exc!r}")
        while self._inbox:  # messages that will never run
            msg = self._inbox.popleft()
            if isinstance(msg, AddRequest):
                with self._pending_lock:
                    self._pending_adds -= 1
                self._send(msg.stream, err)
            elif isinstance(msg, Call) and msg.future.set_running_or_notify_cancel():
                msg.future.set_exception(err)


def _drop_frames(exc: BaseException) -> None:
    """Forget the tracebacks of an exception and of the ones it chains (their frames keep locals alive)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _close_quietly(engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - the engine is being dropped anyway
            logger.exception("closing the engine failed")


def _deliver(items) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def _gemm_probe(repeats: int = 200) -> dict:
    """Time a small fp32 GEMM on the calling (engine) thread: the slow-thread check of docs/serving.md.

    8x512 @ 512x1408 runs ~70 us on a healthy thread here and ~220 us when another thread of the
    process ran torch first. Reported through describe so the effect can be seen live.
    """
    try:
        import torch

        a = torch.randn(8, 512)
        b = torch.randn(512, 1408)
        for _ in range(20):
            a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeats // 5):
                a @ b
            best = min(best, (time.perf_counter() - t) / (repeats // 5))
        return {"gemm_8x512x1408_us": round(best * 1e6, 1), "thread": threading.current_thread().name,
                "torch_threads": torch.get_num_threads()}
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}
