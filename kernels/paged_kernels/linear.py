"""Linear layers on CPU: oneDNN with the weight prepacked once, or ``F.linear``, chosen by measurement.

Why two paths: on some x86 hosts the GEMM behind ``F.linear`` (MKL) takes a slow generic path for
the small-M, fp32 shapes of LLM serving, while oneDNN with the weight reordered once into its
blocked layout runs the same products ~3x faster. On other hosts MKL is fast and the gap
vanishes, and some dtypes (fp16 without AVX512-FP16) have no oneDNN path at all. So nothing is
assumed: ``probe_linear_plan`` times both paths on the model's own weight shapes at a few row
counts when the model loads, and the resulting ``LinearPlan`` says, per range of rows (tokens in
the step), which path runs.

Both paths compute the same products; they differ in the order of the additions, so results
differ in the last bits (~1e-6 relative), as MKL's own M=1 and batched results do.

The packed weight is a second copy of the weight in oneDNN's layout; the dense weight stays for
the ``F.linear`` rows, ``state_dict`` and tied embeddings.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("onednn", "torch")
# Row counts the probe times. Each covers the rows up to the geometric mean with the next one.
PROBE_ROWS = (1, 8, 64, 256)
# oneDNN must beat F.linear by this factor to be chosen: on a tie F.linear is kept (it is the
# op HF's reference runs, so ties keep results identical to the reference).
ONEDNN_MIN_SPEEDUP = 1.1
# The probe trims tall weights (LM heads) to this many multiply-adds per call at the largest
# row count, so it stays well under a second on big checkpoints too.
PROBE_MAX_MACS = 1 << 29
# On a machine busy with other work every call can take milliseconds: past this budget the probe
# stops, and the row counts it did not reach take the decision of the largest one it did.
PROBE_BUDGET_S = 2.0


def onednn_unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why oneDNN's prepacked linear cannot run ``dtype`` on this host, or None if it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    ops = torch.ops.mkldnn
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(ops, name):
            return f"torch.ops.mkldnn.{name} is missing from this torch build"
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        return None if ops._is_mkldnn_bf16_supported() else "this CPU has no oneDNN bf16 support"
    if dtype == torch.float16:
        return None if ops._is_mkldnn_fp16_supported() else "this CPU has no oneDNN fp16 support"
    return f"oneDNN linear does not take {dtype}"


def pack_weight(weight: torch.Tensor, rows_hint: int | None = None) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``packed = pack_weight(W)``; x is [rows, in]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_linear_add(x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``residual + x @ W.T + bias`` in one oneDNN call (the add is a post-op of the GEMM)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


def bucket_limits(rows: tuple[int, ...]) -> tuple[int, ...]:
    """Upper row limit of each probed row count's bucket: the geometric mean with the next one."""
    return tuple(int(math.sqrt(a * b)) for a, b in zip(rows, rows[1:])) + (math.inf,)


