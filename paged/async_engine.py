"""A persistent engine on its own thread, fed from asyncio coroutines (what the handler uses).

Three parts, one job each:
- this module, the asyncio side: ``AsyncLLMEngine.generate`` posts an ``AddRequest`` and yields
  the request's outputs as they come back; ``abort`` / ``call`` / ``kv_stats`` post messages too.
  It never touches the engine or torch;
- ``paged/engine_thread.py``: the inbox and the loop that drains it and steps the engine;
- ``paged/engine_supervisor.py``: the thread itself, which builds the engine (the only thread that
  runs torch, docs/serving.md "One torch thread"), warms it up, and rebuilds it after a fault.

This module imports no torch; ``paged.engine`` is imported on the engine thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any, AsyncIterator, Callable

from paged.config import EngineConfig
from paged.engine_supervisor import EngineSupervisor, default_factory
from paged.engine_thread import Abort, AddRequest, Call, EngineLoop, Inbox, RequestStream
from paged.errors import EngineDeadError, EngineOverloadedError, RequestFailedError
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineOverloadedError", "RequestFailedError"]


class AsyncLLMEngine:
    """Owns one ``LLMEngine`` on a background thread.

    ``start()`` blocks until the engine is built and warmed up (raising what the build raised);
    ``generate()`` is an async iterator of cumulative ``RequestOutput`` snapshots.

    Admission: at most ``max_pending_adds`` requests (default: the config's
    ``max_waiting_requests``) may wait in the inbox for the engine thread; more are refused with
    EngineOverloadedError at once. Faults: a request the engine fails alone (a finished output
    carrying ``error``) raises that error in its own ``generate()`` only. If ``step()`` raises,
    every request in flight fails with EngineDeadError, and the engine is rebuilt while
    ``restart_budget`` (at most N rebuilds within a sliding window of seconds) allows; otherwise
    the thread stops for good and ``on_dead`` (if given) is called once, on the engine thread.
    """

    def __init__(self, config: EngineConfig,
                 engine_factory: Callable[[EngineConfig], Any] | None = None,
                 warmup: bool = True, idle_wait_s: float = 0.5,
                 stats_interval_s: float = 0.25,
                 max_pending_adds: int | None = None,
                 on_dead: Callable[[BaseException], None] | None = None,
                 restart_budget: tuple[int, float] = (0, 3600.0)):
        self.config = config
        self._inbox = Inbox(max_pending_adds or config.max_waiting_requests)
        self._loop = EngineLoop(self._inbox, threading.Event(), idle_wait_s, stats_interval_s)
        self._supervisor = EngineSupervisor(config, engine_factory or default_factory, self._loop, warmup,
                                            restart_budget, on_dead)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> "AsyncLLMEngine":
        supervisor = self._supervisor
        if supervisor.thread is not None:
            raise RuntimeError("AsyncLLMEngine already started")
        supervisor.start()
        if not supervisor.ready.wait(timeout):
            raise TimeoutError(f"engine did not load within {timeout} s")
        if supervisor.load_error is not None:
            raise supervisor.load_error
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; in-flight requests fail with EngineDeadError. Idempotent."""
        self._loop.stop.set()
        self._inbox.wake.set()
        thread = self._supervisor.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._supervisor.alive and self._supervisor.dead is None

    @property
    def dead_error(self) -> BaseException | None:
        """The error that stopped the loop for good (None while it runs or rebuilds)."""
        return self._supervisor.dead

    @property
    def first_error(self) -> BaseException | None:
        """The first fault of any engine this thread ran, kept whatever happened after it."""
        return self._supervisor.first_error

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts

    @property
    def engine_thread_id(self) -> int | None:
        return self._supervisor.engine_thread_id

    # What the last engine built reported about itself (paged/engine_supervisor.py: EngineFacts).
    tokenizer = property(lambda self: self._supervisor.facts.tokenizer)
    vocab_size = property(lambda self: self._supervisor.facts.vocab_size)
    max_model_len = property(lambda self: self._supervisor.facts.max_model_len)
    eos_token_ids = property(lambda self: self._supervisor.facts.eos_token_ids)
    load_time_s = property(lambda self: self._supervisor.facts.load_time_s)
    probe = property(lambda self: self._supervisor.facts.probe)

    # ------------------------------------------------------------------ requests
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
        self._inbox.reserve_add()
        loop = asyncio.get_running_loop()
        request_stream = RequestStream(request_id, loop)
        add = AddRequest(request_stream, prompt, params, arrival_time or time.time(), report_every_step=stream)
        self._inbox.post(add)
        dead = self._supervisor.dead
        if dead is not None:  # died between the check and the post: nobody drains the inbox
            raise EngineDeadError(f"engine loop stopped: {dead!r}")
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
                self._inbox.post(Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.post(Abort(request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps (thread-safe reads, probes)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        dead = self._supervisor.dead
        if dead is not None or not self._supervisor.alive:
            fut.set_exception(EngineDeadError(f"engine is not running: {dead!r}"))
            return fut
        self._inbox.post(Call(fn, fut))
        return fut

    async def kv_stats(self) -> dict:
        """Exact ``engine.kv_stats()``, read on the engine thread."""
        return await asyncio.wrap_future(self.call(lambda e: e.kv_stats()))

    def stats_snapshot(self) -> dict:
        """The latest stats the engine thread published (at most ``stats_interval_s`` old)."""
        return dict(self._loop.stats)

    def num_inflight(self) -> int:
        """Requests the engine thread holds plus those still waiting in the inbox."""
        return len(self._loop.streams) + self._inbox.pending_adds

    def _check_alive(self) -> None:
        supervisor = self._supervisor
        if supervisor.dead is not None:
            raise EngineDeadError(f"engine loop stopped: {supervisor.dead!r}")
        if supervisor.thread is None or not supervisor.ready.is_set():
            raise EngineDeadError("engine not started")
        if not supervisor.alive:
            raise EngineDeadError("engine thread exited")
