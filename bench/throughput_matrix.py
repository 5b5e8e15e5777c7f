"""Our engine against vLLM's CPU build at the sizes users serve: one table over checkpoints and dtypes.

For every (checkpoint, dtype) pair it runs bench/throughput.py (same workloads, KV budget, threads
and settings for both engines; see that file) and gathers, per pair:
- ours / vLLM output tokens/s on each workload (target: >= 1.25x on every row);
- batch-1 decode time per token over its weight-streaming bound (weight bytes read per token /
  DRAM read bandwidth; target: <= 1.3x), and the weight bytes per second it streams. The bandwidth
  is the best of the measurements taken in the run (one per pair): on a shared virtual machine a
  single measurement swings by tens of percent, and a decode that streams faster than a low
  measurement would otherwise read as beating the bound;
- our GEMM plan (the path the load-time probe chose per range of rows) and the host's ISA flags.

The default set: the 39 M test model (fp32), the default real model SmolLM2-135M-Instruct and a
Qwen2-0.5B-shaped checkpoint with random weights (scripts/make_model.py --preset qwen2-0.5b, built
here when missing), each in bfloat16 and float32. A checkpoint that is not there is skipped with
a line saying so.

    python bench/throughput_matrix.py                               # the default set, 1 repeat each
    python bench/throughput_matrix.py --pairs model-store/tiny-llama:float32 --repeats 3
    python bench/throughput_matrix.py --keep-finished     # rerun only the pairs that failed

Writes bench/results/throughput-matrix.{json,md} (and each pair's own throughput-<name>.* files).
Needs the machine to itself: ~30-40 min on 2 cores for the default set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

from throughput import BOUND_RATIO_TARGET, TARGETS, cpu_model, isa_flags  # noqa: E402

QWEN_05B_DIR = os.path.join("model-store", "bench-qwen2-0.5b")
DEFAULT_PAIRS = ",".join([
    "model-store/tiny-llama:float32",
    "model-store/smollm2-135m-instruct:bfloat16", "model-store/smollm2-135m-instruct:float32",
    f"{QWEN_05B_DIR}:bfloat16", f"{QWEN_05B_DIR}:float32",
])


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    pairs = []
    for item in spec.split(","):
        model, sep, dtype = item.strip().rpartition(":")
        if not sep or dtype not in ("float32", "bfloat16"):
            raise SystemExit(f"--pairs items are MODEL_DIR:float32|bfloat16, got {item!r}")
        pairs.append((model, dtype))
    return pairs


def ensure_qwen_05b(model_dir: str) -> None:
    """Build the Qwen2-0.5B-shaped random checkpoint once (config.json marks a finished build)."""
    if os.path.exists(os.path.join(ROOT, model_dir, "config.json")):
        return
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_model.py"), "--out",
                    os.path.join(ROOT, model_dir), "--preset", "qwen2-0.5b"], check=True, cwd=ROOT)


def slug(model_dir: str, dtype: str) -> str:
    return f"{os.path.basename(os.path.normpath(model_dir))}-{dtype}"


def pair_row(model_dir: str, dtype: str, result: dict) -> dict:
    """One table row from a throughput.py result: ratios per workload, the bound ratio, the plan."""
    ratios = {name: rows["vllm"].get("ratio_ours_over") for name, rows in result["summary"].items()
              if not name.startswith("batch1") and "vllm" in rows}
    ours_config = result["meta"].get("ours_config") or {}
    batch1 = result["meta"].get("batch1") or {}
    return {"model": model_dir, "dtype": dtype, "ratio_vs_vllm": ratios,
            "ours_tokens_per_s": {name: rows["ours"]["output_tokens_per_s"]
                                  for name, rows in result["summary"].items() if "ours" in rows},
            "batch1_tokens_per_s": next((rows["ours"]["output_tokens_per_s"]
                                         for name, rows in result["summary"].items()
                                         if name.startswith("batch1") and "ours" in rows), None),
            "decode_weight_bytes": batch1.get("decode_weight_bytes"),
            "dram_read_bytes_per_s": batch1.get("dram_read_bytes_per_s"),
            "linear_backend": ours_config.get("linear_backend"),
            "unavailable": result.get("unavailable") or {}, "errors": result.get("errors") or {}}


def add_bound_ratios(rows: list[dict], bandwidth: float) -> None:
    """Batch-1 decode against the weight-streaming bound at ``bandwidth`` (bytes/s: the best
    measured in the run)."""
    for r in rows:
        if r.get("batch1_tokens_per_s") and r.get("decode_weight_bytes"):
            streamed = r["decode_weight_bytes"] * r["batch1_tokens_per_s"]
            r["batch1_weight_bytes_per_s"] = streamed
            r["batch1_over_bound"] = bandwidth / streamed  # time per token over the bound's


def render(rows: list[dict], skipped: list[str], meta: dict) -> str:
    workloads = sorted({name for r in rows for name in r["ratio_vs_vllm"]})
    target = TARGETS["vllm"]
    head = ["checkpoint", "dtype", *[f"{w}: ours / vLLM" for w in workloads],
            "batch-1 decode: weights streamed", "batch-1 decode / bound", "our GEMM plan"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['model']}`", r["dtype"]]
        for w in workloads:
            ratio = r["ratio_vs_vllm"].get(w)
            cells.append("-" if ratio is None else f"{ratio:.2f}x" + ("" if ratio >= target else f" (< {target}x)"))
        streamed = r.get("batch1_weight_bytes_per_s")
        cells.append("-" if streamed is None else f"{streamed / 1e9:.1f} GB/s")
        bound = r.get("batch1_over_bound")
        cells.append("-" if bound is None else f"{bound:.2f}x" + ("" if bound <= BOUND_RATIO_TARGET
                                                                  else f" (> {BOUND_RATIO_TARGET}x)"))
        cells.append(str(r["linear_backend"] or "-"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", f"Targets: ours >= {target}x vLLM CPU on every workload; batch-1 decode within "
             f"{BOUND_RATIO_TARGET}x of the weight-streaming bound (weight bytes per token / the best DRAM read "
             f"bandwidth measured in the run, {fmt_bandwidth(meta['dram_read_bytes_per_s'])}; the measurements "
             f"ranged {fmt_bandwidth(meta['dram_read_range'][0])} to {fmt_bandwidth(meta['dram_read_range'][1])}). Host: {meta['cpu']} "
             f"({', '.join(meta['isa']) or 'no AVX flags read'}), {meta['threads']} threads per engine, "
             f"{meta['repeats']} repeat(s) per pair, medians. Command: `{meta['command']}`. Each pair's full "
             f"table (tokens/s, KV utilization, greedy agreement, load times) is in "
             f"bench/results/throughput-<checkpoint>-<dtype>.md."]
    for r in rows:
        for engine, why in r["unavailable"].items():
            notes.append(f"- `{r['model']}` {r['dtype']}: {engine} unavailable ({why})")
    notes += [f"- skipped: {s}" for s in skipped]
    return "\n".join(lines + notes) + "\n"


def fmt_bandwidth(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.1f} GB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=DEFAULT_PAIRS, help="MODEL_DIR:dtype,...")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workloads", default=None, help="passed to throughput.py (its default otherwise)")
    ap.add_argument("--results-dir", default=os.path.join(BENCH, "results"))
    ap.add_argument("--keep-finished", action="store_true",
                    help="reuse a pair's earlier result where both engines finished (rerun only the rest)")
    args = ap.parse_args()

    rows, skipped = [], []
    started = time.perf_counter()
    for model_dir, dtype in parse_pairs(args.pairs):
        if os.path.normpath(model_dir) == os.path.normpath(QWEN_05B_DIR):
            ensure_qwen_05b(model_dir)
        if not os.path.exists(os.path.join(ROOT, model_dir, "config.json")):
            skipped.append(f"`{model_dir}` {dtype}: no checkpoint there (make model builds the default one)")
            print(skipped[-1], flush=True)
            continue
        name = f"throughput-{slug(model_dir, dtype)}"
        out = os.path.join(args.results_dir, f"{name}.json")
        if args.keep_finished and os.path.exists(out):
            with open(out) as f:
                earlier = json.load(f)
            if not earlier.get("unavailable") and not any(earlier.get("errors", {}).values()):
                print(f"== {model_dir} {dtype}: reusing {os.path.relpath(out, ROOT)}", flush=True)
                rows.append(pair_row(model_dir, dtype, earlier))
                continue
        cmd = [sys.executable, os.path.join(BENCH, "throughput.py"), "--model", model_dir, "--dtype", dtype,
               "--engines", "ours,vllm", "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--results-dir", args.results_dir, "--name", name]
        if dtype != "float32":
            cmd.append("--no-tie-check")  # the near-tie check compares with HF fp32 logits
        if args.workloads:
            cmd += ["--workloads", args.workloads]
        print(f"== {model_dir} {dtype}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0 or not os.path.exists(out):
            skipped.append(f"`{model_dir}` {dtype}: throughput.py exited {proc.returncode}")
            continue
        with open(out) as f:
            rows.append(pair_row(model_dir, dtype, json.load(f)))

    measured = [r["dram_read_bytes_per_s"] for r in rows if r.get("dram_read_bytes_per_s")]
    bandwidth = max(measured) if measured else None
    if bandwidth is not None:
        add_bound_ratios(rows, bandwidth)
    meta = {"dram_read_bytes_per_s": bandwidth,
            "dram_read_range": [min(measured), max(measured)] if measured else [None, None],
            "cpu": cpu_model(), "isa": isa_flags(), "threads": args.threads, "repeats": args.repeats,
            "command": " ".join(["python", os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "wall_s": round(time.perf_counter() - started, 1), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    md = render(rows, skipped, meta)
    print("\n" + md)
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "throughput-matrix.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=1)
    with open(os.path.join(args.results_dir, "throughput-matrix.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
