"""ServingMetrics: what a finished request emits through TorchServe's metrics cache, and when.

A fake cache records every ``add_metric`` call (each one is a log line the frontend parses)."""
from __future__ import annotations

import asyncio

from ts.metrics.metric_type_enum import MetricTypes

from paged_handler.metrics import ServingMetrics


class RecordingCache:
    def __init__(self):
        self.lines: list[tuple[str, float, MetricTypes]] = []

    def add_metric(self, name, value, unit, idx, dimensions, metric_type):
        self.lines.append((name, value, metric_type))

    def named(self, name: str) -> list[float]:
        return [value for n, value, _ in self.lines if n == name]


class IdleEngine:
    """What the periodic task reads: published stats and the number of requests in flight."""

    def __init__(self, inflight: int = 0):
        self.inflight = inflight

    def stats_snapshot(self) -> dict:
        return {"kv_usage": 0.25, "num_running": self.inflight}

    def num_inflight(self) -> int:
        return self.inflight


def test_without_a_periodic_task_a_finished_request_emits_everything_at_once():
    cache = RecordingCache()
    ServingMetrics(cache, "llm").request_finished(7, 5, 0.5, 0.02)
    assert cache.named("PagedPromptTokensTotal") == [7]
    assert cache.named("PagedGenerationTokensTotal") == [5]
    assert cache.named("PagedRequestsFinishedTotal") == [1]
    assert cache.named("PagedTimeToFirstTokenMs") == [500.0]
    assert cache.named("PagedTimeToFirstTokenMsSum") == [500.0]
    assert cache.named("PagedTimeToFirstTokenSeconds") == [0.5]
    assert cache.named("PagedTimePerOutputTokenMs") == [20.0]
    assert cache.named("PagedTimePerOutputTokenSeconds") == [0.02]


def test_requests_within_an_interval_share_one_line_per_counter_and_gauge():
    async def run() -> RecordingCache:
        cache = RecordingCache()
        metrics = ServingMetrics(cache, "llm", interval_s=0.05)
        engine = IdleEngine(inflight=3)
        metrics.touch(engine)
        for ttft in (0.1, 0.2, 0.3):
            metrics.request_finished(10, 4, ttft, 0.01)
        histograms_before_the_tick = len(cache.named("PagedTimeToFirstTokenSeconds"))
        counters_before_the_tick = cache.named("PagedPromptTokensTotal")
        engine.inflight = 0
        await asyncio.wait_for(metrics._task, 5)
        assert histograms_before_the_tick == 3 and counters_before_the_tick == []
        return cache

    cache = asyncio.run(run())
    assert cache.named("PagedPromptTokensTotal") == [30]
    assert cache.named("PagedGenerationTokensTotal") == [12]
    assert cache.named("PagedRequestsFinishedTotal") == [3]
    assert cache.named("PagedTimeToFirstTokenMsSum") == [600.0]
    assert cache.named("PagedTimeToFirstTokenMs") == [300.0]  # the latest request's
    assert cache.named("PagedTimeToFirstTokenSeconds") == [0.1, 0.2, 0.3]  # every observation
    assert cache.named("PagedKVCacheUsagePercent")[0] == 25.0


def test_a_request_finishing_after_the_task_ended_is_still_emitted():
    async def run() -> RecordingCache:
        cache = RecordingCache()
        metrics = ServingMetrics(cache, "llm", interval_s=0.01)
        metrics.touch(IdleEngine(inflight=0))
        await asyncio.wait_for(metrics._task, 5)
        metrics.request_finished(3, 2, None, None)
        return cache

    cache = asyncio.run(run())
    assert cache.named("PagedPromptTokensTotal") == [3]
    assert cache.named("PagedRequestsFinishedTotal") == [1]
    assert cache.named("PagedTimeToFirstTokenMs") == []


def test_without_a_metrics_cache_nothing_is_kept():
    metrics = ServingMetrics(None, "llm")
    metrics.request_finished(7, 5, 0.5, 0.02)
    assert metrics._counters == {} and metrics._gauges == {}
