"""Paged-attention overhead: the Triton kernel vs torch SDPA on the same K/V stored contiguously.

For every (batch, context length, block size) it times, on a CUDA GPU:

- decode: one new token per sequence attending to ``context`` cached tokens;
- prefill: ``context`` new tokens per sequence, causal (skipped above ``--max-prefill-tokens``);

once through ``triton_paged_attention`` reading K/V through shuffled block tables, once through
``torch.nn.functional.scaled_dot_product_attention`` on dense [batch, kv_heads, context,
head_dim] K/V (``enable_gqa``), and reports ``paged_overhead = triton_ms / sdpa_ms`` (below 1:
the paged kernel is faster), the decode K/V read bandwidth, the split-K factor the launcher
chose and the largest difference between the two outputs. A table goes to stdout and JSON to
``bench/results/triton_kernels.json``.

Without a CUDA GPU it says so and exits 0: the Triton interpreter is no performance model.
``--smoke`` runs tiny shapes through the interpreter on CPU to check the script itself
(its timings mean nothing and nothing is written unless ``--out`` is given).

    python bench/triton_kernels.py                       # defaults: Llama-3-8B-like heads, bf16
    python bench/triton_kernels.py --batches 1,32 --contexts 1024,8192 --block-sizes 16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "triton_kernels.json"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=_ints, default=[1, 8, 32])
    p.add_argument("--contexts", type=_ints, default=[512, 2048, 8192])
    p.add_argument("--block-sizes", type=_ints, default=[16, 32, 128])
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--max-prefill-tokens", type=int, default=65536,
                   help="skip prefill where batch * context exceeds this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes through the Triton interpreter on CPU (checks the script only)")
    if p.parse_args(argv).smoke:  # tiny defaults; explicit options still win
        p.set_defaults(batches=[1, 2], contexts=[40], block_sizes=[16], num_heads=4, num_kv_heads=2,
                       head_dim=64, dtype="fp32")
    return p.parse_args(argv)


def build_case(torch, batch: int, context: int, block_size: int, args, device):
    """Dense K/V [B, KVH, L, D] and the same tokens in a paged pool with shuffled blocks."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    g_dev = torch.Generator(device=device).manual_seed(args.seed)
    dtype = getattr(torch, DTYPES[args.dtype])
    kvh, d = args.num_kv_heads, args.head_dim
    k_dense = torch.randn(batch, kvh, context, d, generator=g_dev, device=device).to(dtype)
    v_dense = torch.randn(batch, kvh, context, d, generator=g_dev, device=device).to(dtype)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, generator=g).view(batch, blocks_per_seq)
    key_cache = torch.zeros(num_blocks, block_size, kvh, d, device=device, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    padded = blocks_per_seq * block_size
    for cache, dense in ((key_cache, k_dense), (value_cache, v_dense)):
        tokens = torch.zeros(batch, padded, kvh, d, device=device, dtype=dtype)
        tokens[:, :context] = dense.transpose(1, 2)
        cache[block_tables.flatten().to(device)] = tokens.view(num_blocks, block_size, kvh, d)
    block_tables = block_tables.to(device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    return k_dense, v_dense, key_cache, value_cache, block_tables, seq_lens


def make_timer(torch, device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_time


def run_one(torch, phase: str, batch: int, context: int, block_size: int, args, device, timer):
    from paged_kernels.triton_attention import plan_launch, triton_paged_attention

    F = torch.nn.functional
    k_dense, v_dense, key_cache, value_cache, block_tables, seq_lens = build_case(
        torch, batch, context, block_size, args, device)
    h, d = args.num_heads, args.head_dim
    q_len = 1 if phase == "decode" else context
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    q_dense = torch.randn(batch, h, q_len, d, generator=g, device=device).to(k_dense.dtype)
    query = q_dense.transpose(1, 2).reshape(batch * q_len, h, d).contiguous()
    query_start_loc = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
    scale = d ** -0.5

    def paged():
        return triton_paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                      query_start_loc, scale)

    def dense():
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, is_causal=phase == "prefill",
                                              scale=scale, enable_gqa=h != args.num_kv_heads)

    out_paged = paged().view(batch, q_len, h, d).transpose(1, 2)
    max_diff = (out_paged.float() - dense().float()).abs().max().item()
    triton_ms, sdpa_ms = timer(paged), timer(dense)
    plan = plan_launch(batch * q_len, batch, h, args.num_kv_heads, d, block_size,
                       block_tables.shape[1], device)
    row = dict(phase=phase, batch=batch, context=context, block_size=block_size,
               triton_ms=triton_ms, sdpa_ms=sdpa_ms, paged_overhead=triton_ms / sdpa_ms,
               num_splits=plan.num_splits, max_abs_diff=max_diff)
    if phase == "decode":
        kv_bytes = 2 * batch * context * args.num_kv_heads * d * k_dense.element_size()
        row["triton_kv_gbps"] = kv_bytes / triton_ms / 1e6
    return row


def print_table(rows) -> None:
    header = (f"{'phase':<8}{'batch':>6}{'context':>9}{'block':>7}{'triton ms':>11}{'sdpa ms':>10}"
              f"{'overhead':>10}{'splits':>8}{'KV GB/s':>9}{'max diff':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gbps = f"{r['triton_kv_gbps']:.0f}" if "triton_kv_gbps" in r else "-"
        print(f"{r['phase']:<8}{r['batch']:>6}{r['context']:>9}{r['block_size']:>7}{r['triton_ms']:>11.4f}"
              f"{r['sdpa_ms']:>10.4f}{r['paged_overhead']:>10.2f}{r['num_splits']:>8}{gbps:>9}"
              f"{r['max_abs_diff']:>10.2e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(ROOT))
    import torch

    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench/triton_kernels.py: no CUDA GPU here; the Triton kernels can only be timed on a GPU "
              "(the interpreter is no performance model). Nothing measured.")
        return 0

    timer = make_timer(torch, device)
    rows = []
    for block_size in args.block_sizes:
        for context in args.contexts:
            for batch in args.batches:
                rows.append(run_one(torch, "decode", batch, context, block_size, args, device, timer))
                if batch * context <= args.max_prefill_tokens:
                    rows.append(run_one(torch, "prefill", batch, context, block_size, args, device, timer))
    rows.sort(key=lambda r: (r["phase"], r["batch"], r["context"], r["block_size"]))
    print_table(rows)

    import triton

    report = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke run)",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        dtype=args.dtype, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        timing=("triton.testing.do_bench median, warmup 25 ms, rep 100 ms" if device.type == "cuda"
                else "one perf_counter run after one warm-up (smoke run: meaningless)"),
        paged_overhead="triton_ms / sdpa_ms on the same K/V stored contiguously",
        results=rows,
    )
    out = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
