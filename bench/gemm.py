"""GEMM paths on the weight shapes of real models, against this host's physical limits.

For every model (by default a SmolLM2-135M-shaped and a Qwen2-0.5B-shaped one), dtype (float32,
bfloat16, int8 = weight-only int8 with bf16 rows) and row count M, each path of
paged_kernels/linear.py runs each weight shape of the model: the packed kernel, oneDNN and F.linear
(int8: packed, torch's _weight_int8pack_mm, dequant + F.linear). A call reads its weight from DRAM
as in a model step: each shape has enough distinct copies (--cold-mib in all) that the last-level
cache never holds the one being read; the LM head writes into one kept output, as the engine's
does (the packed kernel in place, the other paths by a copy). Timings are the minimum over
--repeats rounds that interleave the paths. Reported per shape, M and path: microseconds, GFLOP/s
and GB/s of weights streamed; the difference from F.linear (max |error| over max |result|).

Against the limits:
- the measured DRAM read bandwidth (a streaming sum over a 2 GiB buffer, bench/analysis.py) gives
  each shape's weight-streaming bound (weight bytes / bandwidth), and per model and M the GEMM
  time of a decode step (every shape times its calls per step) next to its bound: the issue's
  target is a ratio <= 1.3 at M <= 16;
- the measured peak of the dtype (the best path on a --peak-size cube; int8 runs bf16 arithmetic,
  so it is held against the bf16 peak): the target is >= 60% of it at M >= 64;
- the path the load-time probe chooses per range of M for the model (``probe_linear_plan``).
The packed copies lie on transparent huge pages where the host has them, as the engine keeps its
weights (paged/models/weight_memory.py); --pages base puts them on the allocator's pages instead.
Fusions: the packed kernel's SiLU·up epilogue against the GEMM then the SiLU·up kernel (gate_up),
and oneDNN's residual-add post-op against the GEMM then an add (o_proj, down_proj).

    python bench/gemm.py                                        # both models, fp32/bf16/int8, 2 threads
    python bench/gemm.py --presets qwen2-0.5b --dtypes bfloat16 --rows 1,16,64
    python bench/gemm.py --model path/to/checkpoint             # that checkpoint's shapes too

Writes bench/results/gemm.json (every figure, the host CPU, its ISA flags, threads) and prints tables.
The machine must be quiet: on a shared one, say so next to any figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# The repository root first, so the engine's packages import from a checkout.
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

from analysis import dram_read_bandwidth  # noqa: E402
from paged.models.weight_memory import copy_to_huge_pages  # noqa: E402
from paged.os_memory import huge_pages_unavailable  # noqa: E402
from paged_kernels import cpu_extension  # noqa: E402
from paged_kernels import linear as kl  # noqa: E402
from throughput import cpu_model  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DTYPES = ("float32", "bfloat16", "int8")
# Model shapes (hidden, intermediate, heads, KV heads, head_dim, vocab, layers, qkv bias).
PRESETS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, num_hidden_layers=30),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                       head_dim=64, vocab_size=151936, num_hidden_layers=24, attention_bias=True),
    # model-store/tiny-llama (scripts/make_model.py)
    "tiny-llama": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=64, vocab_size=16000, num_hidden_layers=8),
}
DEFAULT_PRESETS = "smollm2-135m,qwen2-0.5b"
# The cpuinfo flags that decide which GEMM code a host can run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
# Targets of the issue: decode GEMMs within this factor of the weight-streaming bound at M <= 16;
# at M >= 64 this fraction of the measured peak.
STREAM_TARGET = 1.3
PEAK_TARGET = 0.6


def model_shapes(cfg: dict) -> list[dict]:
    """Each distinct GEMM of a Llama-family layer and the LM head: in, out, calls per step, whether
    its output is added to the residual stream, whether it has a bias."""
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    bias = bool(cfg.get("attention_bias", False))
    return [dict(name="qkv_proj", k=hidden, n=(heads + 2 * kv_heads) * head_dim, calls=layers, residual=False, bias=bias),
            dict(name="o_proj", k=heads * head_dim, n=hidden, calls=layers, residual=True, bias=False),
            dict(name="gate_up_proj", k=hidden, n=2 * inter, calls=layers, residual=False, bias=False),
            dict(name="down_proj", k=inter, n=hidden, calls=layers, residual=True, bias=False),
            dict(name="lm_head", k=hidden, n=cfg["vocab_size"], calls=1, residual=False, bias=False)]


def host_isa_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in ISA_FLAGS if flag in flags]


def weight_bytes(shape: dict, dtype: str) -> int:
    """Bytes of weights one call reads: int8 values plus fp32 scales, or the float weight."""
    n, k = shape["n"], shape["k"]
    return n * k + 4 * n if dtype == "int8" else n * k * (4 if dtype == "float32" else 2)


def interleaved_min(fns: dict, repeats: int) -> dict:
    """Minimum seconds per call of each fn over interleaved rounds; a fn takes no argument and
    returns how many calls it made."""
    for fn in fns.values():
        fn()
    names = list(fns)
    best = dict.fromkeys(names, math.inf)
    order = random.Random(0)
    for _ in range(repeats):
        # A new order each round: a call can be slowed by the one before it (caches, the core's
        # AVX-512 / AMX power state), so no path always follows the same other path.
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            calls = fns[name]()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def available_paths(dtype: torch.dtype, quantization: str | None, in_features: int) -> tuple[str, ...]:
    """The paths of paged_kernels/linear.py that run here for these weights."""
    paths = kl.INT8_PATHS if quantization else kl.FLOAT_PATHS
    out = tuple(p for p in paths if kl.path_unavailable_reason(p, dtype, quantization) is None)
    return tuple(p for p in out if p != "torch_int8" or in_features % kl.TORCH_INT8_K_MULTIPLE == 0)


def path_calls(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str, isa_paths: bool = False,
               huge_pages: bool = False, out: torch.Tensor | None = None) -> dict:
    """Per path, a function (x -> y) over this weight, built once (the packing is not timed).
    ``huge_pages``: the packed copy on transparent huge pages, as the engine keeps it.
    ``isa_paths``: also the packed kernel forced onto each instruction path the host has
    ("packed_amx", "packed_avx512_bf16", "packed_fma"), for bf16 rows.
    ``out`` [max rows, out_features]: y lands in its first rows, as the engine's LM head writes its
    logits (``Linear.forward_into``): the packed kernel in place, the other paths by a copy."""
    quantization = "int8" if dtype == "int8" else None
    paths = available_paths(weight.dtype, quantization, weight.shape[1])
    isa_paths = isa_paths and "packed" in paths and weight.dtype == torch.bfloat16

    def copied(fn):
        return fn if out is None else (lambda x: out[:x.shape[0]].copy_(fn(x)))
    if not (huge_pages or isa_paths or out is not None) or "packed" not in paths:
        return {p: copied(fn) for p, fn in kl.path_runners(weight, paths, quantization, bias=bias).items()}
    # The packed copy is made here, once, for the packed path and the forced instruction paths.
    others = kl.path_runners(weight, tuple(p for p in paths if p != "packed"), quantization, bias=bias)
    q, scales = kl.quantize_int8(weight) if quantization else (weight, None)
    packed = kl.pack_for_kernel(q, bias, scales)
    if huge_pages:  # as the engine holds it (paged/models/weight_memory.py)
        (data,), _ = copy_to_huge_pages([packed.data])
        packed = dataclasses.replace(packed, data=data)

    def packed_call(x: torch.Tensor) -> torch.Tensor:
        return kl.packed_linear(x, packed) if out is None else kl.packed_linear_into(x, packed, out[:x.shape[0]])
    calls = {p: packed_call if p == "packed" else copied(others[p]) for p in paths}
    if isa_paths:
        for isa in kl.packed_isa().split(","):
            calls[f"packed_{isa}"] = lambda x, isa=isa: kl.packed_linear(x, packed, isa)
    return calls


def bench_shape(shape: dict, dtype: str, rows: list[int], repeats: int, cold_bytes: int,
                bandwidth: float, isa_paths: bool = False, huge_pages: bool = False) -> list[dict]:
    """Every path at every row count on ``shape``, each call on a weight copy not in cache."""
    gen = torch.Generator().manual_seed(shape["n"] * 7 + shape["k"])
    float_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    n, k = shape["n"], shape["k"]
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(float_dtype)
    bias = torch.randn(n, generator=gen).to(float_dtype) if shape["bias"] else None
    nbytes = weight_bytes(shape, dtype)
    copies = max(1, math.ceil(cold_bytes / nbytes))
    # The engine's LM head writes into logits buffers it keeps (paged/models/logits_buffers.py); a
    # fresh output of rows x vocabulary per call would fault in new pages every time.
    kept = torch.zeros(max(rows), n, dtype=float_dtype) if shape["name"] == "lm_head" else None
    # Every copy is its own memory with its own packing; the values need not differ.
    per_copy = [path_calls(weight if i == 0 else weight.clone(), bias, dtype, isa_paths, huge_pages, kept)
                for i in range(copies)]
    paths = list(per_copy[0])
    fused = None
    if shape["name"] == "gate_up_proj" and "packed" in paths:
        fused = fusion_calls(weight, dtype)
    records = []
    for m in rows:
        x = torch.randn(m, k, generator=gen).to(float_dtype)
        fns = {p: over_copies(per_copy, p, x) for p in paths}
        # The fusions run on one copy of the weight (hot), each against its unfused pair.
        if fused is not None:
            fns.update({name: once(f, x) for name, f in fused.items()})
        if shape["residual"] and "onednn" in paths:
            residual = torch.randn(m, n, generator=gen).to(float_dtype)
            reordered = kl.pack_weight(weight, 256)
            fns["onednn_then_add"] = once(lambda x: residual + kl.onednn_linear(x, reordered, None), x)
            fns["onednn_fused_add"] = once(lambda x: kl.onednn_linear_add(x, residual, reordered, None), x)
        seconds = interleaved_min(fns, repeats)
        flops = 2 * m * n * k
        reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        record = {**shape, "dtype": dtype, "m": m, "weight_bytes": nbytes, "copies": copies,
                  "bound_us": round(nbytes / bandwidth * 1e6, 2),
                  "us": {p: round(s * 1e6, 2) for p, s in seconds.items()},
                  "gflops": {p: round(flops / seconds[p] / 1e9, 2) for p in paths},
                  "weight_gbps": {p: round(nbytes / seconds[p] / 1e9, 2) for p in paths},
                  "rel_err_vs_fp64": {p: float((per_copy[0][p](x).double() - reference).abs().max()
                                               / reference.abs().max()) for p in paths}}
        record["best"] = min(plan_paths(paths), key=lambda p: seconds[p])
        records.append(record)
    return records


def plan_paths(paths) -> list[str]:
    """The paths a plan can choose (not the packed kernel forced onto one instruction path)."""
    return [p for p in paths if not p.startswith("packed_")]


def over_copies(per_copy: list[dict], path: str, x: torch.Tensor):
    """A timed fn: ``path`` on every weight copy in turn."""
    def run() -> int:
        for calls in per_copy:
            calls[path](x)
        return len(per_copy)
    return run


def once(fn, x: torch.Tensor):
    """A timed fn: one call of ``fn(x)``."""
    def run() -> int:
        fn(x)
        return 1
    return run


def fusion_calls(weight: torch.Tensor, dtype: str) -> dict:
    """gate_up with the packed kernel: SiLU·up in its epilogue, or the GEMM then the SiLU·up kernel."""
    ops = cpu_extension.load()
    scales = None
    if dtype == "int8":
        weight, scales = kl.quantize_int8(weight)
    fused = kl.pack_for_kernel(weight, None, scales, silu_and_mul=True)
    plain = kl.pack_for_kernel(weight, None, scales)
    return {"packed_silu_fused": lambda x: kl.packed_linear(x, fused),
            "packed_then_silu": lambda x: ops.silu_and_mul(kl.packed_linear(x, plain))}


def measure_peak(dtype: str, size: int, repeats: int) -> dict:
    """GFLOP/s of a size^3 GEMM on each float path; the peak is the best. int8 weights run bf16
    arithmetic: their peak is bf16's."""
    float_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(float_dtype)
    calls = path_calls(torch.randn(size, size, generator=gen).to(float_dtype), None, "float32"
                       if dtype == "float32" else "bfloat16")
    seconds = interleaved_min({p: once(f, a) for p, f in calls.items()}, repeats)
    out = {p: round(2 * size ** 3 / s / 1e9, 1) for p, s in seconds.items()}
    out["peak"] = max(out.values())
    return out


