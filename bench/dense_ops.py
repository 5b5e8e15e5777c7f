"""Microseconds per call of each dense op of a decoder layer: the torch reference vs the compiled
kernel (paged/models/forward_ops.py, kernels/paged_kernels/csrc/dense_cpu.cpp), at several token counts.

Shapes are the model's (--model's config.json). Variants are interleaved round by round, each
sample times enough back-to-back calls to last ~0.2 ms, and the minimum over --repeats rounds is
kept (the machine is noisy). --threads-sweep also times the compiled kernels on 1 thread against
all --threads, which is how kernels/paged_kernels/csrc/dense_cpu.cpp's kParallelElements was chosen.

    python bench/dense_ops.py --tokens 1,8,64,256,2048
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repo root first, before bench/ (this script's folder).
sys.path.insert(0, ROOT)

from paged.models import forward_ops  # noqa: E402
from paged.models.llama import ModelArgs, rope_inverse_frequencies  # noqa: E402
from throughput import cpu_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# op: (reference, fused)
OPS = {
    "add_rms_norm": (forward_ops.torch_add_rms_norm, forward_ops.add_rms_norm),
    "rms_norm": (forward_ops.torch_rms_norm, forward_ops.rms_norm),
    "rotary_qkv": (forward_ops.torch_rotary_qkv, forward_ops.rotary_qkv),
    "silu_and_mul": (forward_ops.torch_silu_and_mul, forward_ops.silu_and_mul),
}


def op_inputs(name: str, args: ModelArgs, tokens: int, dtype: torch.dtype) -> tuple:
    """Random arguments shaped as the model passes them (cos/sin from real positions)."""
    gen = torch.Generator().manual_seed(tokens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    hidden = args.hidden_size
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    if name == "add_rms_norm":
        return rand(tokens, hidden), rand(tokens, hidden), weight, args.rms_norm_eps
    if name == "rms_norm":
        return rand(tokens, hidden), weight, args.rms_norm_eps
    if name == "rotary_qkv":
        freqs = torch.arange(tokens).float()[:, None] * rope_inverse_frequencies(args)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        width = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        return (rand(tokens, width), angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :],
                args.num_heads, args.num_kv_heads, args.head_dim)
    return (rand(tokens, 2 * args.intermediate_size),)


def best_us(variants, repeats: int) -> list[float]:
    """Minimum microseconds per call of each (call, threads) variant over ``repeats`` interleaved
    rounds; the thread count is set outside the timed calls."""
    default_threads = torch.get_num_threads()
    for call, _ in variants:
        call()
    start = time.perf_counter()
    variants[0][0]()
    inner = max(1, min(1000, int(2e-4 / max(time.perf_counter() - start, 1e-7))))
    best = [math.inf] * len(variants)
    for _ in range(repeats):
        for i, (call, threads) in enumerate(variants):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for _ in range(inner):
                call()
            best[i] = min(best[i], (time.perf_counter() - start) / inner)
    torch.set_num_threads(default_threads)
    return [round(b * 1e6, 2) for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model-store", "tiny-llama"))
    ap.add_argument("--tokens", default="1,8,64,256,2048")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threads-sweep", action="store_true",
                    help="also time the compiled kernels on 1 thread (serial) against --threads")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    args = ModelArgs.from_checkpoint(opts.model)
    dtype = DTYPES[opts.dtype]
    if forward_ops.cpu_extension.load() is None:
        raise SystemExit("the compiled CPU kernels are not loaded here: nothing to compare")
    print(json.dumps({"cpu": cpu_model(), "threads": opts.threads, "dtype": opts.dtype,
                      "load_avg": os.getloadavg()}), flush=True)
    with torch.inference_mode():
        for name in opts.ops.split(","):
            reference, fused = OPS[name]
            for tokens in (int(t) for t in opts.tokens.split(",")):
                inputs = op_inputs(name, args, tokens, dtype)
                variants = [(lambda: reference(*inputs), opts.threads), (lambda: fused(*inputs), opts.threads)]
                if opts.threads_sweep:
                    variants.append((lambda: fused(*inputs), 1))
                times = best_us(variants, opts.repeats)
                row = {"op": name, "tokens": tokens, "torch_us": times[0], "fused_us": times[1],
                       "speedup": round(times[0] / times[1], 2)}
                if opts.threads_sweep:
                    row["fused_1_thread_us"] = times[2]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
