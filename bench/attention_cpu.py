"""CPU paged attention: the plain-torch path vs the compiled kernel, on a model's shapes.

By default the test model's attention (tiny-llama: 8 heads, 2 KV heads, head_dim 64, block 16,
fp32, 8 layers); ``--shape smollm2-135m --dtype bfloat16`` is the default model as served (30
layers, 9 heads over 3 KV heads), ``--shape qwen2-0.5b`` the 0.5 B-class one (24 layers, 14 over
2). Each case is a batch of sequences (new tokens ``q_len`` on ``kv_len`` keys, shuffled block
tables) over separate layer caches, as in an engine step: one "step" calls every layer once with
one workspace, and a call's time is the step's time / layers (min over interleaved repeats). Cases:

- decode: 1 / 8 / 64 / 256 sequences, lengths lognormal around a median of 80 and of 250 tokens;
- prefill over a cached prefix (chunked prefill), a fresh prefill, and a mixed decode+prefill step;
- per-layer cost of the whole attention path at small batch (write_kv_cache + paged_attention).

For each: microseconds per call, the K/V bytes a call must read (each sequence's exact length,
K and V once) per second, against the DRAM read bandwidth measured here at the start (a sum over
a 512 MiB tensor), and the largest difference between the two paths' outputs. Small batches fit
in the caches (8 layers of K/V of one 250-token sequence are 2 MiB), so they can exceed the DRAM
figure; from 64 sequences on, K/V come from DRAM. A table goes to stdout, JSON to
``bench/results/attention_cpu.json``, with the host CPU, threads and load average: figures taken
while other work runs are noisy (2 threads suffer most: one descheduled thread stalls both).

    python bench/attention_cpu.py                 # about a minute of CPU
    python bench/attention_cpu.py --repeats 11 --threads 2
    python bench/attention_cpu.py --cpu-time      # 1 thread, CPU time: on a busy machine
    python bench/attention_cpu.py --shape smollm2-135m --dtype bfloat16 --out /tmp/smollm2.json
    python bench/attention_cpu.py --smoke --out /tmp/a.json   # tiny shapes: checks the script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paged_kernels import cpu_extension  # noqa: E402
from paged_kernels.torch_impl import (plain_paged_attention, plain_write_kv_cache, torch_paged_attention,  # noqa: E402
                                torch_write_kv_cache)

DEFAULT_OUT = ROOT / "bench" / "results" / "attention_cpu.json"


class Shape(NamedTuple):
    """One model's attention: layers, query and KV heads, head dim; the engine's block size."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 64
    block_size: int = 16


