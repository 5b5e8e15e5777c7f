"""Linear layers on CPU: three GEMM paths for each weight, chosen per range of rows by measurement.

- ``packed``: our compiled kernel (``torch.ops.paged_cpu.packed_linear``,
  kernels/paged_kernels/csrc/packed_linear_cpu.cpp) on a copy of the weight packed once into panels
  of 32 output columns that it streams linearly, with AMX tiles, AVX512_BF16 dot products or FMAs
  (fp32 sums). It is built for the few rows of decode, where a step's time is the time to read
  the weights from DRAM; it also runs int8 weights.
- ``onednn``: oneDNN with the weight reordered once into its blocked layout; the fast path for
  many rows (prefill), where the arithmetic, not the weight stream, is the limit.
- ``torch``: ``F.linear`` (MKL or oneDNN as torch picks), on the dense weight.

Nothing is assumed about the host: ``probe_linear_plan`` times the paths on the model's own weight
shapes at a few row counts when the model loads, and the resulting ``LinearPlan`` says, per range
of rows (tokens in the step), which path runs. All paths compute the same products and differ in
the order of the additions, so results differ in the last bits (~1e-6 relative in fp32).

Weight-only int8 (``quantization="int8"``): each output channel's weights are rounded to int8
with a symmetric scale (absmax / 127), so a step streams half the bytes of bf16; activations and
sums stay in the model's dtype / fp32. The int8 paths: ``packed`` (the same kernel, widening the
int8 weights in registers), ``torch_int8`` (``torch.ops.aten._weight_int8pack_mm``) and
``dequant`` (int8 widened to the model's dtype in slices, then ``F.linear``: for many rows).

The packed copies are extra copies; the dense weight stays for ``state_dict``, tied embeddings
and the ``torch`` path.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from paged_kernels import cpu_extension

logger = logging.getLogger(__name__)

# Paths a float weight can take, and those of an int8 one.
FLOAT_PATHS = ("packed", "onednn", "torch")
INT8_PATHS = ("packed", "torch_int8", "dequant")
# What linear_backend may force (None: the probe decides).
BACKENDS = FLOAT_PATHS
QUANTIZATIONS = (None, "int8")
# Row counts the probe times. Each covers the rows up to the geometric mean with the next one.
PROBE_ROWS = (1, 4, 16, 64, 256)
# In fp32 a path must beat F.linear by this factor to be chosen over it: on a tie F.linear is kept
# (it is the op HF's reference runs, so ties keep results identical to the reference). bf16 has no
# such contract (outputs are held to a closeness rule), so there the fastest path runs: with the
# margin, a noisy probe once kept F.linear for SmolLM2's bf16 steps of 129+ rows, where it is ~20%
# slower than the packed kernel on weights that are not in cache, and the engine lost a quarter of
# its throughput on those steps.
MIN_SPEEDUP_OVER_TORCH = 1.1
# The probe trims tall weights (LM heads) to this many multiply-adds per call at the largest
# row count, so it stays well under a second on big checkpoints too.
PROBE_MAX_MACS = 1 << 29
# On a machine busy with other work every call can take milliseconds: past this budget the probe
# stops, and the row counts it did not reach take the decision of the largest one it did.
PROBE_BUDGET_S = 3.0
# The clock of that budget (a test gives the probe its own).
probe_clock = time.perf_counter
# The packed layout (csrc/packed_linear_cpu.cpp): panels of 32 output columns; in the pair layouts
# (bf16, int8) K is padded to a multiple of 32.
PANEL = 32
K_CHUNK = 32
# torch 2.13's bf16 _weight_int8pack_mm crashes (segfault) when in_features is not a multiple of 16
# (33, 40 and 513 did, 32, 48 and 512 did not): the torch_int8 path takes only such weights.
TORCH_INT8_K_MULTIPLE = 16
# The dequant path widens this many output rows of an int8 weight at a time (bounded scratch).
DEQUANT_ROWS = 4096


# ---- availability -------------------------------------------------------------------------------

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


def packed_unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why the packed kernel cannot run ``dtype`` rows here, or None if it can."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the packed kernel takes float32 or bfloat16 rows, not {dtype}"
    if cpu_extension.load() is None:
        return "the compiled CPU kernels are unavailable (see the log)"
    return None


def path_unavailable_reason(path: str, dtype: torch.dtype, quantization: str | None = None) -> str | None:
    """Why ``path`` cannot run ``dtype`` rows (with ``quantization``) here, or None if it can."""
    if path not in (INT8_PATHS if quantization == "int8" else FLOAT_PATHS):
        return f"{path!r} is not a path for {'int8' if quantization else 'float'} weights"
    if path == "packed":
        return packed_unavailable_reason(dtype)
    if path == "onednn":
        return onednn_unavailable_reason(dtype)
    if path == "torch_int8" and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "torch.ops.aten._weight_int8pack_mm is missing from this torch build"
    return None


def packed_isa() -> str | None:
    """The instruction paths of the packed kernel here ("amx,avx512_bf16,fma", ...), or None."""
    ops = cpu_extension.load()
    return None if ops is None else ops.packed_linear_isa()


# ---- oneDNN -------------------------------------------------------------------------------------

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


# ---- int8 ---------------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales fp32 [out]) with ``weight ~= q * scales[:, None]``: symmetric per
    output channel, scale = max |w| / 127 (1 for an all-zero row), q = round(w / scale)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def torch_int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's weight-only int8 GEMM; ``scales`` in x's dtype."""
    if q.shape[1] % TORCH_INT8_K_MULTIPLE:
        raise ValueError(f"torch's int8 GEMM needs in_features divisible by {TORCH_INT8_K_MULTIPLE}, got {q.shape[1]}")
    out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scales)
    return out if bias is None else out + bias


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on the int8 weight widened to x's dtype (exact) DEQUANT_ROWS rows at a time,
    each output column then scaled; ``scales`` fp32."""
    rows = q.shape[0]
    if rows <= DEQUANT_ROWS:
        out = F.linear(x, q.to(x.dtype)).mul_(scales.to(x.dtype))
    else:
        out = torch.empty(x.shape[0], rows, dtype=x.dtype)
        for start in range(0, rows, DEQUANT_ROWS):
            part = slice(start, start + DEQUANT_ROWS)
            out[:, part] = F.linear(x, q[part].to(x.dtype)).mul_(scales[part].to(x.dtype))
    return out if bias is None else out.add_(bias)


# ---- the packed kernel --------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedWeight:
    """A weight in the packed kernel's layout (csrc/packed_linear_cpu.cpp) and what goes with it:
    bias and int8 scales as fp32 in packed column order; ``out_features`` the output width
    (half the weight's rows with ``silu_and_mul``)."""
    data: torch.Tensor
    out_features: int
    bias: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    silu_and_mul: bool = False


def packed_column_order(out_features: int, silu_and_mul: bool = False) -> torch.Tensor:
    """For each packed column, the weight row it holds (-1: padding). With ``silu_and_mul`` the
    weight is a fused [gate; up] one and panel p holds gate rows [16p, 16p + 16) and the same up rows."""
    if not silu_and_mul:
        order = torch.arange(math.ceil(out_features / PANEL) * PANEL)
        return torch.where(order < out_features, order, -1)
    if out_features % 2:
        raise ValueError(f"silu_and_mul needs a fused [gate; up] weight of even height, got {out_features} rows")
    half = out_features // 2
    gate = torch.arange(math.ceil(half / 16) * 16).view(-1, 16)
    order = torch.stack([gate, gate + half], dim=1).reshape(-1)
    return torch.where(gate.repeat_interleave(2, dim=0).reshape(-1) < half, order, -1)


def pack_for_kernel(weight: torch.Tensor, bias: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                    silu_and_mul: bool = False) -> PackedWeight:
    """``weight`` [out, in] (fp32, bf16, or int8 with its ``scales``) in the packed layout."""
    out_features, in_features = weight.shape
    order = packed_column_order(out_features, silu_and_mul)
    valid = order >= 0
    rows = weight.detach()[order.clamp(min=0)] * valid[:, None].to(weight.dtype)
    panels = rows.shape[0] // PANEL

    def in_packed_order(vector: torch.Tensor | None) -> torch.Tensor | None:
        if vector is None:
            return None
        return torch.where(valid, vector.detach().float()[order.clamp(min=0)], 0.0).contiguous()

    if weight.dtype == torch.float32:
        data = rows.view(panels, PANEL, in_features).permute(0, 2, 1).contiguous()
    else:
        padded = math.ceil(in_features / K_CHUNK) * K_CHUNK
        rows = F.pad(rows, (0, padded - in_features))
        data = rows.view(panels, PANEL, padded // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(data, out_features // 2 if silu_and_mul else out_features, in_packed_order(bias),
                        in_packed_order(scales), silu_and_mul)


def packed_linear(x: torch.Tensor, packed: PackedWeight, isa: str = "auto") -> torch.Tensor:
    """``x @ W.T + bias`` (then SiLU(gate) * up for a ``silu_and_mul`` weight) by the packed kernel.
    ``isa``: "auto" (the fastest here), or force "amx", "avx512_bf16" or "fma" (see ``packed_isa``)."""
    return cpu_extension.load().packed_linear(x, packed.data, packed.out_features, packed.bias, packed.scales,
                                              packed.silu_and_mul, isa)


def packed_linear_into(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor) -> torch.Tensor:
    """``packed_linear`` written into ``out`` [rows, out_features] (memory the caller reuses), which
    it returns. Not for a ``silu_and_mul`` weight."""
    cpu_extension.load().packed_linear_out(x, packed.data, packed.out_features, packed.bias, packed.scales, False,
                                           "auto", out)
    return out


# ---- the plan -----------------------------------------------------------------------------------

def bucket_limits(rows: tuple[int, ...]) -> tuple[int, ...]:
    """Upper row limit of each probed row count's bucket: the geometric mean with the next one."""
    return tuple(int(math.sqrt(a * b)) for a, b in zip(rows, rows[1:])) + (math.inf,)


@dataclass(frozen=True)
class LinearPlan:
    """Which path each number of rows takes; ``paths[i]`` covers rows up to ``limits[i]``.
    ``quantization``: None (the model's dtype) or "int8" (weight-only, see the module docstring)."""
    dtype: torch.dtype
    limits: tuple = (math.inf,)
    paths: tuple = ("torch",)
    source: str = "forced"  # "probe" or "forced"
    quantization: str | None = None

    def __post_init__(self):
        allowed = INT8_PATHS if self.quantization == "int8" else FLOAT_PATHS
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if len(self.paths) != len(self.limits) or not set(self.paths) <= set(allowed):
            raise ValueError(f"a plan needs one path of {allowed} per row limit, got {self.paths} for {self.limits}")

    @classmethod
    def everywhere(cls, path: str, dtype: torch.dtype, quantization: str | None = None) -> "LinearPlan":
        return cls(dtype=dtype, paths=(path,), quantization=quantization)

    def bucket(self, rows: int) -> int:
        """Index of the row range that ``rows`` falls in (all rows of one range take one path)."""
        for index, limit in enumerate(self.limits):
            if rows <= limit:
                return index
        return len(self.limits) - 1

    def path_for(self, rows: int) -> str:
        return self.paths[self.bucket(rows)]

    def uses(self, path: str) -> bool:
        return path in self.paths

    def describe(self) -> str:
        """'onednn', 'packed', ..., or the row ranges of each: 'packed for rows 1-32; onednn for
        rows 33-'; int8 plans start with 'int8 '."""
        prefix = "int8 " if self.quantization else ""
        if len(set(self.paths)) == 1:
            return prefix + self.paths[0]
        parts, low = [], 1
        for i, (limit, path) in enumerate(zip(self.limits, self.paths)):
            if i + 1 < len(self.paths) and self.paths[i + 1] == path:
                continue  # the next bucket takes the same path: one range
            high = "" if limit == math.inf else str(limit)
            parts.append(f"{path} for rows {low}-{high}")
            low = limit + 1
        return prefix + "; ".join(parts)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) that runs through a ``LinearPlan``.

    Until ``apply_plan`` is called, and for rows the plan gives to torch, it is plain ``F.linear``.
    Input: [rows, in_features]. ``fuse_silu_and_mul`` (set before ``apply_plan``, for a fused
    [gate; up] projection): the packed copy computes SiLU(gate) * up in its epilogue
    (``silu_and_mul``), for the rows the plan gives it; other rows take the plain GEMM.
    """

    plan: LinearPlan | None = None
    onednn_weight: torch.Tensor | None = None
    packed: PackedWeight | None = None
    # (q [out, in], fp32 scales [out], scales in the model's dtype) for the torch_int8 / dequant paths
    int8: tuple | None = None
    fuse_silu_and_mul: bool = False
    # Plan buckets (indices) whose rows ``forward_into`` gives the packed kernel although the plan
    # gives them another path: measured by ``probe_forward_into``, cleared by a new plan.
    into_packed_buckets: frozenset = frozenset()

    def apply_plan(self, plan: LinearPlan) -> None:
        """Prepare what the plan's paths read: the packed copies, the int8 weight."""
        self.plan = plan
        self.into_packed_buckets = frozenset()
        weight, bias = self.weight.detach(), self.bias
        self.int8 = self.packed = self.onednn_weight = None
        if plan.quantization == "int8":
            q, scales = quantize_int8(weight)
            if plan.uses("torch_int8") or plan.uses("dequant"):
                self.int8 = (q, scales, scales.to(plan.dtype))
            if plan.uses("packed"):
                self.packed = pack_for_kernel(q, bias, scales, silu_and_mul=self.fuse_silu_and_mul)
            return
        if plan.uses("onednn"):
            self.onednn_weight = pack_weight(weight, PROBE_ROWS[-1])
        if plan.uses("packed"):
            self.packed = pack_for_kernel(weight, bias, silu_and_mul=self.fuse_silu_and_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bind(x.shape[0])(x)

    def bind(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for inputs of ``rows`` rows as one function of x, the path already chosen. A
        model binds its Linears once per row range, so a step pays no per-call choice. The function
        reads the layer's weights when called: it stays right when they move (``move_to_huge_pages``)
        but not when the plan changes (bind again then)."""
        path = "torch" if self.plan is None else self.plan.path_for(rows)
        if path == "packed":
            if self.packed.silu_and_mul:
                raise ValueError("this layer is packed to compute SiLU(gate) * up: bind_silu_and_mul")
            return self._packed_kernel()
        if path == "onednn":
            return lambda x: onednn_linear(x, self.onednn_weight, self.bias)
        if path == "torch_int8":
            return lambda x: torch_int8_linear(x, self.int8[0], self.int8[2], self.bias)
        if path == "dequant":
            return lambda x: dequant_linear(x, self.int8[0], self.int8[1], self.bias)
        return lambda x: F.linear(x, self.weight, self.bias)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``self(x)`` written into ``out`` [rows, out_features] (x's dtype, contiguous rows), which
        it returns: memory the caller reuses from call to call. The packed kernel writes there
        directly; the other paths compute as ``forward`` and copy (same values)."""
        rows = x.shape[0]
        if self._into_packed(rows):
            return packed_linear_into(x, self.packed, out)
        return out.copy_(self.bind(rows)(x))

    def _can_write_in_place(self) -> bool:
        return self.plan is not None and self.packed is not None and not self.packed.silu_and_mul

    def _into_packed(self, rows: int) -> bool:
        if not self._can_write_in_place():
            return False
        return self.plan.path_for(rows) == "packed" or self.plan.bucket(rows) in self.into_packed_buckets

    def probe_forward_into(self, max_rows: int, repeats: int = 2) -> dict:
        """Decide, by timing, which row buckets ``forward_into`` runs on the packed kernel where the
        plan gives their rows another path; returns the figures (empty: nothing to decide).

        The plan's probe times every shape on trimmed weights with fresh outputs. ``forward_into``
        differs: the packed kernel writes into the caller's memory, where the other paths allocate
        rows x out_features and copy it there. At an LM head's width that output is 10-100+ MB, a
        fresh mapping whose pages fault in on every call, which the trimmed probe never sees. So
        each such bucket is timed here at its largest row count up to ``max_rows`` (the most rows
        the caller writes at once), on this weight whole, both ways into one kept output."""
        if not self._can_write_in_place() or max_rows < 1:
            return {}
        figures, chosen, low = {}, set(), 1
        for index, (limit, path) in enumerate(zip(self.plan.limits, self.plan.paths)):
            if low > max_rows:
                break
            rows = int(min(limit, max_rows))
            low = rows + 1
            if path == "packed":
                continue
            generator = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, self.in_features, generator=generator).to(self.plan.dtype)
            out = torch.zeros(rows, self.packed.out_features, dtype=x.dtype)
            run_path = self.bind(rows)
            with torch.inference_mode():
                packed_s, other_s = best_of_interleaved([lambda: packed_linear_into(x, self.packed, out),
                                                         lambda: out.copy_(run_path(x))], repeats)
            figures[rows] = {"packed_us": round(packed_s * 1e6, 1), f"{path}_then_copy_us": round(other_s * 1e6, 1)}
            if packed_s < other_s:
                chosen.add(index)
        self.into_packed_buckets = frozenset(chosen)
        return {"rows": figures, "packed_rows": [rows for rows in figures if self.plan.bucket(rows) in chosen]}

    def fuses_silu_and_mul(self, rows: int) -> bool:
        """Whether ``silu_and_mul`` runs for ``rows`` rows: the plan gives them to the packed
        kernel and the layer was packed with ``fuse_silu_and_mul``."""
        return self.packed is not None and self.packed.silu_and_mul and self.plan.path_for(rows) == "packed"

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of this fused [gate; up] projection in one packed-kernel call (where
        ``fuses_silu_and_mul``; elsewhere the caller runs the GEMM, then its SiLU·up op)."""
        return self.bind_silu_and_mul(x.shape[0])(x)

    def bind_silu_and_mul(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``silu_and_mul`` for inputs of ``rows`` rows as one function of x (see ``bind``)."""
        if not self.fuses_silu_and_mul(rows):
            raise ValueError(f"this layer does not fuse SiLU(gate) * up for {rows} rows")
        return self._packed_kernel()

    def _packed_kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        run = cpu_extension.load().packed_linear.default  # the overload itself: no per-call overload lookup

        def packed(x: torch.Tensor) -> torch.Tensor:
            weight = self.packed
            return run(x, weight.data, weight.out_features, weight.bias, weight.scales, weight.silu_and_mul, "auto")
        return packed


def bind_linear(module: nn.Module, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module(x)`` for inputs of ``rows`` rows as one function of x: ``module.bind(rows)`` where
    the module has it (``Linear``, a tensor-parallel wrapper), else the module itself."""
    bind = getattr(module, "bind", None)
    return module if bind is None else bind(rows)


# ---- the probe ----------------------------------------------------------------------------------

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


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a [rows, 2 * intermediate] GEMM output: the compiled dense kernel where
    it loads (what a model runs after a GEMM that did not fuse it), else torch ops."""
    ops = cpu_extension.load() if gate_up.device.type == "cpu" else None
    if ops is not None:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def path_runners(weight: torch.Tensor, paths: tuple[str, ...], quantization: str | None = None,
                 max_rows: int = PROBE_ROWS[-1], bias: torch.Tensor | None = None,
                 silu_and_mul_after: bool = False) -> dict:
    """For each path, a function of x that runs ``weight`` (and ``bias``) on it the way Linear
    would; the packing and quantizing happen here, once. ``silu_and_mul_after``: ``weight`` is a
    fused [gate; up] projection and each runner also computes SiLU(gate) * up, as the model does:
    the packed kernel in its epilogue, the other paths by a pass of ``silu_and_mul`` after them."""
    gemms = {}
    fused = silu_and_mul_after and weight.shape[0] % 2 == 0
    if quantization == "int8":
        q, scales = quantize_int8(weight)
        low = scales.to(weight.dtype)
        for path in paths:
            if path == "packed":
                packed = pack_for_kernel(q, bias, scales, silu_and_mul=fused)
                gemms[path] = lambda x, p=packed: packed_linear(x, p)
            elif path == "torch_int8":
                gemms[path] = lambda x: torch_int8_linear(x, q, low, bias)
            else:
                gemms[path] = lambda x: dequant_linear(x, q, scales, bias)
    else:
        for path in paths:
            if path == "packed":
                packed = pack_for_kernel(weight, bias, silu_and_mul=fused)
                gemms[path] = lambda x, p=packed: packed_linear(x, p)
            elif path == "onednn":
                reordered = pack_weight(weight, max_rows)
                gemms[path] = lambda x, p=reordered: onednn_linear(x, p, bias)
            else:
                gemms[path] = lambda x: F.linear(x, weight, bias)
    if not fused:
        return gemms
    return {path: gemm if path == "packed" else (lambda x, g=gemm: silu_and_mul(g(x))) for path, gemm in gemms.items()}


def _time_paths(x: torch.Tensor, runners: dict, repeats: int) -> dict:
    """Seconds per call of each runner on ``x`` (best of interleaved rounds)."""
    names = list(runners)
    return dict(zip(names, best_of_interleaved([lambda f=runners[n]: f(x) for n in names], repeats)))


def probe_linear_plan(weights: list[tuple[torch.Tensor, int]], dtype: torch.dtype,
                      rows: tuple[int, ...] = PROBE_ROWS, repeats: int = 5,
                      quantization: str | None = None) -> ProbeResult:
    """Time the available paths on ``weights`` and decide per row bucket.

    ``weights``: (weight [out, in], calls per step[, silu_and_mul]) for each distinct shape of the
    model, the optional third item True for a fused [gate; up] projection whose SiLU(gate) * up the
    model computes from it (timed with it: see ``path_runners``); a bucket's cost is the
    calls-weighted sum over shapes. Tall weights are trimmed to
    ``PROBE_MAX_MACS`` and their time scaled back up. Calls of the paths are interleaved and the
    minimum of ``repeats`` is kept, so a noisy neighbour rarely flips the decision; for float
    weights a path must beat F.linear by ``MIN_SPEEDUP_OVER_TORCH``. Run it on the thread that
    will run the model (GEMM speed depends on which thread owns the OpenMP pool). It never raises
    for a missing or failing path: the others are timed and the reason is recorded; with none
    left, float weights run F.linear and int8 weights the dequant path.
    """
    start = time.perf_counter()
    candidates = INT8_PATHS if quantization == "int8" else FLOAT_PATHS
    fallback = "dequant" if quantization == "int8" else "torch"
    figures: dict = {"dtype": str(dtype).removeprefix("torch."), "quantization": quantization, "rows": list(rows),
                     "threads": torch.get_num_threads(), "shapes": [list(w.shape) for w, *_ in weights]}
    unavailable = {p: r for p in candidates if (r := path_unavailable_reason(p, dtype, quantization)) is not None}
    if "torch_int8" in candidates and any(w.shape[1] % TORCH_INT8_K_MULTIPLE for w, *_ in weights):
        unavailable["torch_int8"] = f"in_features not all divisible by {TORCH_INT8_K_MULTIPLE}"
    paths = tuple(p for p in candidates if p not in unavailable)
    if "packed" in paths:
        figures["packed_isa"] = packed_isa()
    for _ in range(len(paths)):
        if len(paths) <= 1:
            break
        try:
            plan = _timed_probe(weights, dtype, rows, repeats, paths, quantization, figures)
            figures["unavailable"] = unavailable
            figures["probe_s"] = round(time.perf_counter() - start, 3)
            return ProbeResult(plan, figures)
        except RuntimeError as exc:  # e.g. a oneDNN primitive this CPU cannot build: drop the failing path
            failed = _failing_path(exc, paths, weights[0][0], quantization)
            unavailable[failed] = f"{failed} failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
            paths = tuple(p for p in paths if p != failed)
    chosen = paths[0] if paths else fallback
    if unavailable:
        logger.warning("linear layers use %s: %s", chosen, "; ".join(f"{p}: {r}" for p, r in unavailable.items()))
    figures.update(unavailable=unavailable, chosen=[chosen] * len(rows), probe_s=round(time.perf_counter() - start, 3))
    return ProbeResult(LinearPlan.everywhere(chosen, dtype, quantization), figures)


def _failing_path(exc: RuntimeError, paths: tuple[str, ...], weight: torch.Tensor, quantization) -> str:
    """Which of ``paths`` raises on a small call (the one ``exc`` came from)."""
    small = weight.detach()[:PANEL].contiguous()
    for path in paths:
        try:
            path_runners(small, (path,), quantization, 1)[path](torch.zeros(1, small.shape[1], dtype=small.dtype))
        except RuntimeError:
            return path
    return paths[0]


def _timed_probe(weights, dtype, rows, repeats, paths, quantization, figures) -> LinearPlan:
    max_rows = max(rows)
    cases = []
    for weight, calls, *fused in weights:
        out_features, in_features = weight.shape
        keep = min(out_features, max(64, PROBE_MAX_MACS // (max_rows * in_features) // 64 * 64))
        w = weight.detach()[:keep].contiguous()
        runners = path_runners(w, paths, quantization, max_rows, silu_and_mul_after=bool(fused and fused[0]))
        cases.append((runners, in_features, calls * out_features / keep))
    generator = torch.Generator().manual_seed(0)
    # The smallest and the largest row counts first: if the budget runs out, the ones between take
    # the decision of the nearest measured one, and decode and prefill sizes are both measured.
    order = sorted(range(len(rows)), key=lambda i: (i not in (0, len(rows) - 1), i))
    measured: dict[int, dict[str, float]] = {}
    deadline = probe_clock() + PROBE_BUDGET_S
    with torch.inference_mode():
        for i in order:
            cost = _step_cost(cases, rows[i], dtype, repeats, generator, deadline if measured else math.inf)
            if cost is None:
                figures["unmeasured_rows"] = [r for j, r in enumerate(rows) if j not in measured]
                break
            measured[i] = cost

    def nearest(i: int) -> int:
        return min(measured, key=lambda j: (abs(math.log(rows[i] / rows[j])), j))

    chosen = [_fastest(measured[nearest(i)], quantization, dtype) for i in range(len(rows))]
    figures.update(us_per_step={p: [round(measured[i][p] * 1e6, 1) if i in measured else None
                                    for i in range(len(rows))] for p in paths}, chosen=chosen)
    return LinearPlan(dtype=dtype, limits=bucket_limits(rows), paths=tuple(chosen), source="probe",
                      quantization=quantization)


def _fastest(seconds: dict[str, float], quantization, dtype: torch.dtype) -> str:
    best = min(seconds, key=seconds.get)
    keeps_reference = quantization is None and dtype == torch.float32
    if keeps_reference and "torch" in seconds and seconds["torch"] <= seconds[best] * MIN_SPEEDUP_OVER_TORCH:
        return "torch"
    return best


def _step_cost(cases, rows: int, dtype, repeats: int, generator, deadline: float) -> dict | None:
    """Calls-weighted seconds per step of each path at ``rows`` rows; None once past ``deadline``."""
    total: dict[str, float] = {}
    for runners, in_features, scale in cases:
        if probe_clock() > deadline:
            return None
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        for path, seconds in _time_paths(x, runners, repeats).items():
            total[path] = total.get(path, 0.0) + seconds * scale
    return total
