"""Engine and request metrics through TorchServe's metrics API (shown on the Prometheus endpoint).

The backend logs ``[METRICS]`` lines; the frontend turns the ones declared in the metrics config
(handler/paged_handler/metrics.yaml) into Prometheus series on the metrics port. Gauges are refreshed from the
engine's published stats by a periodic task while there is traffic, and once more when it goes
idle so they fall back to zero. Never raises: metrics must not break a request.

Each metric line costs the event loop a log write and the frontend a parse, so a finished request
emits only its histogram observations (Prometheus needs every one). Its counters are summed and its
latency gauges kept as the latest value, and the periodic task emits both once per interval, the
same totals in far fewer lines. Whatever is pending goes out at once when no task is running.
"""
from __future__ import annotations

import asyncio
import logging

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

logger = logging.getLogger(__name__)

GAUGES = {  # name -> (unit, kv_stats key, scale)
    "PagedKVCacheUsagePercent": ("Percent", "kv_usage", 100.0),
    "PagedNumRequestsRunning": ("Count", "num_running", 1.0),
    "PagedNumRequestsWaiting": ("Count", "num_waiting", 1.0),
    "PagedNumRequestsSwapped": ("Count", "num_swapped", 1.0),
    "PagedPrefixCacheHitRatePercent": ("Percent", "prefix_hit_rate", 100.0),
    "PagedPrefixCacheHitTokens": ("Count", "prefix_hits", 1.0),          # cached prompt tokens, any tier
    "PagedCpuPrefixCacheHitTokens": ("Count", "cpu_prefix_hits", 1.0),   # ... brought back from the CPU tier
    # Memory holding KV now and at most since start, on one scale for both kv_memory models
    # (paged: blocks off the free list x block bytes; virtual: committed pages x page bytes).
    "PagedResidentKVBytes": ("Bytes", "resident_kv_bytes", 1.0),
    "PagedPeakResidentKVBytes": ("Bytes", "peak_resident_kv_bytes", 1.0),
}


class ServingMetrics:
    def __init__(self, metrics_cache, model_name: str, interval_s: float = 1.0):
        self.cache = metrics_cache
        self.model_name = model_name
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None
        self.enabled = metrics_cache is not None
        self._counters: dict[str, tuple[float, str]] = {}  # name -> (sum since the last emit, unit)
        self._gauges: dict[str, tuple[float, str]] = {}    # name -> (latest value, unit)

    def _dims(self):
        return [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]

    def _emit(self, name: str, value: float, unit: str, mtype: MetricTypes) -> None:
        if not self.enabled:
            return
        try:
            self.cache.add_metric(name, value, unit, None, self._dims(), mtype)
        except Exception:  # noqa: BLE001
            logger.debug("metric %s failed", name, exc_info=True)

    # -------------------------------------------------------------- per request
    def request_finished(self, prompt_tokens: int, generated_tokens: int,
                         ttft_s: float | None, tpot_s: float | None) -> None:
        if not self.enabled:
            return
        self._count("PagedPromptTokensTotal", prompt_tokens, "Count")
        self._count("PagedGenerationTokensTotal", generated_tokens, "Count")
        self._count("PagedRequestsFinishedTotal", 1, "Count")
        if ttft_s is not None:
            self._gauges["PagedTimeToFirstTokenMs"] = (round(ttft_s * 1000, 3), "ms")
            self._count("PagedTimeToFirstTokenMsSum", ttft_s * 1000, "ms")
            self._emit("PagedTimeToFirstTokenSeconds", round(ttft_s, 6), "s", MetricTypes.HISTOGRAM)
        if tpot_s is not None:
            self._gauges["PagedTimePerOutputTokenMs"] = (round(tpot_s * 1000, 3), "ms")
            self._count("PagedTimePerOutputTokenMsSum", tpot_s * 1000, "ms")
            self._emit("PagedTimePerOutputTokenSeconds", round(tpot_s, 6), "s", MetricTypes.HISTOGRAM)
        if self._task is None or self._task.done():
            self.emit_pending()  # no periodic task would emit them

    def _count(self, name: str, value: float, unit: str) -> None:
        total, _ = self._counters.get(name, (0, unit))
        self._counters[name] = (total + value, unit)

    def emit_pending(self) -> None:
        """Emit the counters summed and the latest request gauges since the last call."""
        counters, self._counters = self._counters, {}
        gauges, self._gauges = self._gauges, {}
        for name, (total, unit) in counters.items():
            self._emit(name, round(total, 3), unit, MetricTypes.COUNTER)
        for name, (value, unit) in gauges.items():
            self._emit(name, value, unit, MetricTypes.GAUGE)

    def request_rejected(self) -> None:
        self._emit("PagedRequestsRejectedTotal", 1, "Count", MetricTypes.COUNTER)

    # -------------------------------------------------------------- engine gauges
    def emit_gauges(self, stats: dict) -> None:
        for name, (unit, key, scale) in GAUGES.items():
            value = stats.get(key)
            if value is None:
                continue
            try:
                self._emit(name, round(float(value) * scale, 4), unit, MetricTypes.GAUGE)
            except (TypeError, ValueError):
                pass

    def touch(self, engine) -> None:
        """Called on every request: make sure the periodic gauge task runs on this loop."""
        if not self.enabled:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._gauge_loop(engine))

    async def _gauge_loop(self, engine) -> None:
        idle_rounds = 0
        try:
            while idle_rounds < 3:  # a few idle rounds so gauges settle at their idle values
                await asyncio.sleep(self.interval_s)
                self.emit_gauges(engine.stats_snapshot())
                self.emit_pending()
                idle_rounds = 0 if engine.num_inflight() else idle_rounds + 1
        finally:
            self.emit_pending()
