"""A persistent engine on its own thread, fed from asyncio coroutines (what the handler uses).

Why a dedicated thread that also *builds* the engine: on CPU, once one thread of a process has
run torch ops (used the OpenMP pool), small GEMMs run 2-3x slower in every other thread (see
CPU_NOTES). So weight loading, the warm-up step and every ``step()`` run on the one engine
thread, and the asyncio side never touches torch: it only passes Python objects through a
thread-safe inbox (requests, aborts) and receives ``RequestOutput`` snapshots back through
``loop.call_soon_threadsafe`` (one wake-up per step and event loop, not one per request).

This module imports no torch itself; ``paged.engine`` is imported on the engine thread.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from paged.config import EngineConfig
from paged.errors import EngineDeadError, EngineOverloadedError
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineOverloadedError"]

_WARMUP_ID = "__async_engine_warmup__"


def _default_factory(config: EngineConfig):
    from paged.engine import LLMEngine  # imported here: on the engine thread

    return LLMEngine(config)


class _Stream:
    """The asyncio side of one request: a queue of RequestOutput snapshots or an exception."""

    __slots__ = ("request_id", "loop", "queue", "finished")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False


class AsyncLLMEngine:
    """Owns one ``LLMEngine`` on a background thread.

    ``start()`` blocks until the engine is built and warmed up (raising what the build raised);
    ``generate()`` is an async iterator of cumulative ``RequestOutput`` snapshots.
    """

    def __init__(self, config: EngineConfig,
                 engine_factory: Callable[[EngineConfig], Any] | None = None,
                 warmup: bool = True, idle_wait_s: float = 0.5,
                 stats_interval_s: float = 0.25):
        self.config = config
        self._factory = engine_factory or _default_factory
        self._warmup = warmup
        self._idle_wait_s = idle_wait_s
        self._stats_interval_s = stats_interval_s
        self._inbox: collections.deque = collections.deque()
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
        return self._dead

    # ------------------------------------------------------------------ asyncio side
    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       arrival_time: float | None = None,
                       deadline_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs; several outputs ready at once are coalesced to the newest.

        The engine hands out fresh ``RequestOutput`` / ``CompletionOutput`` objects every step
        (``LLMEngine`` builds new token-id lists), so they are passed through without copying.
        Raises ValueError / EngineOverloadedError from ``add_request``, EngineDeadError if the
        loop dies, TimeoutError after ``deadline_s`` (a backstop; the engine's own
        ``request_timeout_s`` normally ends the request first). Leaving the iteration early
        (break, aclose, cancellation, deadline) aborts the request in the engine.
        """
        self._check_alive()
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop)
        self._post(("add", stream, prompt, params, arrival_time or time.time()))
        if self._dead is not None:  # died between the check and the post: nobody drains the inbox
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        timer = None
        if deadline_s is not None:
            timer = loop.call_later(deadline_s, stream.queue.put_nowait,
                                    TimeoutError(f"request {request_id} exceeded its {deadline_s:.0f} s deadline"))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                while not stream.queue.empty():  # coalesce: outputs are cumulative
                    nxt = stream.queue.get_nowait()
                    if isinstance(item, BaseException):
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
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps (thread-safe reads, probes)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead is not None or self._thread is None or not self._thread.is_alive():
            fut.set_exception(EngineDeadError(f"engine is not running: {self._dead!r}"))
            return fut
        self._post(("call", fn, fut))
        return fut

    async def kv_stats(self) -> dict:
        """Exact ``engine.kv_stats()``, read on the engine thread."""
        return await asyncio.wrap_future(self.call(lambda e: e.kv_stats()))

    def stats_snapshot(self) -> dict:
        """The latest stats the engine thread published (at most ``stats_interval_s`` old)."""
        return dict(self._stats)

    def num_inflight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        if self._thread is None or not self._ready.is_set():
            raise EngineDeadError("engine not started")
        if not self._thread.is_alive():
            raise EngineDeadError("engine thread exited")

    def _post(self, cmd: tuple) -> None:
        self._inbox.append(cmd)
        self._wake.set()

    def _run(self) -> None:
        self.engine_thread_id = threading.get_ident()
        t0 = time.perf_counter()
        try:
            engine = self._factory(self.config)
            self._engine = engine
            self.tokenizer = getattr(engine, "tokenizer", None)
            self.vocab_size = getattr(engine, "vocab_size", None)
            self.max_model_len = getattr(engine, "max_model_len", None)
            if self._warmup:
                self._warm_up(engine)
            self.probe = _gemm_probe()
            self._publish_stats(force=True)
            self.load_time_s = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            logger.exception("engine failed to load")
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(engine)
        except BaseException as exc:  # noqa: BLE001
            logger.exception("engine loop died; failing every in-flight request")
            self._die(exc)
        else:
            self._die(EngineDeadError("engine shut down"))

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
            try:
                outs = engine.step()
            except BaseException as exc:  # noqa: BLE001
                logger.exception("engine.step() raised; failing every in-flight request")
                self._die(exc)
                return
            self._dispatch(outs)
            self._publish_stats()

    def _drain_inbox(self, engine) -> None:
        while self._inbox:
            cmd = self._inbox.popleft()
            kind = cmd[0]
            if kind == "add":
                _, stream, prompt, params, arrival = cmd
                if stream.request_id in self._streams:
                    self._send(stream, ValueError(f"duplicate request id {stream.request_id!r}"))
                    continue
                try:
                    engine.add_request(stream.request_id, prompt, params, arrival_time=arrival)
                except BaseException as exc:  # noqa: BLE001 - ValueError, EngineOverloadedError, ...
                    self._send(stream, exc)
                    continue
                self._streams[stream.request_id] = stream
            elif kind == "abort":
                rid = cmd[1]
                if self._streams.pop(rid, None) is not None:
                    try:
                        engine.abort_request(rid)
                    except Exception:  # noqa: BLE001 - a finished request may already be gone
                        logger.debug("abort of %s failed", rid, exc_info=True)
            elif kind == "call":
                _, fn, fut = cmd
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(engine))
                    except BaseException as exc:  # noqa: BLE001
                        fut.set_exception(exc)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out))
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

    def _die(self, exc: BaseException) -> None:
        self._dead = exc
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop died: {exc!r}")
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            self._send(stream, err)
        while self._inbox:  # commands that will never run
            cmd = self._inbox.popleft()
            if cmd[0] == "add":
                self._send(cmd[1], err)
            elif cmd[0] == "call" and cmd[2].set_running_or_notify_cancel():
                cmd[2].set_exception(err)


def _deliver(items) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def _gemm_probe(repeats: int = 200) -> dict:
    """Time a small fp32 GEMM on the calling (engine) thread: the CPU_NOTES slow-thread check.

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