@dataclass(frozen=True)
class LinearPlan:
    """Which path each number of rows takes; ``onednn[i]`` covers rows up to ``limits[i]``."""
    dtype: torch.dtype
    limits: tuple = (math.inf,)
    onednn: tuple = (False,)
    source: str = "forced"  # "probe" or "forced"

    @classmethod
    def everywhere(cls, backend: str, dtype: torch.dtype) -> "LinearPlan":
        return cls(dtype=dtype, onednn=(backend == "onednn",))

    def use_onednn(self, rows: int) -> bool:
        for limit, onednn in zip(self.limits, self.onednn):
            if rows <= limit:
                return onednn
        return self.onednn[-1]

    @property
    def any_onednn(self) -> bool:
        return any(self.onednn)

    def describe(self) -> str:
        """'onednn', 'torch', or the row ranges of each when both are used."""
        if all(self.onednn):
            return "onednn"
        if not self.any_onednn:
            return "torch"
        parts, low = [], 1
        for i, (limit, onednn) in enumerate(zip(self.limits, self.onednn)):
            if i + 1 < len(self.onednn) and self.onednn[i + 1] == onednn:
                continue  # the next bucket takes the same path: one range
            high = "" if limit == math.inf else str(limit)
            parts.append(f"{'onednn' if onednn else 'torch'} for rows {low}-{high}")
            low = limit + 1
        return "; ".join(parts)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) that runs through a ``LinearPlan``.

    Until ``apply_plan`` is called, and for rows the plan gives to torch, it is plain ``F.linear``.
    Input: [rows, in_features].
    """

    plan: LinearPlan | None = None
    packed: torch.Tensor | None = None

    def apply_plan(self, plan: LinearPlan) -> None:
        self.plan = plan
        self.packed = pack_weight(self.weight, PROBE_ROWS[-1]) if plan.any_onednn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.plan.use_onednn(x.shape[0]):
            return onednn_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


@dataclass
class ProbeResult:
    plan: LinearPlan
    figures: dict = field(default_factory=dict)


def best_of_interleaved(calls, repeats: int) -> list[float]:
    """Minimum seconds of each call over ``repeats`` rounds that run them in turn, after one
    untimed call each (a new shape's first call builds its kernels)."""
    for call in calls:
        call()
    best = [math.inf] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _time_pair(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(F.linear, oneDNN) seconds for ``x``."""
    torch_s, onednn_s = best_of_interleaved([lambda: F.linear(x, weight), lambda: onednn_linear(x, packed, None)],
                                            repeats)
    return torch_s, onednn_s


def probe_linear_plan(weights: list[tuple[torch.Tensor, int]], dtype: torch.dtype,
                      rows: tuple[int, ...] = PROBE_ROWS, repeats: int = 5) -> ProbeResult:
    """Time F.linear against prepacked oneDNN on ``weights`` and decide per row bucket.

    ``weights``: (weight [out, in], calls per step) for each distinct shape of the model; a
    bucket's cost is the calls-weighted sum over shapes. Tall weights are trimmed to
    ``PROBE_MAX_MACS`` and their time scaled back up. Calls of the two paths are interleaved and
    the minimum of ``repeats`` is kept, so a noisy neighbour rarely flips the decision; oneDNN
    must win by ``ONEDNN_MIN_SPEEDUP``. Run it on the thread that will run the model (GEMM speed
    depends on which thread owns the OpenMP pool). It never raises for a missing or failing
    oneDNN: the plan is then torch everywhere and the reason is logged and recorded.
    """
    start = time.perf_counter()
    figures: dict = {"dtype": str(dtype).removeprefix("torch."), "rows": list(rows),
                     "threads": torch.get_num_threads(), "shapes": [list(w.shape) for w, _ in weights]}
    reason = onednn_unavailable_reason(dtype)
    if reason is None:
        try:
            plan = _timed_probe(weights, dtype, rows, repeats, figures)
            figures["probe_s"] = round(time.perf_counter() - start, 3)
            return ProbeResult(plan, figures)
        except RuntimeError as exc:  # e.g. a oneDNN primitive this CPU cannot build
            reason = f"oneDNN linear failed: {exc}"
    logger.warning("linear layers use F.linear: %s", reason)
    figures.update(reason=reason, chosen=["torch"] * len(rows), probe_s=round(time.perf_counter() - start, 3))
    return ProbeResult(LinearPlan.everywhere("torch", dtype), figures)


def _timed_probe(weights, dtype, rows, repeats, figures) -> LinearPlan:
    max_rows = max(rows)
    cases = []
    for weight, calls in weights:
        out_features, in_features = weight.shape
        keep = min(out_features, max(64, PROBE_MAX_MACS // (max_rows * in_features) // 64 * 64))
        w = weight.detach()[:keep].contiguous()
        cases.append((w, pack_weight(w, max_rows), calls * out_features / keep))
    generator = torch.Generator().manual_seed(0)
    torch_s, onednn_s = [], []
    deadline = time.perf_counter() + PROBE_BUDGET_S
    with torch.inference_mode():
        for m in rows:
            cost = _step_cost(cases, m, dtype, repeats, generator, deadline if torch_s else math.inf)
            if cost is None:
                figures["unmeasured_rows"] = list(rows[len(torch_s):])
                break
            torch_s.append(cost[0])
            onednn_s.append(cost[1])
    onednn = [t > o * ONEDNN_MIN_SPEEDUP for t, o in zip(torch_s, onednn_s)]
    onednn = tuple(onednn + onednn[-1:] * (len(rows) - len(onednn)))
    figures.update(torch_us_per_step=[round(s * 1e6, 1) for s in torch_s],
                   onednn_us_per_step=[round(s * 1e6, 1) for s in onednn_s],
                   chosen=["onednn" if use else "torch" for use in onednn])
    return LinearPlan(dtype=dtype, limits=bucket_limits(rows), onednn=onednn, source="probe")


def _step_cost(cases, rows: int, dtype, repeats: int, generator, deadline: float) -> tuple[float, float] | None:
    """Calls-weighted seconds per step of each path at ``rows`` rows; None once past ``deadline``."""
    torch_total = onednn_total = 0.0
    for weight, packed, scale in cases:
        if time.perf_counter() > deadline:
            return None
        x = torch.randn(rows, weight.shape[1], generator=generator).to(dtype)
        torch_s, onednn_s = _time_pair(x, weight, packed, repeats)
        torch_total += torch_s * scale
        onednn_total += onednn_s * scale
    return torch_total, onednn_total
