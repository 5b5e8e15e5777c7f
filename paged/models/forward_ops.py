"""The ops a decoder layer calls: GEMMs, paged attention, and the dense rest between them.

A layer is norm -> GEMM -> RoPE -> attention -> GEMM -> add+norm -> GEMM -> SiLU*up -> GEMM (its
output is added by the next layer's add+norm). The GEMMs (``paged_kernels.linear.Linear``) and
attention (``paged_kernels``) are opaque calls; the dense parts are small pure functions here that run
eagerly or as torch.compile'd regions (inductor fuses each into one C++ kernel). A compiled
region is traced with the token dimension unbacked, so one graph serves every step size, without
padding and without a recompile. A compiled call costs ~10-20 us more than the few eager ops it
replaces, so it only pays on enough tokens: ``compile_dense_ops`` compiles and warms the regions
when the model loads, then times each against its eager ops at a few token counts and keeps the
compiled one only where it wins (``DensePlan``).

The model binds its layers to the ops of a row range once (``DensePlan.ops_for(num_tokens)``, or
``TimedOps``: all eager, charging GEMMs and attention to a ``StepTimer``, when a timer is on) and
reuses the bound layers for every step in that range.
"""
from __future__ import annotations

import logging
import math
import threading
import time

import torch
import torch.nn.functional as F

import paged_kernels
from paged_kernels import cpu_extension
from paged_kernels.linear import best_of_interleaved, bucket_limits

logger = logging.getLogger(__name__)


# ---- the reference: HF's arithmetic in torch ops (also what a compiled region traces) ----------

def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in fp32, scale by the weight in the input dtype."""
    if x.dtype == torch.float32:  # one fused op, same arithmetic as below
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def torch_add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(residual + x), residual + x): the residual stream and the next layer's input.
    ``x`` None (the first layer): (rms_norm(residual), residual)."""
    if x is not None:
        residual = residual + x
    return torch_rms_norm(residual, weight, eps), residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def torch_rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int):
    """Split the fused qkv projection [tokens, (H + 2 KVH) * D] into q [tokens, H, D], k and v
    [tokens, KVH, D], with rotate-half RoPE applied to q and k (one pass over both)."""
    num_tokens = qkv.shape[0]
    kv_size = num_kv_heads * head_dim
    qk, v = qkv.split([num_heads * head_dim + kv_size, kv_size], dim=-1)
    qk = qk.reshape(num_tokens, num_heads + num_kv_heads, head_dim)
    qk = qk * cos + rotate_half(qk) * sin
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    return q, k, v.reshape(num_tokens, num_kv_heads, head_dim)