def step_summary(records: list[dict], shapes: list[dict], rows: list[int], plan: kl.LinearPlan | None,
                 peak: float) -> list[dict]:
    """Per M: the GEMM time of one decode step on each path (each shape's cold time x its calls),
    the probe's plan, the weight-streaming bound and the ratios to the targets. Also the roofline
    bound, the larger of the weight stream and the arithmetic at the measured peak: past a few
    rows (fp32 ~9, bf16 ~9 on a 2-core host with ~45 GB/s) the arithmetic takes longer than the
    stream, so no kernel can reach the weight-streaming bound there."""
    out = []
    for m in rows:
        at_m = {r["name"]: r for r in records if r["m"] == m}
        if len(at_m) != len(shapes):
            continue
        paths = set.intersection(*(set(r["gflops"]) for r in at_m.values()))
        step = {p: sum(r["us"][p] * r["calls"] for r in at_m.values()) for p in paths}
        bound = sum(r["bound_us"] * r["calls"] for r in at_m.values())
        flops = sum(2 * m * r["n"] * r["k"] * r["calls"] for r in at_m.values())
        best = min(plan_paths(step), key=step.get)
        roofline = max(bound, flops / (peak * 1e9) * 1e6)
        entry = {"m": m, "step_us": {p: round(t, 1) for p, t in step.items()}, "bound_us": round(bound, 1),
                 "roofline_us": round(roofline, 1), "best": best, "best_over_bound": round(step[best] / bound, 2),
                 "best_over_roofline": round(step[best] / roofline, 2),
                 "best_peak_fraction": round(flops / (step[best] * 1e-6) / 1e9 / peak, 3)}
        if plan is not None and plan.path_for(m) in step:
            chosen = plan.path_for(m)
            entry.update(plan=chosen, plan_over_bound=round(step[chosen] / bound, 2),
                         plan_peak_fraction=round(flops / (step[chosen] * 1e-6) / 1e9 / peak, 3))
        out.append(entry)
    return out


