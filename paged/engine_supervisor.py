"""The engine thread itself: it builds the engine, runs its loop, and rebuilds it after a fault.

Why one dedicated thread that also *builds* the engine: on CPU, once one thread of a process has
run torch ops (used the OpenMP pool), small GEMMs run 2-3x slower in every other thread
(docs/serving.md, "One torch thread"). So weight loading, the warm-up step, every ``step()`` and
every rebuild run here, and nothing else in the process runs torch.

If ``step()`` raises, that engine cannot go on: every request it held fails with
EngineDeadError. Then, while the restart budget allows it (at most N rebuilds within a sliding
window of seconds), a fresh engine is built on this same thread and serves the requests still in
the inbox and every later one; otherwise the thread stops for good, fails what is left, and calls
``on_dead`` once. ``first_error`` keeps the first fault whatever happens after it.

This module imports no torch: ``paged.engine`` (and the GEMM probe) are imported on this thread,
when it builds.
"""
from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from paged.config import EngineConfig
from paged.engine_thread import EngineLoop
from paged.errors import EngineDeadError
from paged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WARMUP_REQUEST_ID = "__async_engine_warmup__"


def default_factory(config: EngineConfig):
    from paged.engine import LLMEngine  # imported here: on the engine thread

    return LLMEngine(config)


@dataclass
class EngineFacts:
    """What callers on other threads read about the engine built last (set after each build)."""

    tokenizer: Any = None
    vocab_size: int | None = None
    max_model_len: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    load_time_s: float | None = None
    probe: dict = field(default_factory=dict)   # the engine thread's GEMM probe (paged/thread_probe.py)


class RestartBudget:
    """At most ``allowed`` rebuilds within any ``window_s`` seconds."""

    def __init__(self, allowed: int, window_s: float):
        self.allowed, self.window_s = allowed, window_s
        self._times: collections.deque[float] = collections.deque()

    def take(self) -> bool:
        """Spend one rebuild, if one is left."""
        now = time.monotonic()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.allowed:
            return False
        self._times.append(now)
        return True


class EngineSupervisor:
    """Owns the engine thread; ``start`` returns once the first engine is built (or failed)."""

    def __init__(self, config: EngineConfig, factory: Callable[[EngineConfig], Any], loop: EngineLoop,
                 warmup: bool, restart_budget: tuple[int, float],
                 on_dead: Callable[[BaseException], None] | None):
        self.config = config
        self.factory = factory
        self.loop = loop
        self.warmup = warmup
        self.budget = RestartBudget(*restart_budget)
        self.on_dead = on_dead
        self.facts = EngineFacts()
        self.restarts = 0
        self.first_error: BaseException | None = None
        self.dead: BaseException | None = None      # set once the thread stopped for good
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None
        self.engine_thread_id: int | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="paged-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _run(self) -> None:
        self.engine_thread_id = threading.get_ident()
        try:
            engine = self._build()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            logger.exception("engine failed to load")
            self.load_error = exc
            self.ready.set()
            return
        self.ready.set()
        while True:
            try:
                self.loop.run(engine)
            except BaseException as exc:  # noqa: BLE001
                logger.exception("engine.step() raised; failing every request in flight")
                _drop_frames(exc)  # its frames hold the old engine, which must be freed before a rebuild
                if self.first_error is None:
                    self.first_error = exc
                _close_quietly(engine)  # a tensor-parallel engine's ranks go with it
                engine = None
                if not self.loop.stop.is_set() and self.budget.take():
                    self.restarts += 1
                    self.loop.fail_streams(exc)
                    engine = self._rebuild(exc)
                    if engine is not None:
                        continue
                self._stop_for_good(exc)
                if self.on_dead is not None:
                    try:
                        self.on_dead(exc)
                    except Exception:  # noqa: BLE001
                        logger.exception("on_dead callback failed")
                return
            self._stop_for_good(EngineDeadError("engine shut down"))
            _close_quietly(engine)
            return

    def _build(self):
        """Build (and warm up) an engine on this thread; publish what callers read from it."""
        from paged.thread_probe import gemm_probe  # torch: on the engine thread only

        started = time.perf_counter()
        engine = self.factory(self.config)
        facts = EngineFacts(tokenizer=getattr(engine, "tokenizer", None),
                            vocab_size=getattr(engine, "vocab_size", None),
                            max_model_len=getattr(engine, "max_model_len", None),
                            eos_token_ids=list(getattr(engine, "eos_token_ids", []) or []))
        if self.warmup:
            _warm_up(engine)
        facts.probe = gemm_probe()
        self.loop.publish_stats(engine, force=True)
        facts.load_time_s = time.perf_counter() - started
        self.facts = facts
        return engine

    def _rebuild(self, cause: BaseException):
        """A fresh engine on this thread (None if building it fails)."""
        logger.warning("rebuilding the engine in process (restart %d) after: %r", self.restarts, cause)
        gc.collect()  # the old engine's KV pool and weights go before the new ones are allocated
        try:
            return self._build()
        except BaseException:  # noqa: BLE001
            logger.exception("rebuilding the engine failed")
            return None

    def _stop_for_good(self, exc: BaseException) -> None:
        """Fail every request and pending message; the first cause is the one kept."""
        if self.dead is None:
            self.dead = self.first_error or exc
        self.loop.fail_streams(exc)
        self.loop.fail_inbox(exc)


def _warm_up(engine) -> None:
    vocab = int(getattr(engine, "vocab_size", 2) or 2)
    ids = [i % vocab for i in range(1, 9)]
    engine.add_request(WARMUP_REQUEST_ID, ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    for _ in range(64):
        outs = engine.step()
        if any(o.request_id == WARMUP_REQUEST_ID and o.finished for o in outs):
            break
    else:
        engine.abort_request(WARMUP_REQUEST_ID)


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