def torch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for the fused gate_up projection [tokens, 2 * intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- what the model calls: the compiled CPU kernels where they apply, else the reference ---------

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_kernels(x: torch.Tensor):
    """``torch.ops.paged_cpu`` if its dense kernels take ``x`` (a CPU tensor of a dtype they
    support, outside autograd) and the library is loaded, else None: the caller runs the reference.
    The kernels compute what the reference computes and round where it rounds (see
    kernels/paged_kernels/csrc/dense_cpu.cpp), in one pass over memory instead of one per torch op."""
    if x.device.type != "cpu" or x.dtype not in FUSED_DTYPES or x.requires_grad:
        return None
    return cpu_extension.load()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch_rms_norm``, by the compiled kernel where it applies."""
    ops = fused_kernels(x)
    if ops is None or weight.dtype != x.dtype or weight.requires_grad:
        return torch_rms_norm(x, weight, eps)
    return ops.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``torch_add_rms_norm`` (residual + x is a new tensor; x None: the residual as given), by the
    compiled kernel where it applies."""
    ops = fused_kernels(residual)
    if ops is None or weight.dtype != residual.dtype or weight.requires_grad:
        return torch_add_rms_norm(x, residual, weight, eps)
    if x is None:
        return ops.rms_norm(residual, weight, eps), residual
    if x.dtype != residual.dtype or x.requires_grad:
        return torch_add_rms_norm(x, residual, weight, eps)
    return ops.add_rms_norm(x, residual, weight, eps)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int):
    """``torch_rotary_qkv``, by the compiled kernel where it applies (then q, k and v are
    contiguous tensors of their own, where the reference returns views)."""
    ops = fused_kernels(qkv)
    if ops is None or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype or head_dim % 2 or qkv.dim() != 2:
        return torch_rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    return ops.rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``torch_silu_and_mul``, by the compiled kernel where it applies."""
    ops = fused_kernels(gate_up)
    if ops is None:
        return torch_silu_and_mul(gate_up)
    return ops.silu_and_mul(gate_up)


class DenseOps:
    """The dense regions (plain functions or compiled) and the attention call a layer binds.
    ``gemm`` and ``attention`` are where a subclass hooks in (``TimedOps``)."""

    def __init__(self, add_norm=add_rms_norm, rotary=rotary_qkv, silu_mul=silu_and_mul, compiled: bool = False):
        self.add_norm = add_norm
        self.rotary = rotary
        self.silu_mul = silu_mul
        self.compiled = compiled

    def gemm(self, linear):
        """A bound GEMM (``paged_kernels.linear.bind_linear``) as the layer runs it."""
        return linear

    @staticmethod
    def attention(q, k, v, kv_cache, meta, scale: float) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        kernels = meta.backend  # resolved at load (paged/backends.py); None: paged_kernels picks by device
        if kernels is None:
            kernels = paged_kernels
        kernels.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        if meta.seq_slots is not None:  # contiguous KV (kv_memory virtual): each slot read in place
            return kernels.contiguous_attention(q, key_cache, value_cache, meta.seq_slots, meta.seq_lens,
                                                meta.query_start_loc, scale, workspace=meta.workspace)
        return kernels.paged_attention(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale, workspace=meta.workspace)


EAGER_OPS = DenseOps()


class TimedOps(DenseOps):
    """Eager ops that charge GEMMs to the timer's "gemm" phase and attention to "attention"."""

    def __init__(self, timer):
        super().__init__()
        self.timer = timer

    def gemm(self, linear):
        phase = self.timer.phase

        def timed(x):
            with phase("gemm"):
                return linear(x)
        return timed

    def attention(self, q, k, v, kv_cache, meta, scale):
        with self.timer.phase("attention"):
            return DenseOps.attention(q, k, v, kv_cache, meta, scale)


class DensePlan:
    """Which ops a step of ``num_tokens`` tokens runs: ``ops[i]`` covers counts up to ``limits[i]``."""

    def __init__(self, limits: tuple = (math.inf,), ops: tuple = (EAGER_OPS,)):
        self.limits = limits
        self.ops = ops

    def ops_for(self, num_tokens: int) -> DenseOps:
        for limit, ops in zip(self.limits, self.ops):
            if num_tokens <= limit:
                return ops
        return self.ops[-1]


EAGER_PLAN = DensePlan()
# The regions torch.compile traces (torch ops, which inductor fuses), and the eager functions a
# plan runs where the compiled one does not win.
REGIONS = {"add_norm": torch_add_rms_norm, "rotary": torch_rotary_qkv, "silu_mul": torch_silu_and_mul}
EAGER_REGIONS = {"add_norm": add_rms_norm, "rotary": rotary_qkv, "silu_mul": silu_and_mul}
# Token counts the compile probe times; each covers the counts up to the geometric mean with the next.
PROBE_TOKENS = (1, 16, 128, 1024)
# A compiled region must beat the eager ops by this factor to be used: below it, eager keeps
# the arithmetic identical to the reference's op for op.
COMPILED_MIN_SPEEDUP = 1.1
# ...and by this much more: inside a model step a compiled call costs ~30-40 us more than the
# probe's back-to-back calls show (dynamo's frame and guard machinery around each call; measured
# with bench/model_step.py on a 2-core AMD EPYC host).
IN_MODEL_CALL_OVERHEAD_S = 40e-6
# On a machine busy with other work every call can take milliseconds: past this budget the probe
# stops, and the token counts it did not reach run eagerly.
PROBE_BUDGET_S = 2.0
PROBE_REPEATS = 10


def region_inputs(name: str, num_tokens: int, sizes: dict, weight: torch.Tensor) -> tuple:
    """Example arguments of a dense region: random activations shaped as the model passes them."""
    gen = torch.Generator().manual_seed(num_tokens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=weight.device, dtype=weight.dtype)

    heads, kv_heads, head_dim = sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    if name == "add_norm":
        return rand(num_tokens, sizes["hidden_size"]), rand(num_tokens, sizes["hidden_size"]), weight, sizes["eps"]
    if name == "rotary":
        return (rand(num_tokens, (heads + 2 * kv_heads) * head_dim), rand(num_tokens, 1, head_dim),
                rand(num_tokens, 1, head_dim), heads, kv_heads, head_dim)
    return (rand(num_tokens, 2 * sizes["intermediate_size"]),)