def probe_plan(shapes: list[dict], dtype: str) -> tuple[kl.LinearPlan, dict]:
    """What the load-time probe chooses for this model's shapes (random weights)."""
    float_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    weights = [((torch.randn(s["n"], s["k"], generator=gen) * s["k"] ** -0.5).to(float_dtype), s["calls"],
                s["name"] == "gate_up_proj") for s in shapes]  # timed with its SiLU·up, as the model probes it
    result = kl.probe_linear_plan(weights, float_dtype, quantization="int8" if dtype == "int8" else None)
    return result.plan, result.figures


def print_table(model: str, dtype: str, records: list[dict], peak: float) -> None:
    paths = sorted({p for r in records for p in r["gflops"]})
    extra = sorted({p for r in records for p in r["us"]} - set(paths))
    head = f"{'shape':<24} {'M':>4} " + " ".join(f"{p + ' us':>14} {'GF/s':>7} {'GB/s':>6}" for p in paths)
    print(f"\n{model} {dtype}: per call; GB/s = weight bytes streamed; bound = weight bytes / DRAM bandwidth")
    print(head + f" {'bound us':>9} {'best/bnd':>8} {'best %pk':>8}  " + " ".join(f"{p:>17}" for p in extra))
    for r in records:
        cells = " ".join(f"{fmt(r['us'].get(p), '14.1f')} {fmt(r['gflops'].get(p), '7.1f')} "
                         f"{fmt(r['weight_gbps'].get(p), '6.1f')}" for p in paths)
        best_us = r["us"][r["best"]]
        label = f"{r['name']} {r['k']}>{r['n']}"
        print(f"{label:<24} {r['m']:>4} {cells} {r['bound_us']:>9.1f} {best_us / r['bound_us']:>8.2f} "
              f"{100 * r['gflops'][r['best']] / peak:>8.1f}  " + " ".join(fmt(r['us'].get(p), '17.1f') for p in extra),
              flush=True)


