"""What every engine runner shares: arguments, thread set-up, timing, result records.

Each runner is a script run in its own process by bench/throughput.py (so no two engines share
memory, OpenMP pools or threads), with the same command line:

    python bench/peers/<engine>.py --model DIR --workloads A.json [B.json ...] --out RESULT.json
        [--threads 2] [--kv-bytes N] [--warmup-requests 4] [engine options]

It loads the model once (timed as load_s, excluded from throughput), warms up on a few short
requests (warmup_s, excluded), then runs each workload once, timing from the first request
handed to the engine to the last token back. It writes one JSON object:

    {"engine": ..., "load_s": ..., "warmup_s": ..., "config": {...},
     "results": {workload_name: {elapsed_s, requests_per_s, output_tokens_per_s, ...}}}

This file must import without torch or the project (the vLLM runner uses it from .venv-vllm).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH_DIR not in sys.path:
    # For workload.py; appended, so installed modules come first.
    sys.path.append(BENCH_DIR)

from workload import Workload  # noqa: E402

DTYPES = ("float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workloads", nargs="+", required=True, help="workload JSON files (bench/workload.py)")
    ap.add_argument("--out", required=True, help="result JSON path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30, help="KV cache memory budget in bytes")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="longest prompt + output (the workloads cap there); vLLM refuses a KV budget "
                         "below one sequence of the checkpoint's own limit otherwise")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="weights, activations and KV cache of every engine")
    return ap


def set_threads(n: int) -> None:
    """Before torch is imported: pin the OpenMP/MKL pools to n threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def kv_bytes_per_token(model_dir: str, dtype: str = "float32") -> int:
    """KV cache bytes of one token over all layers: 2 (K, V) * layers * KV heads * head_dim * dtype bytes."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def load_workloads(paths: list[str]) -> list[Workload]:
    return [Workload.load(p) for p in paths]


def warmup_workload(wl: Workload, n: int) -> tuple[list[list[int]], list[int]]:
    """A few short requests from the workload itself (prompt and output capped at 32 tokens)."""
    n = max(1, min(n, wl.num_requests))
    return [p[:32] for p in wl.prompts[:n]], [min(8, o) for o in wl.output_lens[:n]]


def check_lengths(wl: Workload, outputs: list[list[int]]) -> None:
    if len(outputs) != wl.num_requests:
        raise RuntimeError(f"{wl.name}: got {len(outputs)} outputs for {wl.num_requests} requests")
    bad = [(i, len(o), L) for i, (o, L) in enumerate(zip(outputs, wl.output_lens)) if len(o) != L]
    if bad:
        raise RuntimeError(f"{wl.name}: {len(bad)} requests got the wrong number of tokens "
                           f"(index, got, wanted) e.g. {bad[:5]}")


def result_record(wl: Workload, elapsed_s: float, outputs: list[list[int]],
                  mean_kv_utilization: float | None = None, **extra: Any) -> dict[str, Any]:
    check_lengths(wl, outputs)
    out_tokens = sum(wl.output_lens)
    in_tokens = sum(wl.prompt_lens)
    rec = {
        "workload": wl.summary(),
        "elapsed_s": elapsed_s,
        "requests_per_s": wl.num_requests / elapsed_s,
        "output_tokens_per_s": out_tokens / elapsed_s,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed_s,
        "mean_kv_utilization": mean_kv_utilization,
        # every request's tokens: the benchmark compares them across engines (near-tie check)
        "sample_outputs": [list(map(int, o)) for o in outputs],
    }
    rec.update(extra)
    return rec


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def write_result(path: str, engine: str, load_s: float, warmup_s: float,
                 results: dict[str, Any], config: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"engine": engine, "load_s": load_s, "warmup_s": warmup_s,
                   "config": config, "results": results}, f, indent=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