def compile_dense_ops(sizes: dict, norm_weight: torch.Tensor, always: bool = False) -> tuple[DensePlan, dict]:
    """torch.compile each dense region, warm it, and keep it only for the token counts where it
    measures faster than the eager ops (``always``: for every count, without measuring).

    The token dimension is marked unbacked while warming, so one graph serves every count,
    1 included (a backed size would be specialised at 0 and 1): no step compiles, no padding.
    Warming runs under inference mode with a real norm weight, as the runner calls the regions
    (both are guarded). ``sizes``: hidden_size, intermediate_size, num_heads, num_kv_heads,
    head_dim, eps. Returns (plan, status with the probe's figures). A missing or broken compiler
    (no C++ toolchain, an inductor error) gives the eager plan and one warning, never an exception.
    """
    start = time.perf_counter()
    status: dict = {"requested": True, "active": False}
    try:
        compiled = {name: torch.compile(fn, dynamic=False) for name, fn in REGIONS.items()}
        with torch.inference_mode():
            for name, fn in compiled.items():
                args = region_inputs(name, 2, sizes, norm_weight)
                for arg in args:
                    if isinstance(arg, torch.Tensor) and arg is not norm_weight:
                        torch._dynamo.decorators.mark_unbacked(arg, 0)
                fn(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        logger.warning("torch.compile is unavailable, the model runs eagerly: %s: %s", type(exc).__name__, message)
        status.update(reason=f"{type(exc).__name__}: {message}"[:500], compile_s=round(time.perf_counter() - start, 3))
        return EAGER_PLAN, status
    status["compile_s"] = round(time.perf_counter() - start, 3)
    if always:
        status.update(active=True, chosen={name: "compiled" for name in REGIONS})
        return DensePlan(ops=(DenseOps(**compiled, compiled=True),)), status
    key = (tuple(sorted(sizes.items())), norm_weight.dtype, threading.get_ident(), torch.get_num_threads())
    if key not in _PROBES:
        _PROBES[key] = _probe_regions(compiled, sizes, norm_weight)
    eager_us, compiled_us, probe_s = _PROBES[key]
    use = {name: [e > c * COMPILED_MIN_SPEEDUP + IN_MODEL_CALL_OVERHEAD_S * 1e6
                  for e, c in zip(eager_us[name], compiled_us[name])]
           + [False] * (len(PROBE_TOKENS) - len(eager_us[name])) for name in REGIONS}
    ops = tuple(DenseOps(**{name: compiled[name] if use[name][i] else EAGER_REGIONS[name] for name in REGIONS},
                         compiled=any(use[name][i] for name in REGIONS)) for i in range(len(PROBE_TOKENS)))
    status.update(active=any(o.compiled for o in ops), tokens=list(PROBE_TOKENS), eager_us=eager_us,
                  compiled_us=compiled_us,
                  chosen={name: ["compiled" if u else "eager" for u in use[name]] for name in REGIONS},
                  probe_s=probe_s)
    return DensePlan(bucket_limits(PROBE_TOKENS), ops), status


# Probe figures by (sizes, dtype, thread, threads): a process that loads a model again (tests, a
# reload) reuses the first measurement, so its models run the same code.
_PROBES: dict = {}


def _probe_regions(compiled: dict, sizes: dict, norm_weight: torch.Tensor) -> tuple[dict, dict, float]:
    """Microseconds per call of each region, eager and compiled, at each of PROBE_TOKENS."""
    eager_us, compiled_us = {name: [] for name in REGIONS}, {name: [] for name in REGIONS}
    start = time.perf_counter()
    with torch.inference_mode():
        for num_tokens in PROBE_TOKENS:
            if time.perf_counter() - start > PROBE_BUDGET_S:
                break  # the counts not reached run eagerly
            for name, fn in compiled.items():
                args = region_inputs(name, num_tokens, sizes, norm_weight)
                e, c = best_of_interleaved([lambda: EAGER_REGIONS[name](*args), lambda: fn(*args)], PROBE_REPEATS)
                eager_us[name].append(round(e * 1e6, 1))
                compiled_us[name].append(round(c * 1e6, 1))
    return eager_us, compiled_us, round(time.perf_counter() - start, 3)