def print_steps(model: str, dtype: str, steps: list[dict], plan_text: str) -> None:
    print(f"\n{model} {dtype}: GEMMs of one decode step (every shape x its calls); probe plan: {plan_text}")
    paths = sorted({p for s in steps for p in s["step_us"]})
    print(f"{'M':>4} " + " ".join(f"{p + ' ms':>12}" for p in paths) +
          f" {'bound ms':>9} {'roofl. ms':>9} {'best':>8} {'best/bound':>10} {'best/roofl':>10} {'plan':>10}"
          f" {'plan/bound':>10} {'plan %peak':>10}")
    for s in steps:
        cells = " ".join(fmt(s["step_us"][p] / 1e3 if p in s["step_us"] else None, "12.3f") for p in paths)
        plan_peak = 100 * s["plan_peak_fraction"] if "plan_peak_fraction" in s else None
        print(f"{s['m']:>4} {cells} {s['bound_us'] / 1e3:>9.3f} {s['roofline_us'] / 1e3:>9.3f} {s['best']:>8} "
              f"{s['best_over_bound']:>10.2f} {s['best_over_roofline']:>10.2f} "
              f"{s.get('plan', '-'):>10} {fmt(s.get('plan_over_bound'), '10.2f')} {fmt(plan_peak, '10.1f')}")


def fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=DEFAULT_PRESETS, help=f"model shapes among {', '.join(PRESETS)}")
    ap.add_argument("--model", action="append", default=[], help="checkpoint dir whose shapes to add (repeatable)")
    ap.add_argument("--shapes", default="", help="only these GEMMs, e.g. gate_up_proj,lm_head")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold-mib", type=int, default=512,
                    help="weight copies per shape, in all (larger than the last-level cache); 0: one hot copy")
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--dram-mib", type=int, default=2048, help="buffer of the DRAM bandwidth measurement")
    ap.add_argument("--no-probe", action="store_true", help="skip the probe's plan")
    ap.add_argument("--isa-paths", action="store_true",
                    help="also time the packed kernel forced onto each instruction path (AMX, AVX512_BF16, FMA)")
    ap.add_argument("--pages", choices=("huge", "base"), default=None,
                    help="the packed copies on transparent huge pages, as the engine holds them (huge, the "
                         "default where the host has them), or on the allocator's pages (base), to see the gain")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gemm.json"))
    opts = ap.parse_args(argv)
    no_huge_pages = huge_pages_unavailable()
    if opts.pages is None:
        opts.pages = "base" if no_huge_pages else "huge"
    elif opts.pages == "huge" and no_huge_pages is not None:
        raise SystemExit(f"--pages huge: {no_huge_pages}; run with --pages base")
    torch.set_num_threads(opts.threads)
    models = {name: PRESETS[name] for name in filter(None, opts.presets.split(","))}
    for model_dir in opts.model:
        with open(os.path.join(model_dir, "config.json")) as f:
            models[os.path.basename(os.path.normpath(model_dir))] = json.load(f)
    rows = [int(r) for r in opts.rows.split(",")]
    dtypes = opts.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SystemExit(f"--dtypes takes {', '.join(DTYPES)}, got {dtype!r}")
    started = time.perf_counter()
    bandwidth = dram_read_bandwidth(opts.threads, opts.dram_mib << 20)
    result = {"cpu": cpu_model(), "isa_flags": host_isa_flags(), "packed_isa": kl.packed_isa(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_avg_start": list(os.getloadavg()), "dram_read_gbps": round(bandwidth / 1e9, 2),
              "cold_mib": opts.cold_mib, "packed_pages": opts.pages, "peaks": {}, "models": {}}
    print(f"{result['cpu']}; ISA {','.join(result['isa_flags'])}; packed kernel {result['packed_isa']}; "
          f"{result['threads']} threads; DRAM read {result['dram_read_gbps']} GB/s; packed weights on {opts.pages} pages")
    with torch.inference_mode():
        for dtype in dtypes:
            peak_key = "float32" if dtype == "float32" else "bfloat16"
            if peak_key not in result["peaks"]:
                result["peaks"][peak_key] = measure_peak(peak_key, opts.peak_size, opts.repeats)
                print(f"{peak_key} peak: {result['peaks'][peak_key]} GFLOP/s ({opts.peak_size}^3)")
        for model, cfg in models.items():
            shapes = model_shapes(cfg)
            if opts.shapes:
                shapes = [s for s in shapes if s["name"] in opts.shapes.split(",")]
            result["models"][model] = {"config": cfg, "dtypes": {}}
            for dtype in dtypes:
                peak = result["peaks"]["float32" if dtype == "float32" else "bfloat16"]["peak"]
                records = []
                for shape in shapes:
                    records += bench_shape(shape, dtype, rows, opts.repeats, opts.cold_mib << 20, bandwidth,
                                           opts.isa_paths, opts.pages == "huge")
                plan, figures = (None, {}) if opts.no_probe else probe_plan(shapes, dtype)
                steps = step_summary(records, shapes, rows, plan, peak)
                result["models"][model]["dtypes"][dtype] = {
                    "records": records, "steps": steps, "plan": plan.describe() if plan else None,
                    "probe": figures}
                print_table(model, dtype, records, peak)
                print_steps(model, dtype, steps, plan.describe() if plan else "not probed")
    result["load_avg_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['cpu']}, {result['threads']} threads, load average {result['load_avg_start']} -> "
          f"{result['load_avg_end']}; targets: decode (M <= 16) GEMMs <= {STREAM_TARGET}x the bound, "
          f"M >= 64 >= {PEAK_TARGET:.0%} of the peak; wrote {opts.out}")
    return result


if __name__ == "__main__":
    main()
