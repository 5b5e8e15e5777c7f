"""The worker process's life: it must not outlive the frontend, and must not live on without an engine.

TorchServe's frontend (Java) starts each worker as a child process and has no shutdown hook for
it, and the worker's own threads (the engine thread, TorchServe's socket threads) keep the Python
process alive when the frontend dies: an orphaned worker would hold the weights and the KV pool
for good. ``ParentWatchdog`` polls the parent pid and ends the process once the worker has been
re-parented. (prctl's PR_SET_PDEATHSIG is no substitute: it fires when the *thread* that started
the child exits, and the frontend starts workers from pooled threads.)

An engine whose loop died cannot serve again, so the worker exits non-zero (``exit_when_drained``)
after the answers already produced have been written; TorchServe then starts a fresh worker,
instead of one that answers 500 for ever.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


def _exit(code: int, reason: str) -> None:
    logger.error("worker %d exits (code %d): %s", os.getpid(), code, reason)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - nothing left to report to
            pass
    os._exit(code)  # also ends non-daemon threads (the engine loop, socket readers)


class ParentWatchdog:
    """Ends the process when its parent dies (checked every ``interval_s`` on a daemon thread)."""

    def __init__(self, interval_s: float = 1.0, on_orphaned: Callable[[str], None] | None = None):
        self.parent_pid = os.getppid()
        self.interval_s = interval_s
        self._on_orphaned = on_orphaned or (lambda reason: _exit(1, reason))
        self._thread: threading.Thread | None = None

    def start(self) -> "ParentWatchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="paged-parent-watchdog", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval_s)
            if os.getppid() != self.parent_pid:
                self._on_orphaned(f"the frontend (pid {self.parent_pid}) is gone")
                return


def exit_when_drained(reason: str, busy: Callable[[], int], grace_s: float = 10.0,
                      flush_s: float = 1.0, code: int = 1) -> threading.Thread:
    """Exit with ``code`` once ``busy()`` is 0 (at most ``grace_s`` later), after ``flush_s`` more
    for the last answers to reach the socket. Returns the (daemon) thread doing it."""

    def wait_and_exit() -> None:
        deadline = time.monotonic() + grace_s
        while busy() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(flush_s)
        _exit(code, reason)

    thread = threading.Thread(target=wait_and_exit, name="paged-exit", daemon=True)
    thread.start()
    return thread
