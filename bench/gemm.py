"""GEMM paths on our weight shapes: F.linear (MKL) against oneDNN with the weight prepacked once.

For every weight shape (tiny-llama's by default, plus those of each --model checkpoint) and every
row count M, each path is timed (minimum over --repeats rounds that interleave the paths; the first
call of a new shape is reported apart, since it builds kernels), shown as GFLOP/s against this
host's measured peak (a large square fp32 GEMM on the same threads, the faster path of the two),
and compared with F.linear (max absolute difference, and that over the largest |output|). For the shapes whose output
is added to the residual stream (o_proj, down_proj), oneDNN's fused "add" post-op is timed against
the GEMM followed by a separate add.

    python bench/gemm.py                                  # tiny-llama shapes, fp32, 2 threads
    python bench/gemm.py --model path/to/checkpoint --dtypes float32,bfloat16

Writes bench/results/gemm.json (every figure) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository root first, so the engine's packages import from a checkout.
sys.path.insert(0, ROOT)

from paged_kernels.linear import onednn_linear, onednn_linear_add, onednn_unavailable_reason, pack_weight  # noqa: E402
from throughput import cpu_model  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# tiny-llama (model-store/tiny-llama): hidden 512, intermediate 1408, 8 heads + 2 KV heads of 64, vocab 16000.
TINY_LLAMA = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=64, vocab_size=16000)


def model_shapes(name: str, cfg: dict) -> list[dict]:
    """(name, in, out, adds_residual) of each distinct GEMM of a Llama-family layer and the LM head."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    return [dict(model=name, name="qkv_proj", k=hidden, n=(heads + 2 * kv_heads) * head_dim, residual=False),
            dict(model=name, name="o_proj", k=heads * head_dim, n=hidden, residual=True),
            dict(model=name, name="gate_up_proj", k=hidden, n=2 * inter, residual=False),
            dict(model=name, name="down_proj", k=inter, n=hidden, residual=True),
            dict(model=name, name="lm_head", k=hidden, n=cfg["vocab_size"], residual=False)]


def timed_first(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_min(fns: dict, repeats: int) -> dict:
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure_peak(dtype: torch.dtype, size: int, repeats: int) -> dict:
    """GFLOP/s of a size^3 GEMM on each path; the peak is the faster one."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    w = torch.randn(size, size, generator=gen).to(dtype)
    fns = {"torch": lambda: F.linear(a, w)}
    if onednn_unavailable_reason(dtype) is None:
        packed = pack_weight(w, size)
        fns["onednn"] = lambda: onednn_linear(a, packed, None)
    for fn in fns.values():
        fn()
    best = interleaved_min(fns, repeats)
    flops = 2 * size ** 3
    out = {path: round(flops / t / 1e9, 1) for path, t in best.items()}
    out["peak"] = max(out.values())
    return out


def bench_shape(shape: dict, dtype: torch.dtype, rows: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(rows)
    k, n = shape["k"], shape["n"]
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    residual = torch.randn(rows, n, generator=gen).to(dtype)
    record = {**shape, "dtype": str(dtype).removeprefix("torch."), "m": rows, "gflop": 2 * rows * k * n / 1e9}
    fns = {"torch": lambda: F.linear(x, w)}
    reason = onednn_unavailable_reason(dtype)
    if reason is None:
        packed = pack_weight(w, 256)
        fns["onednn"] = lambda: onednn_linear(x, packed, None)
        if shape["residual"]:
            fns["onednn_then_add"] = lambda: residual + onednn_linear(x, packed, None)
            fns["onednn_fused_add"] = lambda: onednn_linear_add(x, residual, packed, None)
    else:
        record["onednn_unavailable"] = reason
    record["first_us"] = {name: round(timed_first(fn) * 1e6, 1) for name, fn in fns.items()}
    record["us"] = {name: round(t * 1e6, 2) for name, t in interleaved_min(fns, repeats).items()}
    if "onednn" in fns:
        ref = F.linear(x.double(), w.double())
        base = F.linear(x, w).double()
        got = onednn_linear(x, packed, None).double()
        record["max_abs_diff_vs_torch"] = float((got - base).abs().max())
        record["max_rel_diff_vs_torch"] = float((got - base).abs().max() / base.abs().max())  # normwise
        record["max_abs_err_fp64"] = {"torch": float((base - ref).abs().max()),
                                      "onednn": float((got - ref).abs().max())}
        if shape["residual"]:
            fused = onednn_linear_add(x, residual, packed, None)
            record["fused_add_max_abs_diff"] = float((fused - (residual + onednn_linear(x, packed, None))).abs().max())
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="checkpoint dir whose shapes to add (repeatable)")
    ap.add_argument("--no-tiny-llama", action="store_true", help="only the --model shapes")
    ap.add_argument("--shapes", default="", help="only these GEMMs, e.g. gate_up_proj,lm_head")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gemm.json"))
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    shapes = [] if opts.no_tiny_llama else model_shapes("tiny-llama", TINY_LLAMA)
    for model_dir in opts.model:
        with open(os.path.join(model_dir, "config.json")) as f:
            shapes += model_shapes(os.path.basename(os.path.normpath(model_dir)), json.load(f))
    if opts.shapes:
        shapes = [s for s in shapes if s["name"] in opts.shapes.split(",")]
    rows = [int(r) for r in opts.rows.split(",")]
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_avg_start": list(os.getloadavg()), "peaks": {}, "records": []}
    started = time.perf_counter()
    with torch.inference_mode():
        for dtype_name in opts.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            peak = measure_peak(dtype, opts.peak_size, 3)
            result["peaks"][dtype_name] = peak
            print(f"\n{dtype_name}: peak {peak['peak']} GFLOP/s ({opts.peak_size}^3 GEMM: {peak})")
            print(f"{'shape':<24} {'M':>4} {'torch us':>9} {'onednn us':>9} {'speedup':>7} {'torch %pk':>9} "
                  f"{'onednn %pk':>10} {'abs diff':>9} {'rel diff':>9} {'+add us':>8} {'fused us':>8} "
                  f"{'1st us t/o':>13}")
            for shape in shapes:
                for m in rows:
                    rec = bench_shape(shape, dtype, m, opts.repeats)
                    result["records"].append(rec)
                    us = rec["us"]
                    pct = {p: 100 * rec["gflop"] / (t * 1e-6) / peak["peak"] for p, t in us.items()}
                    label = f"{shape['model'][:10]} {shape['name']} {shape['k']}>{shape['n']}"
                    onednn = us.get("onednn")
                    print(f"{label:<24} {m:>4} {us['torch']:>9.1f} {fmt(onednn, '9.1f')} "
                          f"{fmt(us['torch'] / onednn if onednn else None, '7.2f')} {pct['torch']:>9.1f} "
                          f"{fmt(pct.get('onednn'), '10.1f')} {fmt(rec.get('max_abs_diff_vs_torch'), '9.1e')} "
                          f"{fmt(rec.get('max_rel_diff_vs_torch'), '9.1e')} {fmt(us.get('onednn_then_add'), '8.1f')} "
                          f"{fmt(us.get('onednn_fused_add'), '8.1f')} "
                          f"{rec['first_us']['torch']:>6.0f}/{fmt(rec['first_us'].get('onednn'), '6.0f')}",
                          flush=True)
    result["load_avg_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['cpu']}, {result['threads']} threads, load average {result['load_avg_start']} -> "
          f"{result['load_avg_end']}; wrote {opts.out}")


def fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else f"{'-':>{width}}"


if __name__ == "__main__":
    main()
