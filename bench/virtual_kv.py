"""The OS side of virtual-contiguous KV (paged/virtual_kv.py): what committing pages on write costs,
eager vs deferred reclamation, base vs huge pages, and the memory each page size wastes.

1. Churn: ``--sequences`` sequences in turn, ``--concurrent`` of them live at a time; each reserves
   ``--tokens`` tokens, writes them (one copy per layer's K and V: the memory traffic of its
   prefill and decode writes without the engine's per-step overhead, which is the same in every
   configuration) and is released. Configurations: eager reclaim (MADV_DONTNEED at every release:
   each new sequence faults its pages in again, zeroed by the kernel) vs deferred reclaim (released
   slots stay warm and the next sequence reuses their pages), each on 4 KiB pages and on
   transparent huge pages. Reported: the thread's CPU time (user + system: page faults and zeroing
   count, other processes do not) per sequence and per token, minor page faults per sequence
   (getrusage: the whole process, which does nothing else meanwhile), and the memory still
   resident at the end (what deferral holds on to). Median of interleaved repeats.
2. Granularity: for a set of sequences with lognormal lengths, the KV memory committed (4 KiB
   pages, 2 MiB pages, paged blocks of 16 and 128 tokens) against the bytes the tokens need.

A table goes to stdout, JSON to ``bench/results/virtual_kv.json``. Indicative on a shared machine.

    python bench/virtual_kv.py
    python bench/virtual_kv.py --smoke --out /tmp/v.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paged.os_memory import base_page_bytes, huge_page_bytes_of_host, transparent_huge_page_mode  # noqa: E402
from paged.virtual_kv import VirtualKVCache  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "virtual_kv.json"
LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 8, 2, 64, torch.float32  # the default model's KV


def configurations(huge_pages: bool) -> list[tuple[str, bool, bool]]:
    """(name, huge pages, deferred reclaim)."""
    out = [("eager 4K", False, False), ("deferred 4K", False, True)]
    if huge_pages:
        out += [("eager THP", True, False), ("deferred THP", True, True)]
    return out


def churn(cache: VirtualKVCache, args, tokens: torch.Tensor) -> tuple[float, int]:
    """Runs the sequences through the cache; returns (thread CPU seconds, minor faults)."""
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.thread_time()
    live: list[int] = []
    for _ in range(args.sequences):
        if len(live) == args.concurrent:
            cache.release(live.pop(0))
        slot = cache.allocate()
        live.append(slot)
        cache.reserve(slot, args.tokens)
        for layer in range(cache.num_layers):
            cache.key_caches[layer][slot, :args.tokens] = tokens
            cache.value_caches[layer][slot, :args.tokens] = tokens
    for slot in live:
        cache.release(slot)
    return time.thread_time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before


def measure_churn(args) -> list[dict]:
    tokens = torch.randn(args.tokens, KV_HEADS, HEAD_DIM).to(DTYPE)
    configs = configurations(args.huge_pages)
    caches = {name: VirtualKVCache(LAYERS, KV_HEADS, HEAD_DIM, DTYPE, args.concurrent, args.tokens,
                                   huge_pages=huge, deferred_reclaim=deferred) for name, huge, deferred in configs}
    samples = {name: [] for name, *_ in configs}
    for repeat in range(args.repeats + 1):  # the first round warms up (and fills the deferred pools)
        for name, *_ in configs[repeat % len(configs):] + configs[:repeat % len(configs)]:
            seconds, faults = churn(caches[name], args, tokens)
            if repeat:
                samples[name].append((seconds, faults))
    rows = []
    for name, huge, deferred in configs:
        seconds = statistics.median(s for s, _ in samples[name])
        faults = statistics.median(f for _, f in samples[name])
        rows.append(dict(config=name, huge_pages=huge, deferred_reclaim=deferred,
                         us_per_sequence=round(seconds * 1e6 / args.sequences, 1),
                         ns_per_token=round(seconds * 1e9 / (args.sequences * args.tokens), 1),
                         faults_per_sequence=round(faults / args.sequences, 1),
                         resident_after_bytes=caches[name].resident_bytes()))
    return rows


def granularity(args) -> list[dict]:
    """Committed KV bytes vs needed bytes for lognormal lengths, per allocation unit."""
    g = torch.Generator().manual_seed(0)
    lengths = [max(1, min(4096, round(math.exp(x)))) for x in
               (torch.randn(args.granularity_seqs, generator=g) * 0.8 + math.log(args.median_len)).tolist()]
    token_bytes = KV_HEADS * HEAD_DIM * torch.empty((), dtype=DTYPE).element_size()  # per layer, K or V
    regions = 2 * LAYERS
    needed = regions * token_bytes * sum(lengths)
    units = [("4 KiB pages", base_page_bytes())]
    if huge_page_bytes_of_host():
        units.append(("2 MiB pages", huge_page_bytes_of_host()))
    units += [("paged blocks of 16", 16 * token_bytes), ("paged blocks of 128", 128 * token_bytes)]
    rows = []
    for name, unit in units:
        committed = regions * sum(-(-n * token_bytes // unit) * unit for n in lengths)
        rows.append(dict(unit=name, unit_bytes=unit, needed_bytes=needed, committed_bytes=committed,
                         waste_fraction=round(committed / needed - 1, 4)))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--tokens", type=int, default=300, help="tokens each sequence writes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--granularity-seqs", type=int, default=256)
    p.add_argument("--median-len", type=int, default=300)
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT}; none with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        args.sequences, args.concurrent, args.tokens, args.repeats = 6, 2, 25, 1
        args.granularity_seqs = 16
    args.huge_pages = args.huge_pages and transparent_huge_page_mode() != "never"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    print(f"{LAYERS} layers x {KV_HEADS} KV heads x head_dim {HEAD_DIM}, fp32; THP {transparent_huge_page_mode()}; "
          f"load average {load_before[0]:.2f}")
    print(f"churn: {args.sequences} sequences of {args.tokens} tokens, {args.concurrent} live at a time; "
          f"thread CPU time, median of {args.repeats}")
    with torch.inference_mode():
        churn_rows = measure_churn(args)
    print(f"{'config':14} {'us/sequence':>12} {'ns/token':>9} {'faults/seq':>11} {'resident after':>15}")
    for row in churn_rows:
        print(f"{row['config']:14} {row['us_per_sequence']:12.1f} {row['ns_per_token']:9.1f} "
              f"{row['faults_per_sequence']:11.1f} "
              f"{row['resident_after_bytes'] / 2**20:12.1f} MiB")
    granularity_rows = granularity(args)
    print(f"granularity: {args.granularity_seqs} sequences, lognormal lengths around {args.median_len}")
    print(f"{'unit':20} {'committed MiB':>14} {'needed MiB':>11} {'waste':>7}")
    for row in granularity_rows:
        print(f"{row['unit']:20} {row['committed_bytes'] / 2**20:14.1f} {row['needed_bytes'] / 2**20:11.1f} "
              f"{100 * row['waste_fraction']:6.1f}%")
    report = dict(shapes=dict(layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float32"),
                  transparent_huge_pages=transparent_huge_page_mode(), threads=torch.get_num_threads(),
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  churn=dict(sequences=args.sequences, concurrent=args.concurrent, tokens=args.tokens,
                             clock="thread CPU time", repeats=args.repeats, results=churn_rows),
                  granularity=dict(sequences=args.granularity_seqs, median_len=args.median_len,
                                   results=granularity_rows))
    out = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
