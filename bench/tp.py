"""Tensor parallel on this machine: TP = N ranks vs the same model in one process.

Two measurements. (1) The engine end to end: ``LLM(tensor_parallel_size=N)`` against
``LLM(tensor_parallel_size=1)`` on a small seeded workload (``bench/workload.py``, greedy, EOS
ignored, the same number of KV blocks for both, prefix caching off): output tokens/s, how many
greedy outputs equal TP=1's, and for the TP engine where its steps' time went (the split below,
per engine step). (2) The model's step time (decode at several batch sizes over a fixed context,
and one long prefill) with the unsharded model in this process (``--threads`` torch threads) and
with torchrun groups of ``--tp`` ranks (cores / N threads each; one group all-reduces through
shared memory, the other through gloo), driven through the same step inputs. For a group it splits
each step into: plan broadcast (engine pickles and writes the plan), channel (all engine-side time
that no rank's step accounts for: the broadcast, delivery and unpickling, wake-ups, the answers'
trip back), all-reduce (time the ranks spend inside the 2 x layers + 1 all-reduces, which
includes waiting for the slower rank) and logits gather (engine copies the assembled logits out).
On a 2-core CPU this is the overhead of tensor parallelism, not its scaling: both variants share
the same cores and DRAM.

Variants are interleaved per repeat (the machine is noisy); the table shows medians over repeats
of each repeat's median step. The last table is a paper estimate of TP scaling for 7B / 70B
Llama models on 2 / 4 / 8 GPUs, from the all-reduce count and sizes this engine issues (counted
here) and stated hardware assumptions.

    python bench/tp.py                               # make bench-tp
    python bench/tp.py --batches 1,8 --repeats 1 --decode-steps 8 --prefill 256 --engine-workload alpaca:1:16

Results: bench/results/tp.json and bench/results/tp.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
from paged import LLM, EngineConfig, SamplingParams  # noqa: E402
from paged.model_runner import ModelInput, ModelRunner  # noqa: E402
from paged.models.llama import ModelArgs  # noqa: E402
from paged.parallel.executor import TensorParallelExecutor  # noqa: E402
from paged.parallel.launch_spec import WorkerGroupSpec  # noqa: E402

sys.path.insert(1, BENCH)
from throughput import cpu_model, load_avg, parse_workloads  # noqa: E402
from workload import workload_for_model  # noqa: E402

BLOCK_SIZE = 16


class Batch:
    """``num_seqs`` sequences of ``context`` tokens, each in its own run of blocks."""

    def __init__(self, num_seqs: int, context: int, max_new: int, first_block: int = 0):
        self.num_seqs, self.context = num_seqs, context
        self.blocks_per_seq = -(-(context + max_new) // BLOCK_SIZE)
        self.first_block = first_block
        self.length = 0

    @property
    def num_blocks(self) -> int:
        return self.num_seqs * self.blocks_per_seq

    def _table(self, seq: int) -> list[int]:
        start = self.first_block + seq * self.blocks_per_seq
        return list(range(start, start + self.blocks_per_seq))

    def _plan(self, count: int) -> ModelInput:
        plan = ModelInput([], [], [], [], [0], np.zeros((0, 0), dtype=np.int32), [])
        tables = []
        for seq in range(self.num_seqs):
            table = self._table(seq)
            for pos in range(self.length, self.length + count):
                plan.input_ids.append((seq * 131 + pos * 7) % 15000 + 3)
                plan.positions.append(pos)
                plan.slot_mapping.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            plan.seq_lens.append(self.length + count)
            plan.query_start_loc.append(plan.query_start_loc[-1] + count)
            tables.append(table[:-(-(self.length + count) // BLOCK_SIZE)])
            plan.logits_indices.append(plan.query_start_loc[-1] - 1)
        plan.block_tables = np.array(tables, dtype=np.int32)  # equal lengths: no padding
        self.length += count
        return plan

    def prefill(self) -> ModelInput:
        self.length = 0
        return self._plan(self.context)

    def decode(self) -> ModelInput:
        return self._plan(1)


def stats_per_step(stats, before: dict) -> dict:
    """A group's ``ExecutorStats`` since ``before`` (a ``vars()`` copy), per step."""
    after = vars(stats)
    steps = max(1, after["steps"] - before["steps"])
    per_step = {k: (after[k] - before[k]) / steps for k in before if k != "steps"}
    per_step["channel_s"] = per_step["total_s"] - per_step["rank_step_s"]
    per_step["steps"] = after["steps"] - before["steps"]
    return per_step


