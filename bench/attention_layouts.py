"""Paged vs contiguous KV on the CPU: the compiled attention kernel over the same K/V contents laid
out as paged blocks (block tables, blocks in shuffled order) and as contiguous slots.

The question (the vAttention paper, after the vLLM paper's own figure): does reading K/V through a
block table cost attention time, 20-26% on GPUs? Here both layouts run one kernel
(kernels/paged_kernels/csrc/paged_attention_cpu.cpp): the contiguous variant differs only in where
a key tile's rows start, so what differs is the addressing, the memory layout and the pages.
Layouts, all in anonymous memory from paged/os_memory.py:

- ``contiguous``: a paged/virtual_kv.py cache (one slot per sequence, all its layers adjacent), 4 KiB pages;
- ``contiguous THP``: the same on transparent huge pages (2 MiB);
- ``paged bs=N``: a block pool per layer, 4 KiB pages, for block sizes 8 (a key tile spans two
  blocks), 16 (the default), 32 and 128;
- ``paged bs=16 THP``: the default pool on huge pages, to tell the block table from TLB reach.

Each case is a batch (decode: one new token per sequence on ``kv`` keys; prefill: ``q`` new tokens
on ``kv`` keys) over ``--layers`` layer caches, as in an engine step: one "step" calls every layer
once, a call's time is the step's time / layers, and the figure is the median over interleaved
repeats (every layout once per repeat, in turn). Outputs are checked equal across layouts. A table
goes to stdout and JSON to ``bench/results/attention_layouts.json``. Indicative on a shared machine:
other processes' memory traffic and descheduling show up in every figure.

    python bench/attention_layouts.py                  # a few minutes of CPU
    python bench/attention_layouts.py --cpu-time       # 1 thread, CPU time: on a busy machine
    python bench/attention_layouts.py --smoke --out /tmp/a.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.attention_cpu import host_cpu  # noqa: E402
from paged.os_memory import AnonymousMapping, huge_page_bytes_of_host, transparent_huge_page_mode  # noqa: E402
from paged.virtual_kv import VirtualKVCache  # noqa: E402
from paged_kernels import cpu_extension  # noqa: E402
from paged_kernels.torch_impl import torch_contiguous_attention, torch_paged_attention  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "attention_layouts.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK_SIZES = (8, 16, 32, 128)


def cases(smoke: bool) -> list[tuple[str, list[int], list[int]]]:
    """(name, q_lens, kv_lens)."""
    if smoke:
        return [("decode b2 kv40", [1, 1], [40, 33]), ("prefill 24 on 40", [24], [40])]
    out = []
    for kv in (256, 1024, 2048):
        for batch in (1, 8, 32):
            out.append((f"decode b{batch} kv{kv}", [1] * batch, [kv] * batch))
    out.append(("decode b64 kv512", [1] * 64, [512] * 64))
    out.append(("fresh prefill 1x512", [512], [512]))
    out.append(("fresh prefill 4x256", [256] * 4, [256] * 4))
    out.append(("chunked prefill 512 on 2048", [512], [2048]))
    return out


def layouts(huge_pages: bool) -> list[tuple[str, str, int, bool]]:
    """(name, kind, block_size, huge pages)."""
    out = [("contiguous", "contiguous", 0, False)]
    if huge_pages:
        out.append(("contiguous THP", "contiguous", 0, True))
    out += [(f"paged bs={bs}", "paged", bs, False) for bs in BLOCK_SIZES]
    if huge_pages:
        out.append(("paged bs=16 THP", "paged", 16, True))
    return out


def anonymous_tensor(shape, dtype, huge_pages: bool) -> torch.Tensor:
    """A zero tensor in a fresh anonymous mapping (on huge pages if asked), as the contiguous caches are."""
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    alignment = huge_page_bytes_of_host() if huge_pages else None
    mapping = AnonymousMapping(size, alignment=alignment, huge_pages=huge_pages)
    return mapping.tensor().view(dtype).view(shape)


def build(q_lens, kv_lens, args, seed: int) -> dict:
    """Queries, the contents (per layer, per sequence) and every layout's caches and metadata."""
    g = torch.Generator().manual_seed(seed)
    dtype, num_seqs, max_kv = DTYPES[args.dtype], len(kv_lens), max(kv_lens)
    kv_shape = (args.num_kv_heads, args.head_dim)
    contents = [[(torch.rand((kv, *kv_shape), generator=g) - 0.5).to(dtype) for kv in kv_lens]
                for _ in range(2 * args.layers)]  # K of layer l at 2l, V at 2l + 1
    built = {"queries": [torch.randn(sum(q_lens), args.num_heads, args.head_dim, generator=g).to(dtype)
                         for _ in range(args.layers)],
             "seq_lens": torch.tensor(kv_lens, dtype=torch.int32),
             "query_start_loc": torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
             "layouts": {}}
    for name, kind, block_size, huge in layouts(args.huge_pages):
        if kind == "contiguous":
            cache = VirtualKVCache(args.layers, *kv_shape, dtype, num_seqs, max_kv, huge_pages=huge)
            slots = [cache.allocate() for _ in range(num_seqs)]
            for seq, slot in enumerate(slots):
                cache.reserve(slot, kv_lens[seq])
                for layer in range(args.layers):
                    cache.key_caches[layer][slot, :kv_lens[seq]] = contents[2 * layer][seq]
                    cache.value_caches[layer][slot, :kv_lens[seq]] = contents[2 * layer + 1][seq]
            built["layouts"][name] = (kind, list(zip(cache.key_caches, cache.value_caches)),
                                      torch.tensor(slots, dtype=torch.int32), cache)
            continue
        needed = [-(-kv // block_size) for kv in kv_lens]
        num_blocks = sum(needed)
        order = torch.randperm(num_blocks, generator=g).tolist()  # a long-running pool: blocks anywhere
        tables = torch.zeros(num_seqs, max(needed), dtype=torch.int32)
        start = 0
        for seq in range(num_seqs):
            tables[seq, :needed[seq]] = torch.tensor(order[start:start + needed[seq]], dtype=torch.int32)
            start += needed[seq]
        caches = []
        for layer in range(args.layers):
            pair = []
            for kv in (0, 1):
                pool = anonymous_tensor((num_blocks, block_size, *kv_shape), dtype, huge)
                for seq, kv_len in enumerate(kv_lens):
                    padded = torch.zeros((needed[seq] * block_size, *kv_shape), dtype=dtype)
                    padded[:kv_len] = contents[2 * layer + kv][seq]
                    pool[tables[seq, :needed[seq]].long()] = padded.view(needed[seq], block_size, *kv_shape)
                pair.append(pool)
            caches.append(tuple(pair))
        built["layouts"][name] = (kind, caches, tables, None)
    return built


def step(built: dict, layout: str, scale: float) -> torch.Tensor:
    """One engine step's attention over every layer; returns the last layer's output."""
    kind, caches, index, _ = built["layouts"][layout]
    attention = torch_contiguous_attention if kind == "contiguous" else torch_paged_attention
    workspace: dict = {}
    out = None
    for query, (key_cache, value_cache) in zip(built["queries"], caches):
        out = attention(query, key_cache, value_cache, index, built["seq_lens"], built["query_start_loc"], scale,
                        workspace)
    return out


def time_layouts(built: dict, scale: float, repeats: int, num_layers: int, clock) -> dict[str, float]:
    """Median over interleaved repeats of one step, in microseconds per layer call."""
    names = list(built["layouts"])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        step(built, name, scale)
    for repeat in range(repeats):
        # Rotate the order so no layout always runs right after the same neighbour.
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = clock()
            step(built, name, scale)
            samples[name].append((clock() - start) * 1e6 / num_layers)
    return {name: statistics.median(values) for name, values in samples.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="1 thread, timed by the thread's CPU time (other processes' time is not counted)")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="leave out the THP layouts (they are left out anyway where THP is off)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT}; none with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats: checks the script only")
    args = p.parse_args(argv)
    args.huge_pages = args.huge_pages and transparent_huge_page_mode() != "never"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.cpu_time:
        torch.set_num_threads(1 if args.cpu_time else args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    repeats = 2 if args.smoke else args.repeats
    if cpu_extension.load() is None:
        print("bench/attention_layouts.py: the compiled CPU kernels could not be built here; nothing to compare")
        return 1
    names = [name for name, *_ in layouts(args.huge_pages)]
    load_before = os.getloadavg()
    print(f"host: {host_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, load average "
          f"{load_before[0]:.2f}; THP {transparent_huge_page_mode()}; {args.dtype}, {args.num_heads} heads / "
          f"{args.num_kv_heads} KV heads, head_dim {args.head_dim}, {args.layers} layers; median of {repeats}; "
          f"{'CPU time' if args.cpu_time else 'wall clock'}, us per layer call")
    header = f"{'case':28}" + "".join(f"{name:>16}" for name in names) + f"{'paged16/contig':>15}"
    print(header)
    print("-" * len(header))
    rows = []
    scale = args.head_dim ** -0.5
    with torch.inference_mode():
        for index, (case, q_lens, kv_lens) in enumerate(cases(args.smoke)):
            built = build(q_lens, kv_lens, args, seed=index)
            outputs = {name: step(built, name, scale) for name in names}
            identical = all(torch.equal(outputs[names[0]], out) for out in outputs.values())
            times = time_layouts(built, scale, repeats, args.layers, clock)
            overhead = times["paged bs=16"] / times["contiguous"] - 1
            rows.append(dict(case=case, num_seqs=len(q_lens), total_q=sum(q_lens), max_kv=max(kv_lens),
                             us_per_layer={name: round(t, 1) for name, t in times.items()},
                             paged16_over_contiguous=round(overhead, 4), outputs_identical=identical))
            print(f"{case:28}" + "".join(f"{times[name]:16.1f}" for name in names) + f"{100 * overhead:+14.1f}%"
                  + ("" if identical else "  OUTPUTS DIFFER"))
            del built
    report = dict(host_cpu=host_cpu(), threads=torch.get_num_threads(), torch=torch.__version__,
                  clock="thread CPU time" if args.cpu_time else "wall clock", statistic="median",
                  load_average_before=load_before, load_average_after=os.getloadavg(), repeats=repeats,
                  transparent_huge_pages=transparent_huge_page_mode(),
                  shapes=dict(layers=args.layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                              head_dim=args.head_dim, dtype=args.dtype),
                  layouts=names, results=rows)
    out = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if all(row["outputs_identical"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
