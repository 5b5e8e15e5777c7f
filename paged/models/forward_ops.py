"""The ops a decoder layer calls: GEMMs, paged attention, and the dense rest between them.

A layer is GEMM -> dense -> attention -> GEMM -> dense -> GEMM -> dense -> GEMM -> dense. The
GEMMs (``kernels.linear.Linear``) and attention (``kernels``) are opaque calls; the dense parts
(residual add + RMSNorm, RoPE, SiLU * up) are small pure functions here, which run eagerly or as
torch.compile'd regions: inductor fuses each into one pass over the tokens. The regions take the
token count as a dynamic dimension, so a step of any size runs without padding and without a
recompile; ``compile_dense_ops`` compiles and warms them when the model loads.

Three bindings of the same ops, picked once per step by the model: ``EAGER_OPS``, a compiled
``DenseOps``, and ``TimedOps`` (eager, charging GEMMs and attention to a ``StepTimer``).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

import kernels

logger = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in fp32, scale by the weight in the input dtype."""
    if x.dtype == torch.float32:  # one fused op, same arithmetic as below
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(residual + x), residual + x): the residual stream and the next layer's input."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
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


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for the fused gate_up projection [tokens, 2 * intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DenseOps:
    """Eager GEMM and attention calls; dense regions as given (plain functions or compiled)."""

    def __init__(self, add_norm=add_rms_norm, rotary=rotary_qkv, silu_mul=silu_and_mul, compiled: bool = False):
        self.add_norm = add_norm
        self.rotary = rotary
        self.silu_mul = silu_mul
        self.compiled = compiled

    @staticmethod
    def linear(layer, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    @staticmethod
    def attention(q, k, v, kv_cache, meta, scale: float) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        kernels.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping, backend=meta.backend)
        return kernels.paged_attention(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale, backend=meta.backend, workspace=meta.workspace)


EAGER_OPS = DenseOps()


class TimedOps(DenseOps):
    """Eager ops that charge GEMMs to the timer's "gemm" phase and attention to "attention"."""

    def __init__(self, timer):
        super().__init__()
        self.timer = timer

    def linear(self, layer, x):
        with self.timer.phase("gemm"):
            return layer(x)

    def attention(self, q, k, v, kv_cache, meta, scale):
        with self.timer.phase("attention"):
            return DenseOps.attention(q, k, v, kv_cache, meta, scale)


def compile_dense_ops(example_sizes: dict, dtype: torch.dtype, device: str) -> tuple[DenseOps, dict]:
    """torch.compile the dense regions and run each at 1, 2 and 3 tokens (under inference mode,
    as the runner calls them), so that no step pays for compilation.

    One token is always its own graph (dynamo specialises sizes 0 and 1); the second size makes
    dynamo mark the token dimension dynamic; the third checks that no further size recompiles.
    ``example_sizes``: hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, eps.
    Returns (ops, status). A missing or broken compiler (no C++ toolchain, an inductor error)
    gives eager ops and one warning, never an exception.
    """
    start = time.perf_counter()
    status = {"requested": True, "active": False}
    try:
        ops = DenseOps(add_norm=torch.compile(add_rms_norm, dynamic=None),
                       rotary=torch.compile(rotary_qkv, dynamic=None),
                       silu_mul=torch.compile(silu_and_mul, dynamic=None), compiled=True)
        _warm_up(ops, example_sizes, dtype, device)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        logger.warning("torch.compile unavailable, the model runs eagerly: %s: %s",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        status.update(reason=f"{type(exc).__name__}: {exc}"[:500], compile_s=round(time.perf_counter() - start, 3))
        return EAGER_OPS, status
    status.update(active=True, compile_s=round(time.perf_counter() - start, 3))
    return ops, status


def _warm_up(ops: DenseOps, sizes: dict, dtype: torch.dtype, device: str) -> None:
    hidden, inter = sizes["hidden_size"], sizes["intermediate_size"]
    heads, kv_heads, head_dim = sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    weight = torch.ones(hidden, dtype=dtype, device=device)
    with torch.inference_mode():
        for num_tokens in (1, 2, 3):
            def make(*shape):
                return torch.randn(*shape, device=device).to(dtype)
            ops.add_norm(make(num_tokens, hidden), make(num_tokens, hidden), weight, sizes["eps"])
            ops.rotary(make(num_tokens, (heads + 2 * kv_heads) * head_dim), make(num_tokens, 1, head_dim),
                       make(num_tokens, 1, head_dim), heads, kv_heads, head_dim)
            ops.silu_mul(make(num_tokens, 2 * inter))
