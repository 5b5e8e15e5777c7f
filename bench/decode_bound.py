"""Whole decode steps of our engine against their physical bounds, each held to the bandwidth
measured next to it.

A decode step reads every weight once, so its floor is max(weight bytes / DRAM read bandwidth,
FLOPs / the dtype's peak). On a shared virtual machine the bandwidth swings by tens of percent
within minutes, so a step time held to a bandwidth measured at another moment says as much about
the machine's phase as about the engine. Here every round measures the bandwidth
(``analysis.dram_read_bandwidth``), then times decode steps at each batch size right after it,
and the step is held to that round's bandwidth; the ratio against the best bandwidth of the whole
run is printed beside it.

For each checkpoint, dtype and batch size: ``batch`` requests of a 16-token prompt are prefilled,
then ``--steps`` decode steps are timed one by one through ``LLMEngine.step`` (scheduling,
sampling and outputs included: what a served token costs, less the server); the median step
of the round counts. Peak: the best GFLOP/s of the GEMM paths on a 2048-cube (bench/gemm.py).

    python bench/decode_bound.py                               # SmolLM2 and the 0.5 B, bf16 and fp32
    python bench/decode_bound.py --pairs model-store/tiny-llama:float32 --batches 1,16

Writes bench/results/decode-bound.{json,md}. Needs the machine to itself (1-2 min per pair).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

import analysis  # noqa: E402
from throughput import BOUND_RATIO_TARGET, cpu_model, isa_flags  # noqa: E402
from throughput_matrix import QWEN_05B_DIR, ensure_qwen_05b, parse_pairs  # noqa: E402

DEFAULT_PAIRS = ",".join(["model-store/smollm2-135m-instruct:bfloat16", "model-store/smollm2-135m-instruct:float32",
                          f"{QWEN_05B_DIR}:bfloat16", f"{QWEN_05B_DIR}:float32"])
PROMPT_LEN = 16


def decode_flops_per_token(weight_bytes: int, dtype: str) -> float:
    """2 x the multiply-adds of one token through every Linear and the LM head, from the bytes of
    weights a step reads (one multiply-add per element; attention's are small at these lengths
    and left out, so the compute bound is a floor)."""
    return 2.0 * weight_bytes / analysis.DTYPE_BYTES[dtype]


def time_decode_steps(llm, batch: int, steps: int, vocab: int, seed: int) -> list[float]:
    """Seconds of each decode step of ``batch`` greedy requests (prefill not counted)."""
    from paged import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [(seed * 7919 + i * 131 + j * 17) % (vocab - 10) + 5 for j in range(PROMPT_LEN)]
        engine.add_request(f"decode-{seed}-{i}", prompt, params, stream=False)
    engine.step()  # the prefill (and each request's first token)
    seconds = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_pair(model_dir: str, dtype: str, batches: list[int], steps: int, rounds: int, threads: int) -> dict:
    import torch

    from paged import LLM

    torch.set_num_threads(threads)
    llm = LLM(model_dir, dtype=dtype, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False, seed=0)
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    time_decode_steps(llm, max(batches), 8, vocab, seed=10_000)  # warm-up: kernels, allocator
    weight_bytes = analysis.decode_weight_bytes(model_dir, dtype)
    flops = decode_flops_per_token(weight_bytes, dtype)
    from gemm import measure_peak

    peak = measure_peak(dtype, 2048, 3)["peak"] * 1e9
    per_round = []
    for r in range(rounds):
        bandwidth = analysis.dram_read_bandwidth(threads)
        medians = {b: statistics.median(time_decode_steps(llm, b, steps, vocab, seed=r * 100 + b)) for b in batches}
        per_round.append({"dram_read_bytes_per_s": bandwidth, "step_s": medians})
    best_bandwidth = max(x["dram_read_bytes_per_s"] for x in per_round)
    rows = []
    for b in batches:
        ratios = []
        for x in per_round:
            bound = max(weight_bytes / x["dram_read_bytes_per_s"], b * flops / peak)
            ratios.append(x["step_s"][b] / bound)
        best_step = min(x["step_s"][b] for x in per_round)
        stream_best = weight_bytes / best_bandwidth
        rows.append({"batch": b, "step_ms": round(best_step * 1e3, 3),
                     "step_ms_per_round": [round(x["step_s"][b] * 1e3, 3) for x in per_round],
                     "streaming_bound_ms_best_bandwidth": round(stream_best * 1e3, 3),
                     "compute_bound_ms": round(b * flops / peak * 1e3, 3),
                     "over_bound_same_round": round(min(ratios), 3),
                     "over_bound_same_round_per_round": [round(x, 3) for x in ratios],
                     "over_bound_best_bandwidth": round(best_step / max(stream_best, b * flops / peak), 3),
                     "tokens_per_s": round(b / best_step, 1)})
    info = llm.engine.performance_info()
    llm.close()
    return {"model": model_dir, "dtype": dtype, "weight_bytes": weight_bytes, "flops_per_token": flops,
            "peak_flops": peak, "bandwidths": [x["dram_read_bytes_per_s"] for x in per_round], "rows": rows,
            "linear_backend": info.get("linear_backend"), "weights_huge_pages": info.get("weights_huge_pages")}


def render(results: list[dict], meta: dict) -> str:
    head = ["checkpoint", "dtype", "batch", "step ms", "tokens/s", "bound ms (stream | compute)",
            "step / bound, same round", "step / bound, best bandwidth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for row in res["rows"]:
            same = row["over_bound_same_round"]
            lines.append("| " + " | ".join([
                f"`{res['model']}`", res["dtype"], str(row["batch"]), f"{row['step_ms']:.2f}",
                f"{row['tokens_per_s']:.0f}",
                f"{row['streaming_bound_ms_best_bandwidth']:.2f} | {row['compute_bound_ms']:.2f}",
                f"{same:.2f}x" + ("" if same <= BOUND_RATIO_TARGET else f" (> {BOUND_RATIO_TARGET}x)"),
                f"{row['over_bound_best_bandwidth']:.2f}x"]) + " |")
    notes = ["", f"Bound = max(weight bytes per step / DRAM read bandwidth, FLOPs per step / the dtype's peak). "
             f"'same round': each round's median step held to the bandwidth measured just before it, best round "
             f"shown; 'best bandwidth': the best step held to the best bandwidth of the run. Target <= "
             f"{BOUND_RATIO_TARGET}x at batch <= 16. Host: {meta['cpu']} ({', '.join(meta['isa'])}), "
             f"{meta['threads']} threads, {meta['rounds']} rounds of {meta['steps']} steps. Command: `{meta['command']}`."]
    for res in results:
        bws = ", ".join(f"{b / 1e9:.1f}" for b in res["bandwidths"])
        notes.append(f"- `{res['model']}` {res['dtype']}: {res['weight_bytes'] / 1e6:.0f} MB of weights per step, "
                     f"peak {res['peak_flops'] / 1e9:.0f} GFLOP/s, DRAM read per round {bws} GB/s, "
                     f"GEMM plan {res['linear_backend']}")
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=DEFAULT_PAIRS, help="MODEL_DIR:float32|bfloat16,...")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed per batch size and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results-dir", default=os.path.join(BENCH, "results"))
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch loads (bench/gemm.py imports it)
        os.environ[var] = str(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]
    results = []
    for model_dir, dtype in parse_pairs(args.pairs):
        if os.path.normpath(model_dir) == os.path.normpath(QWEN_05B_DIR):
            ensure_qwen_05b(model_dir)
        if not os.path.exists(os.path.join(ROOT, model_dir, "config.json")):
            print(f"skipped `{model_dir}`: no checkpoint there (make model builds the default one)", flush=True)
            continue
        print(f"== {model_dir} {dtype}", flush=True)
        results.append(measure_pair(os.path.join(ROOT, model_dir), dtype, batches, args.steps, args.rounds,
                                    args.threads))
        results[-1]["model"] = model_dir
    meta = {"cpu": cpu_model(), "isa": isa_flags(), "threads": args.threads, "rounds": args.rounds,
            "steps": args.steps, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(["python", os.path.relpath(__file__, ROOT)] + sys.argv[1:])}
    md = render(results, meta)
    print("\n" + md)
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "decode-bound.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.results_dir, "decode-bound.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
