"""Runs a kernel call at several torch thread counts, for the tests that results do not depend on them."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def at_thread_counts(run: Callable[[], T], *counts: int) -> list[T]:
    """``run()`` once at each thread count, in order; the session's thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(run())
        return results
    finally:
        torch.set_num_threads(threads)