SHAPES = {
    "tiny-llama": Shape(num_layers=8, num_heads=8, num_kv_heads=2),       # model-store/tiny-llama
    "smollm2-135m": Shape(num_layers=30, num_heads=9, num_kv_heads=3),    # the default model
    "qwen2-0.5b": Shape(num_layers=24, num_heads=14, num_kv_heads=2),     # bench-qwen2-0.5b
}
TINY = SHAPES["tiny-llama"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lognormal_lengths(count: int, median: int, seed: int, sigma: float = 0.6, cap: int = 2048) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(count, generator=g) * sigma + math.log(median)
    return [int(min(cap, max(1, round(math.exp(x))))) for x in draws.tolist()]


def cases(smoke: bool) -> list[tuple[str, list[int], list[int]]]:
    """(name, q_lens, kv_lens)."""
    if smoke:
        return [("decode b2 kv~20", [1, 1], lognormal_lengths(2, 20, 0)),
                ("chunked prefill 8 on 24", [8], [32])]
    out = []
    for median in (80, 250):
        for batch in (1, 8, 64, 256):
            out.append((f"decode b{batch} kv~{median}", [1] * batch, lognormal_lengths(batch, median, batch + median)))
    out.append(("prefix prefill 4x64 on 256", [64] * 4, [320] * 4))
    out.append(("chunked prefill 512 on 512", [512], [1024]))
    out.append(("fresh prefill 1x128", [128], [128]))
    out.append(("fresh prefill 8x64", [64] * 8, [64] * 8))
    out.append(("fresh prefill 1x512", [512], [512]))
    decode = lognormal_lengths(64, 250, 7)
    out.append(("mixed 64 decode + 2x128 prefill", [1] * 64 + [128, 128], decode + [128, 384]))
    return out


def build_layers(q_lens, kv_lens, seed: int, dtype=torch.float32, shape: Shape = TINY):
    """Per-layer caches, shared block tables (blocks in shuffled order), queries, new K/V, slots."""
    BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, NUM_HEADS = shape.block_size, shape.num_kv_heads, shape.head_dim, shape.num_heads
    g = torch.Generator().manual_seed(seed)
    needed = [-(-kv // BLOCK_SIZE) for kv in kv_lens]
    num_blocks = sum(needed) + 1
    order = torch.randperm(num_blocks, generator=g)
    width = max(needed)
    tables = torch.zeros(len(kv_lens), width, dtype=torch.int32)
    slots, start = [], 0
    for seq, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        blocks = order[start:start + needed[seq]]
        start += needed[seq]
        tables[seq, :len(blocks)] = blocks.to(torch.int32)
        slots += [int(blocks[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(kv - q, kv)]
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    num_tokens = sum(q_lens)
    layers = []
    for _ in range(shape.num_layers):
        layers.append(dict(
            key_cache=torch.rand(cache_shape, generator=g, dtype=dtype) - 0.5,
            value_cache=torch.rand(cache_shape, generator=g, dtype=dtype) - 0.5,
            # A view into a fused QKV projection, as the model passes it.
            qkv=torch.randn(num_tokens, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, generator=g, dtype=dtype),
        ))
    meta = dict(block_tables=tables, seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
                query_start_loc=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32),
                slot_mapping=torch.tensor(slots, dtype=torch.long), shape=shape)
    return layers, meta


def step(attention, write, layers, meta, with_write: bool):
    """One engine step's attention over every layer; returns the last layer's output."""
    workspace: dict = {}
    out = None
    for layer in layers:
        qkv = layer["qkv"]
        shape = meta["shape"]
        q, k, v = qkv.split([shape.num_heads, shape.num_kv_heads, shape.num_kv_heads], dim=1)
        if with_write:
            write(k, v, layer["key_cache"], layer["value_cache"], meta["slot_mapping"])
        out = attention(q, layer["key_cache"], layer["value_cache"], meta["block_tables"], meta["seq_lens"],
                        meta["query_start_loc"], shape.head_dim ** -0.5, workspace)
    return out


def compiled_attention(*args):
    return torch_paged_attention(*args)


def time_variants(variants: dict, layers, meta, repeats: int, with_write: bool, clock=time.perf_counter) -> dict[str, float]:
    """Min over interleaved repeats of one step, in microseconds per layer call."""
    best = {name: float("inf") for name in variants}
    for name, (attention, write) in variants.items():  # warm-up (and first-call plans)
        step(attention, write, layers, meta, with_write)
    for _ in range(repeats):
        for name, (attention, write) in variants.items():
            start = clock()
            step(attention, write, layers, meta, with_write)
            best[name] = min(best[name], (clock() - start) * 1e6 / len(layers))
    return best


def dram_read_gbps(mib: int, repeats: int = 3) -> float:
    x = torch.ones(mib * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shape", default="tiny-llama", choices=sorted(SHAPES), help="whose attention (heads, layers)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the K/V cache and query dtype")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT}; none with --smoke)")
    p.add_argument("--cpu-time", action="store_true",
                   help="1 thread, timed by the thread's CPU time: comparable figures on a busy machine "
                        "(other processes' time is not counted; their memory traffic still is)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat: checks the script only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.cpu_time:
        torch.set_num_threads(1 if args.cpu_time else args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    repeats = 1 if args.smoke else args.repeats
    if cpu_extension.load() is None:
        print("bench/attention_cpu.py: the compiled CPU kernels could not be built here (see the log line); "
              "nothing to compare")
        return 1
    shape = SHAPES[args.shape]
    load_before = os.getloadavg()
    dram = dram_read_gbps(16 if args.smoke else 512)
    variants = {"plain": (plain_paged_attention, plain_write_kv_cache),
                "compiled": (compiled_attention, torch_write_kv_cache)}
    rows = []
    print(f"host: {host_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {load_before[0]:.2f}; DRAM read {dram:.1f} GB/s; timed by "
          f"{'CPU time' if args.cpu_time else 'wall clock'}")
    header = f"{'case':34} {'what':10} {'plain us':>10} {'compiled us':>12} {'speedup':>8} {'GB/s':>7} {'% DRAM':>7} {'max diff':>9}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for index, (name, q_lens, kv_lens) in enumerate(cases(args.smoke)):
            layers, meta = build_layers(q_lens, kv_lens, seed=index, dtype=DTYPES[args.dtype], shape=shape)
            diff = (step(*variants["plain"], layers, meta, False).float()
                    - step(*variants["compiled"], layers, meta, False).float()).abs().max().item()
            whats = ["attention"] + (["layer"] if max(q_lens) == 1 and len(q_lens) <= 8 else [])
            for what in whats:
                times = time_variants(variants, layers, meta, repeats, with_write=what == "layer", clock=clock)
                kv_bytes = sum(kv_lens) * shape.num_kv_heads * shape.head_dim * DTYPES[args.dtype].itemsize * 2
                gbps = kv_bytes / (times["compiled"] * 1e-6) / 1e9
                row = dict(case=name, what=what, num_seqs=len(q_lens), total_q=sum(q_lens), total_kv=sum(kv_lens),
                           max_kv=max(kv_lens), plain_us=round(times["plain"], 1),
                           compiled_us=round(times["compiled"], 1), speedup=round(times["plain"] / times["compiled"], 2),
                           kv_gbps=round(gbps, 2), dram_fraction=round(gbps / dram, 3), max_abs_diff=diff)
                rows.append(row)
                print(f"{name:34} {what:10} {row['plain_us']:10.1f} {row['compiled_us']:12.1f} {row['speedup']:7.2f}x "
                      f"{gbps:7.2f} {100 * gbps / dram:6.1f}% {diff:9.1e}")
    report = dict(host_cpu=host_cpu(), threads=torch.get_num_threads(), torch=torch.__version__,
                  clock="thread CPU time" if args.cpu_time else "wall clock",
                  load_average_before=load_before, load_average_after=os.getloadavg(), dram_read_gbps=round(dram, 2),
                  repeats=repeats, layers=shape.num_layers, shape_name=args.shape,
                  shapes=dict(num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                              block_size=shape.block_size, dtype=args.dtype),
                  results=rows)
    out = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
