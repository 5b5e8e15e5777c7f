"""Where a workload's time goes, by step size: our engine on the throughput benchmark's workloads,
every step's wall time against the tokens it ran, next to the arithmetic floor of those steps.

A throughput figure hides which steps decide it. A workload passes through prefill steps of up to
``max_num_batched_tokens`` tokens, decode steps of as many rows as sequences run, and a tail of
a few long requests at small batch. The first two are bound by arithmetic (the same GEMMs for
every engine, near the peak of the dtype), the tail by streaming the weights. This script runs one
checkpoint and dtype on each workload with bench/throughput.py's settings (block 16, the KV
budget, max_num_seqs, max_num_batched_tokens, prefix caching off, greedy, EOS ignored, --threads),
records each step's tokens, sampled rows and seconds, and prints per bucket of tokens per step:
steps, seconds and share of the run, mean milliseconds per step, and the mean step held to its
arithmetic floor (2 x (body weights x tokens + LM-head weights x sampled rows) FLOPs at the
dtype's peak, measured here on a --peak-size cube as in bench/gemm.py). A ratio near 1 leaves
nothing to gain on those steps but arithmetic; the time the buckets above ~128 tokens take is
what no engine can shorten by streaming better.

    python bench/step_sizes.py --model model-store/bench-qwen2-0.5b --dtype float32
    python bench/step_sizes.py --model model-store/smollm2-135m-instruct --dtype bfloat16 --workloads alpaca:1:200

Writes JSON (--out, default bench/results/step-sizes-<checkpoint>-<dtype>.json). Needs the machine
to itself (about a minute per workload at 0.5 B).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from throughput import DEFAULT_WORKLOADS, cpu_model, isa_flags, parse_workloads  # noqa: E402
from throughput_matrix import QWEN_05B_DIR, ensure_qwen_05b  # noqa: E402
from workload import workload_for_model  # noqa: E402

BUCKETS = ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 512),
           (513, 1024), (1025, 2048), (2049, 1 << 30))


def record_steps(llm, prompts, output_lens) -> tuple[float, list[tuple[float, int, int]]]:
    """Run the requests; (seconds in all, [(seconds, tokens, sampled rows) per step])."""
    from paged import SamplingParams

    engine = llm.engine
    scheduler = engine.scheduler
    schedule = scheduler.schedule
    planned: list[tuple[int, int]] = []

    def recording_schedule():
        out = schedule()
        planned.append((sum(s.num_new_tokens for s in out.scheduled), sum(1 for s in out.scheduled if s.samples)))
        return out
    for i, (prompt, length) in enumerate(zip(prompts, output_lens)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True),
                           stream=False)
    steps = []
    scheduler.schedule = recording_schedule
    try:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            planned.clear()
            t = time.perf_counter()
            engine.step()
            if planned:
                steps.append((time.perf_counter() - t, *planned[0]))
        elapsed = time.perf_counter() - start
    finally:
        scheduler.schedule = schedule
    return elapsed, steps


def by_bucket(steps, elapsed: float, body_params: int, head_params: int, peak: float) -> list[dict]:
    rows = []
    for low, high in BUCKETS:
        chosen = [s for s in steps if low <= s[1] <= high]
        if not chosen:
            continue
        seconds = sum(s[0] for s in chosen)
        floor = sum(2.0 * (body_params * s[1] + head_params * s[2]) / peak for s in chosen)
        rows.append({"tokens": f"{low}-{high}" if high < 1 << 30 else f"{low}-", "steps": len(chosen),
                     "seconds": round(seconds, 3), "share": round(seconds / elapsed, 4),
                     "mean_ms": round(1e3 * seconds / len(chosen), 2),
                     "mean_tokens": round(sum(s[1] for s in chosen) / len(chosen), 1),
                     "mean_sampled_rows": round(sum(s[2] for s in chosen) / len(chosen), 1),
                     "over_arithmetic_floor": round(seconds / floor, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, QWEN_05B_DIR), help="(built here when it is the 0.5 B default)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="profile:scale:num_requests,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-mib", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-size", type=int, default=2048, help="the cube the dtype's peak is measured on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch loads
        os.environ[var] = str(args.threads)
    if os.path.normpath(os.path.abspath(args.model)) == os.path.normpath(os.path.join(ROOT, QWEN_05B_DIR)):
        ensure_qwen_05b(QWEN_05B_DIR)
    import torch

    from gemm import measure_peak
    from paged import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, block_size=16, kv_cache_memory_bytes=args.kv_mib << 20, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, dtype=args.dtype,
              seed=0)
    model = llm.engine.executor.model
    head_params = model.lm_head.weight.numel()
    body_params = sum(linear.weight.numel() for linear in model.linears()) - head_params
    peak = measure_peak(args.dtype, args.peak_size, 3)["peak"] * 1e9
    llm.generate([[5, 6, 7, 8]] * 4, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    results = []
    for profile, scale, num in parse_workloads(args.workloads):
        wl = workload_for_model(args.model, profile, num, scale, args.seed)
        elapsed, steps = record_steps(llm, wl.prompts, wl.output_lens)
        buckets = by_bucket(steps, elapsed, body_params, head_params, peak)
        results.append({"workload": f"{wl.name}-n{num}", "seconds": round(elapsed, 3), "steps": len(steps),
                        "output_tokens_per_s": round(sum(wl.output_lens) / elapsed, 1), "buckets": buckets})
        print(f"\n{results[-1]['workload']}: {elapsed:.2f} s, {len(steps)} steps, "
              f"{results[-1]['output_tokens_per_s']} output tokens/s")
        print(f"{'tokens/step':>12} {'steps':>6} {'seconds':>8} {'share':>6} {'ms/step':>8} {'tokens':>7} "
              f"{'sampled':>8} {'/ floor':>8}")
        for b in buckets:
            print(f"{b['tokens']:>12} {b['steps']:>6} {b['seconds']:>8.2f} {b['share']:>6.1%} {b['mean_ms']:>8.2f} "
                  f"{b['mean_tokens']:>7.1f} {b['mean_sampled_rows']:>8.1f} {b['over_arithmetic_floor']:>7.2f}x")
    meta = {"model": os.path.relpath(args.model, ROOT), "dtype": args.dtype, "threads": args.threads,
            "cpu": cpu_model(), "isa": isa_flags(), "peak_gflops": round(peak / 1e9, 1),
            "linear_backend": model.linear_backend,
            "command": " ".join(["python", os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    llm.close()
    out = args.out or os.path.join(BENCH, "results",
                                   f"step-sizes-{os.path.basename(os.path.normpath(args.model))}-{args.dtype}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\npeak {meta['peak_gflops']} GFLOP/s ({args.dtype}), GEMM plan {meta['linear_backend']}; wrote {out}")


if __name__ == "__main__":
    main()
