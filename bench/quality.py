"""Quality beside speed: the mean log-likelihood per token of a held-out text, per dtype.

A fast path that hurts the model (a dtype, weight-only int8, a GEMM kernel) lowers the
log-likelihood the model gives text it predicts well in float32. For the real default model
(make model) this scores one text with

- HF transformers in float32 (the reference) and in bfloat16 (what HF's own bf16 costs);
- our engine (its ModelRunner: paged KV, the attention backend and GEMM paths it picks on this
  host) in float32, bfloat16, and weight-only int8 with bf16 activations (``quantization: int8``),

each over the same windows of ``--window`` tokens (paged/scoring.py), and reports the mean
log-likelihood per token, its difference from HF float32, the perplexity, and the mean absolute
per-token log-probability difference from HF float32 (which a mean can hide).

The text: the docstrings (module, class, function) of a few standard-library modules of the running
interpreter, in a fixed order, cut at ``--max-tokens`` tokens: English prose about code, the same
on every run with the same Python, and nothing this repository tunes on.

    python bench/quality.py --model model-store/smollm2-135m-instruct

Writes bench/results/quality.json and prints a table. Timings are not measured here (see the
speed benchmarks); the figures do not depend on how busy the machine is.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paged.scoring import SequenceScorer, hf_token_logprobs  # noqa: E402

MODULES = ("textwrap", "shlex", "fractions", "heapq", "bisect", "difflib")
# (name, engine settings): our rows
OUR_ROWS = (("ours float32", dict(dtype="float32")),
            ("ours bfloat16", dict(dtype="bfloat16")),
            ("ours int8 (bf16 activations)", dict(dtype="bfloat16", quantization="int8")))


def held_out_text(modules=MODULES) -> str:
    """The docstrings of ``modules`` from this interpreter's standard library, in source order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in modules:
        tree = ast.parse((stdlib / f"{name}.py").read_text(encoding="utf-8"))
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc.strip())
    return "\n\n".join(dict.fromkeys(parts))  # a docstring repeated verbatim counts once


def summarize(name: str, logprobs: torch.Tensor, reference: torch.Tensor | None, seconds: float) -> dict:
    mean = logprobs.mean().item()
    row = {"name": name, "tokens": logprobs.numel(), "mean_loglik": mean, "perplexity": math.exp(-mean),
           "seconds": round(seconds, 1)}
    if reference is not None:
        row["delta_vs_hf_fp32"] = mean - reference.mean().item()
        row["mean_abs_token_diff"] = (logprobs - reference).abs().mean().item()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "model-store" / "smollm2-135m-instruct"))
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text scored (its start)")
    ap.add_argument("--window", type=int, default=512, help="tokens per scoring window (a fresh context each)")
    ap.add_argument("--skip-hf-bf16", action="store_true", help="leave out the HF bfloat16 row")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"model dir {args.model} not found (make model)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = held_out_text()
    token_ids = tokenizer(text).input_ids[:args.max_tokens]
    rows = []

    def hf_row(name, dtype, reference):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        logprobs = hf_token_logprobs(model, token_ids, args.window)
        rows.append(summarize(name, logprobs, reference, time.perf_counter() - started))
        return logprobs

    reference = hf_row("HF float32 (reference)", torch.float32, None)
    if not args.skip_hf_bf16:
        hf_row("HF bfloat16", torch.bfloat16, reference)
    for name, settings in OUR_ROWS:
        started = time.perf_counter()
        scorer = SequenceScorer(args.model, max_len=args.window, **settings)
        logprobs = scorer.token_logprobs(token_ids)
        row = summarize(name, logprobs, reference, time.perf_counter() - started)
        row["linear_backend"] = scorer.runner.model.linear_backend
        rows.append(row)
        del scorer

    print(f"Held-out text: docstrings of {', '.join(MODULES)} (Python {platform.python_version()}), "
          f"{len(token_ids)} tokens in windows of {args.window}; model {args.model}")
    print(f"{'':32} {'mean loglik/token':>18} {'vs HF fp32':>11} {'perplexity':>11} {'mean |Δ| per token':>19}")
    for row in rows:
        delta = f"{row['delta_vs_hf_fp32']:+.4f}" if "delta_vs_hf_fp32" in row else "-"
        diff = f"{row['mean_abs_token_diff']:.4f}" if "mean_abs_token_diff" in row else "-"
        print(f"{row['name']:32} {row['mean_loglik']:18.4f} {delta:>11} {row['perplexity']:11.3f} {diff:>19}")
    result = {"model": args.model, "text": {"modules": list(MODULES), "python": platform.python_version(),
                                           "tokens": len(token_ids), "window": args.window},
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
