"""The engine thread's side of ``AsyncLLMEngine``: the inbox it reads, and the loop that steps.

The asyncio side posts typed messages into one ``Inbox`` (``AddRequest``, ``Abort``, ``Call``)
and never touches the engine; ``EngineLoop`` drains the inbox between steps, steps while any
request is unfinished, and hands each step's outputs back to the waiting coroutines with one
``loop.call_soon_threadsafe`` per event loop and step (not one per request). It also publishes
the engine's ``kv_stats`` at most every ``stats_interval_s``, so a reader on another thread gets
a recent copy without waiting for the engine.

This module imports no torch: it runs whatever engine it is given (paged/engine_supervisor.py
builds it, on this thread).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from paged.errors import EngineDeadError, EngineOverloadedError
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestStream:
    """The asyncio side of one request: a queue of RequestOutput snapshots or an exception."""

    __slots__ = ("request_id", "loop", "queue")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()


# ---- messages from the asyncio side to the engine thread ------------------------------------------
@dataclass
class AddRequest:
    """Queue a request. ``cancelled`` is set by the asyncio side when the caller left while the
    message still waited in the inbox: the engine thread then drops it without any work."""

    stream: RequestStream
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


class Inbox:
    """Messages for the engine thread, in order, with the number of ``AddRequest``s among them:
    at most ``max_pending_adds`` may wait, so a burst can never pile up unbounded work."""

    def __init__(self, max_pending_adds: int):
        self.max_pending_adds = max_pending_adds
        self._messages: collections.deque[Message] = collections.deque()
        self._pending_adds = 0  # guarded by _lock
        self._lock = threading.Lock()
        self.wake = threading.Event()

    @property
    def pending_adds(self) -> int:
        return self._pending_adds

    def __bool__(self) -> bool:
        return bool(self._messages)

    def reserve_add(self) -> None:
        """Count one more AddRequest, or raise EngineOverloadedError when the inbox is full."""
        with self._lock:
            if self._pending_adds >= self.max_pending_adds:
                raise EngineOverloadedError(f"{self._pending_adds} requests are already waiting to enter "
                                            "the engine")
            self._pending_adds += 1

    def post(self, message: Message) -> None:
        self._messages.append(message)
        self.wake.set()

    def take(self) -> Message | None:
        """The oldest message, or None when empty."""
        try:
            message = self._messages.popleft()
        except IndexError:
            return None
        if isinstance(message, AddRequest):
            with self._lock:
                self._pending_adds -= 1
        return message


def deliver(stream: RequestStream, item) -> None:
    """Put an output or an exception on the stream's queue, from any thread (its loop may be gone)."""
    try:
        stream.loop.call_soon_threadsafe(_deliver, [(stream, item)])
    except RuntimeError:  # loop closed
        pass


def _deliver(items) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def dead_error(exc: BaseException) -> EngineDeadError:
    return exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop died: {exc!r}")


class EngineLoop:
    """Drains the inbox and steps one engine until stopped; an exception from ``step()`` ends it.

    ``streams`` (the requests the engine holds) is touched on the engine thread only."""

    def __init__(self, inbox: Inbox, stop: threading.Event, idle_wait_s: float, stats_interval_s: float):
        self.inbox = inbox
        self.stop = stop
        self.idle_wait_s = idle_wait_s
        self.stats_interval_s = stats_interval_s
        self.streams: dict[str, RequestStream] = {}
        self.stats: dict = {}
        self._stats_time = 0.0

    def run(self, engine) -> None:
        inbox = self.inbox
        while not self.stop.is_set():
            busy = bool(self.streams) or engine.has_unfinished_requests()
            if not busy and not inbox:
                self.publish_stats(engine, force=True)
                inbox.wake.wait(self.idle_wait_s)
                inbox.wake.clear()
                continue
            inbox.wake.clear()
            self._drain_inbox(engine)
            if not engine.has_unfinished_requests():
                continue
            self._dispatch(engine.step())
            self.publish_stats(engine)

    def _drain_inbox(self, engine) -> None:
        while (message := self.inbox.take()) is not None:
            if isinstance(message, AddRequest):
                self._add(engine, message)
            elif isinstance(message, Abort):
                if self.streams.pop(message.request_id, None) is not None:
                    try:
                        engine.abort_request(message.request_id)
                    except Exception:  # noqa: BLE001 - a finished request may already be gone
                        logger.debug("abort of %s failed", message.request_id, exc_info=True)
            elif isinstance(message, Call):
                if message.future.set_running_or_notify_cancel():
                    try:
                        message.future.set_result(message.fn(engine))
                    except BaseException as exc:  # noqa: BLE001
                        message.future.set_exception(exc)

    def _add(self, engine, message: AddRequest) -> None:
        stream = message.stream
        if message.cancelled:
            return
        if stream.request_id in self.streams:
            deliver(stream, ValueError(f"duplicate request id {stream.request_id!r}"))
            return
        try:
            engine.add_request(stream.request_id, message.prompt, message.params, arrival_time=message.arrival_time,
                               stream=message.report_every_step)
        except Exception as exc:  # noqa: BLE001 - InvalidRequestError, EngineOverloadedError, ...
            deliver(stream, exc)
            return
        self.streams[stream.request_id] = stream

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            error = getattr(out, "error", None)
            if out.finished or error is not None:
                del self.streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out if error is None else error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed
                pass

    def publish_stats(self, engine, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_time < self.stats_interval_s:
            return
        self._stats_time = now
        try:
            self.stats = dict(engine.kv_stats())
        except Exception:  # noqa: BLE001 - stats must never kill the loop
            logger.debug("kv_stats failed", exc_info=True)

    def fail_streams(self, exc: BaseException) -> None:
        """Fail every request the engine held (the inbox is kept, for a rebuilt engine)."""
        err = dead_error(exc)
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            deliver(stream, err)

    def fail_inbox(self, exc: BaseException) -> None:
        """Fail every message still waiting: no engine will run them."""
        err = dead_error(exc)
        while (message := self.inbox.take()) is not None:
            if isinstance(message, AddRequest):
                deliver(message.stream, err)
            elif isinstance(message, Call) and message.future.set_running_or_notify_cancel():
                message.future.set_exception(err)