def time_steps(runner, plans) -> tuple[float, dict | None]:
    """Median seconds per step, and for a group its stats per step (``ExecutorStats`` fields)."""
    stats = getattr(runner, "stats", None)
    before = dict(vars(stats)) if stats is not None else None
    times = []
    for plan in plans:
        started = time.perf_counter()
        runner.execute_model_input(plan)
        times.append(time.perf_counter() - started)
    return statistics.median(times), (stats_per_step(stats, before) if before is not None else None)


def split_cells(part: dict) -> str:
    """The broadcast / channel / all-reduce / gather cells of a table row (milliseconds)."""
    kib = part["collective_bytes"] / max(1, part["collective_calls"]) / 1024
    return (f" {part['broadcast_s'] * 1e3:.3f} | {part['channel_s'] * 1e3:.3f} | "
            f"{part['collective_s'] * 1e3:.2f} ({part['collective_calls']:.0f}, {kib:.0f}) | "
            f"{part['gather_s'] * 1e3:.3f} |")


# ---- the engine end to end --------------------------------------------------------------------------
def engine_throughput(args) -> tuple[list[str], dict]:
    """TP=N vs TP=1 engines on one workload, interleaved per repeat: table lines and raw figures."""
    (profile, scale, num_requests), = parse_workloads(args.engine_workload)
    workload = workload_for_model(args.model, profile, num_requests, scale)
    settings = dict(block_size=BLOCK_SIZE, num_kv_blocks=args.engine_kv_blocks, max_num_seqs=256,
                    max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0, dtype="float32")
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in workload.output_lens]
    tp_label = f"TP={args.tp}"
    engines = {"TP=1": LLM(args.model, **settings)}
    engines[tp_label] = LLM(args.model, tensor_parallel_size=args.tp, **settings)
    labels = list(engines)
    results = {label: {"tokens_per_s": [], "parts": []} for label in labels}
    tokens = {}
    try:
        for llm in engines.values():  # warm-up
            llm.generate(workload.prompts[:4], params[:4], use_tqdm=False)
        for repeat in range(args.repeats):
            for label in labels[repeat % 2:] + labels[:repeat % 2]:
                llm = engines[label]
                stats = getattr(llm.engine.executor, "stats", None)
                before = dict(vars(stats)) if stats is not None else None
                started = time.perf_counter()
                outputs = llm.generate(workload.prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - started
                results[label]["tokens_per_s"].append(sum(workload.output_lens) / elapsed)
                if before is not None:
                    results[label]["parts"].append(stats_per_step(stats, before))
                tokens[label] = [out.outputs[0].token_ids for out in outputs]
    finally:
        for llm in engines.values():
            llm.close()
    equal = sum(a == b for a, b in zip(tokens["TP=1"], tokens[tp_label]))
    summary = workload.summary()
    lines = [f"Engine end to end: {workload.name}, {num_requests} requests ({summary['prompt_tokens']} prompt, "
             f"{summary['output_tokens']} output tokens), greedy, EOS ignored, {args.engine_kv_blocks} KV blocks "
             f"each, prefix caching off; TP=1 on {args.threads} threads, TP={args.tp} on "
             f"{engines[tp_label].engine.executor.spec.resolved_threads_per_rank()} thread(s) per rank.", "",
             "| engine | out tok/s | vs TP=1 | engine steps | broadcast ms | channel ms | "
             "all-reduce ms (calls, KiB each) | gather ms | greedy = TP=1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = statistics.median(results["TP=1"]["tokens_per_s"])
    figures = {}
    for label in labels:
        r = results[label]
        rate = statistics.median(r["tokens_per_s"])
        row = f"| {label} | {rate:.1f} | {rate / base:.2f}x |"
        part = None
        if r["parts"]:
            part = {k: statistics.median(p[k] for p in r["parts"]) for k in r["parts"][0]}
            row += f" {part['steps']:.0f} |" + split_cells(part) + f" {equal}/{num_requests} |"
        else:
            row += " | | | | | |"
        lines.append(row)
        figures[label] = {"tokens_per_s": rate, "raw": r["tokens_per_s"], "parts": part}
    figures["greedy_equal"] = [equal, num_requests]
    return lines, figures


def run_workload(runner, name: str, args) -> tuple[float, dict | None]:
    """One workload's timed steps (the prefill that sets up a decode is not timed)."""
    if name == "prefill":
        batch = Batch(1, args.prefill, 0)
        return time_steps(runner, [batch.prefill() for _ in range(3)])
    batch = Batch(int(name.split("-")[1]), args.context, args.decode_steps)
    runner.execute_model_input(batch.prefill())
    return time_steps(runner, [batch.decode() for _ in range(args.decode_steps)])


def workload_tokens(name: str, args) -> int:
    return args.prefill if name == "prefill" else int(name.split("-")[1])


# ---- paper estimate ---------------------------------------------------------------------------------
# Hardware assumptions (not measured here): H100 SXM, bf16.
HBM_BYTES_PER_S = 3.35e12 * 0.8     # achievable share of peak HBM bandwidth
FLOPS = 989e12 * 0.6                # achievable share of dense bf16 peak
ALLREDUCE_LATENCY_S = 10e-6         # NCCL all-reduce of a small message inside one NVLink node
ALLREDUCE_BUS_BYTES_PER_S = 360e9   # NCCL bus bandwidth on NVLink 4 (ring: each GPU moves 2(N-1)/N x size)
MODELS = {  # name: (parameters, hidden, layers, KV heads, head_dim)
    "Llama-2-7B": (6.7e9, 4096, 32, 32, 128),
    "Llama-2-70B": (69e9, 8192, 80, 8, 128),
}


def paper_step_seconds(model: str, tp: int, num_seqs: int, new_tokens: int, context: int) -> tuple[float, float]:
    """(compute, communication) seconds of one step: ``num_seqs`` sequences, ``new_tokens`` new
    tokens each, over ``context`` cached tokens each. Compute is the larger of reading the rank's
    weights and KV once and its share of the FLOPs."""
    params, hidden, layers, kv_heads, head_dim = MODELS[model]
    tokens = num_seqs * new_tokens
    kv_heads_per_rank = max(1, kv_heads // tp)  # replicated once tp exceeds the KV heads
    kv_bytes = num_seqs * context * layers * 2 * kv_heads_per_rank * head_dim * 2
    compute = max((2 * params / tp + kv_bytes) / HBM_BYTES_PER_S, 2 * params * tokens / tp / FLOPS)
    if tp == 1:
        return compute, 0.0
    size = tokens * hidden * 2                            # one all-reduce of the hidden state, bf16
    per_allreduce = ALLREDUCE_LATENCY_S + 2 * (tp - 1) / tp * size / ALLREDUCE_BUS_BYTES_PER_S
    return compute, (2 * layers + 1) * per_allreduce      # o_proj + down_proj per layer, embedding


def paper_table() -> list[str]:
    lines = ["| model | step | TP | compute ms | all-reduce ms | step ms | speedup vs TP=1 | comm share |",
             "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for label, num_seqs, new_tokens, context in (("decode batch 1, ctx 1024", 1, 1, 1024),
                                                     ("decode batch 64, ctx 1024", 64, 1, 1024),
                                                     ("prefill 2048", 1, 2048, 0)):
            base = sum(paper_step_seconds(model, 1, num_seqs, new_tokens, context))
            for tp in (1, 2, 4, 8):
                compute, comm = paper_step_seconds(model, tp, num_seqs, new_tokens, context)
                step = compute + comm
                lines.append(f"| {model} | {label} | {tp} | {compute * 1e3:.2f} | {comm * 1e3:.3f} | "
                             f"{step * 1e3:.2f} | {base / step:.2f}x | {comm / step:.0%} |")
    return lines


# ---- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "model-store", "tiny-llama"))
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine-workload", default="alpaca:1:48", help="profile:scale:num_requests (bench/workload.py)")
    ap.add_argument("--engine-kv-blocks", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "tp.json"))
    args = ap.parse_args(argv)

    workloads = [f"decode-{b}" for b in args.batches.split(",")] + ["prefill"]
    max_batch = max(int(b) for b in args.batches.split(","))
    num_blocks = max(Batch(max_batch, args.context, args.decode_steps).num_blocks,
                     Batch(1, args.prefill, 0).num_blocks)
    start_load = load_avg()
    torch.set_num_threads(args.threads)
    engine_lines, engine_figures = engine_throughput(args)
    config = EngineConfig(model=args.model, block_size=BLOCK_SIZE, dtype="float32")  # the table says fp32
    runners = {"TP=1": ModelRunner(config, ModelArgs.from_checkpoint(args.model), num_blocks, 0)}
    tp_config = EngineConfig(model=args.model, block_size=BLOCK_SIZE, tensor_parallel_size=args.tp, dtype="float32")
    for label, shm in ((f"TP={args.tp} shm all-reduce", True), (f"TP={args.tp} gloo all-reduce", False)):
        runners[label] = TensorParallelExecutor(WorkerGroupSpec(tp_config, num_blocks=num_blocks, num_cpu_blocks=0,
                                                                max_logits_rows=max_batch,
                                                                shared_memory_all_reduce=shm))
    labels = list(runners)
    results = {(w, v): {"step_s": [], "parts": []} for w in workloads for v in labels}
    try:
        for name in workloads:  # warm-up (first-touch of the pools, lazy init)
            for runner in runners.values():
                run_workload(runner, name, args)
        for repeat in range(args.repeats):
            for name in workloads:
                for label in labels[repeat % len(labels):] + labels[:repeat % len(labels)]:  # rotate the order
                    step, parts = run_workload(runners[label], name, args)
                    results[name, label]["step_s"].append(step)
                    if parts is not None:
                        results[name, label]["parts"].append(parts)
    finally:
        for runner in runners.values():
            if isinstance(runner, TensorParallelExecutor):
                runner.shutdown()

    threads = runners[labels[1]].spec.resolved_threads_per_rank()
    header = (f"TP={args.tp} ({args.tp} ranks x {threads} threads) vs TP=1 ({args.threads} threads), "
              f"{os.path.basename(os.path.normpath(args.model))}, fp32, context {args.context}, "
              f"{args.repeats} interleaved repeats, medians")
    lines = engine_lines + ["", "Model steps: " + header, "",
             "| step | variant | ms / step | tokens/s | vs TP=1 | broadcast ms | channel ms | "
             "all-reduce ms (calls, KiB each) | gather ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in workloads:
        tokens = workload_tokens(name, args)
        base = statistics.median(results[name, "TP=1"]["step_s"])
        for label in labels:
            r = results[name, label]
            step = statistics.median(r["step_s"])
            row = f"| {name} | {label} | {step * 1e3:.2f} | {tokens / step:.0f} | {base / step:.2f}x |"
            part = None
            if r["parts"]:
                part = {k: statistics.median(p[k] for p in r["parts"]) for k in r["parts"][0]}
                row += split_cells(part)
            else:
                row += " | | | |"
            lines.append(row)
            summary[f"{name} {label}"] = {"step_s": step, "tokens": tokens, "parts": part, "raw": r["step_s"]}
    lines += ["", f"Machine: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, load average {start_load} at start, "
              f"{load_avg()} at end. Command: `{' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`.",
              "", "Paper estimate (H100 SXM, bf16; assumptions in bench/tp.py; comm = 2 x layers + 1 all-reduces "
              "of tokens x hidden x 2 bytes, as counted above):", ""] + paper_table()
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "engine": engine_figures, "results": summary, "load_start": start_load,
                   "load_end": load_avg(), "cpu": cpu_model()}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
