"""What the throughput benchmark derives after the runs: near-tie checks of greedy disagreements,
the memory-bandwidth bound of batch-1 decode, and the bar chart.

Imported by bench/throughput.py in the benchmark's own process (torch and transformers are
loaded lazily, only when the analysis runs).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the two token lists differ, or None when equal."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


class TieChecker:
    """HF transformers' logits at a divergence point: how far apart are its top-2 tokens?"""

    def __init__(self, model_dir: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def top2_gap(self, prompt: list[int], generated_prefix: list[int]) -> float:
        ids = self.torch.tensor([prompt + generated_prefix])
        with self.torch.inference_mode():
            logits = self.model(ids).logits[0, -1].float()
        top = logits.topk(2).values
        return float(top[0] - top[1])


def compare_greedy(checker: TieChecker | None, prompts: list[list[int]], ours: list[list[int]],
                   peer: list[list[int]], near_tie_gap: float) -> dict:
    """Sequences where a peer's greedy tokens differ from ours, and whether each first differs at
    a numerical near-tie (HF's top-2 logit gap below ``near_tie_gap`` at that position)."""
    differing = []
    for index, (mine, theirs) in enumerate(zip(ours, peer)):
        position = first_difference(mine, theirs)
        if position is None:
            continue
        gap = checker.top2_gap(prompts[index], mine[:position]) if checker else None
        differing.append({"request": index, "position": position, "hf_top2_gap": gap})
    near = [d for d in differing if d["hf_top2_gap"] is not None and d["hf_top2_gap"] < near_tie_gap]
    return {"compared": min(len(ours), len(peer)), "differing": len(differing), "near_ties": len(near),
            "not_near_ties": len(differing) - len(near), "details": differing[:20]}


def dram_read_bandwidth(threads: int, size_bytes: int = 2 << 30, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (sum) over a buffer far larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    del buffer
    return size_bytes / best


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def decode_weight_bytes(model_dir: str, dtype: str = "float32", quantization: str | None = None) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row of it
    is read) unless the LM head is tied to it (then it is read whole, as the LM head). Elements
    are `dtype`'s size; with weight-only int8, every Linear's weight (the LM head too) is one byte."""
    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                if name.endswith("embed_tokens.weight") and not tied:
                    continue
                tensor = reader.get_slice(name)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                # every Linear (projections and the LM head, tied or not) holds int8 weights
                int8 = quantization == "int8" and name.endswith(("proj.weight", "lm_head.weight",
                                                                 "embed_tokens.weight"))
                total += count * (1 if int8 else DTYPE_BYTES[dtype])
    return total


def bar_chart(summary: dict, labels: dict[str, str], engines: list[str], path: str, title: str) -> str | None:
    """Grouped bars of output tokens/s per workload and engine; returns the path, or None when
    matplotlib is missing (the table and JSON are written regardless)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    workloads = list(summary)
    shown = [e for e in engines if any(e in summary[w] for w in workloads)]
    if not workloads or not shown:
        return None
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(workloads)), 4))
    for offset, engine in enumerate(shown):
        values = [summary[w].get(engine, {}).get("output_tokens_per_s") or 0.0 for w in workloads]
        xs = [i + offset * width - 0.4 + width / 2 for i in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=labels[engine])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
