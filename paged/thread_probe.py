"""A GEMM timed on the calling thread: the slow-thread check of docs/serving.md ("One torch thread").

Run on the engine thread after every build and reported by describe
(``engine_thread_probe``), so the effect can be seen live: on the 2-core development hosts of
docs/serving.md, 8x512 @ 512x1408 took ~70 us on a healthy thread and ~220 us on a thread of a
process whose other thread ran torch first. Imported only on the engine thread.
"""
from __future__ import annotations

import threading
import time

import torch


def gemm_probe(repeats: int = 200) -> dict:
    """The best of five timings of ``repeats / 5`` small fp32 GEMMs, in microseconds per GEMM."""
    try:
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
    except Exception as exc:  # noqa: BLE001 - a probe must never stop a build
        return {"error": repr(exc)}
