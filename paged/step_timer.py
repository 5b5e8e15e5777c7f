"""Where a step's time goes: wall milliseconds per phase, behind ``PAGED_STEP_TIMER=1``.

Phases: schedule, prepare (flat inputs), gemm, attention, forward_other (the rest of the forward
pass), sample, outputs. The model charges its GEMMs and attention calls through ``phase()``; the
timer synchronises nothing, which is exact on CPU (every op is synchronous there). With the timer
on, the model runs eagerly so its GEMMs and attention can be timed one by one; leave it off when
measuring throughput.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

PHASES = ("schedule", "prepare", "gemm", "attention", "forward_other", "sample", "outputs")
ENV_VAR = "PAGED_STEP_TIMER"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class StepTimer:
    """Accumulates seconds per phase over steps. Disabled timers cost one attribute check."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled_by_env() if enabled is None else enabled
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.num_steps = 0
        self._nested = 0.0  # time of inner phases, subtracted from the phase that encloses them

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        outer_nested = self._nested
        self._nested = 0.0
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.totals[name] += elapsed - self._nested
            self._nested = outer_nested + elapsed

    def step_done(self) -> None:
        if self.enabled:
            self.num_steps += 1

    def report(self) -> dict:
        """Mean milliseconds per step for each phase, plus the step count."""
        steps = max(self.num_steps, 1)
        out = {name: round(1000.0 * total / steps, 3) for name, total in self.totals.items()}
        out["total"] = round(sum(out.values()), 3)
        out["num_steps"] = self.num_steps
        return out

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.num_steps = 0
