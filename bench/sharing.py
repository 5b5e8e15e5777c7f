"""The vLLM paper's sharing results, reproduced on this engine in one run (``make bench-sharing``).

1. Memory saved by sharing (paper Fig. 15): parallel sampling n = 2, 4, 6 and beam search width
   2, 4, 6 on the Alpaca-like and ShareGPT-like workloads (bench/workload.py). Saving = 1 - blocks
   the sequences hold / blocks they would hold unshared, both summed over every step (kv_stats
   ``sharing_*_blocks_sum``); prefix caching off, so only the prompt and beam sharing counts.
2. Shared prefix (paper Fig. 16/17): requests behind a 1-shot (80-token) and a 5-shot (341-token)
   prefix, Alpaca-like own prompts and outputs, all submitted at once; prefix cache off vs on vs
   the prefix pinned (``LLM.register_prefix``). Offline throughput, not the paper's
   throughput-at-equal-latency.
3. The CPU tier: several 5-shot prefixes, each used by a burst of requests in turn, twice over,
   with a device pool that holds one prefix and its burst but not all prefixes; cache off vs on vs
   on with the CPU tier (``cpu_prefix_cache_bytes``).
4. KV utilization per block size on both workloads (measured by the engine; predicted from the
   lengths by paged/block_size_profile.py) with throughput, and what ``block_size="auto"`` picks.

Greedy outputs of every cache arrangement are compared with the cache-off outputs. Prints the
tables, writes bench/results/sharing.json and .md, and plots bench/results/sharing_*.png.

    python bench/sharing.py [--quick] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.append(BENCH)  # for workload.py; appended, so installed modules come first

from workload import special_token_ids, workload_for_model  # noqa: E402

PAPER_MEMORY = {  # saving range for width 2..6 (vLLM paper, section 6.3)
    ("alpaca", "parallel"): "6.1-9.8%", ("alpaca", "beam"): "37.6-55.2%",
    ("sharegpt", "parallel"): "16.2-30.5%", ("sharegpt", "beam"): "44.3-66.3%",
}
PAPER_PREFIX = {1: "1.67x", 5: "3.58x"}  # throughput over Orca (Oracle) with the prefix shared
PREFIX_LENGTHS = {1: 80, 5: 341}
KV_BYTES = 256 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def random_prefix(num_tokens: int, vocab_size: int, excluded: set[int], seed: str) -> list[int]:
    rng = random.Random(seed)
    tokens = []
    while len(tokens) < num_tokens:
        token = rng.randrange(vocab_size)
        if token not in excluded:
            tokens.append(token)
    return tokens


class Bench:
    def __init__(self, args):
        from paged import LLM, SamplingParams
        self.LLM, self.SamplingParams, self.args = LLM, SamplingParams, args
        with open(os.path.join(args.model, "config.json")) as f:
            config = json.load(f)
        self.vocab_size = config["vocab_size"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        self.kv_bytes_per_token = 2 * config["num_hidden_layers"] * (config.get("num_key_value_heads") or heads) \
            * head_dim * 4
        self.excluded = special_token_ids(args.model)

    def llm(self, **kwargs):
        kwargs.setdefault("block_size", 16)
        kwargs.setdefault("seed", 0)
        llm = self.LLM(self.args.model, dtype="float32", **kwargs)
        llm.generate([[5, 6, 7, 8]], self.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        return llm

    def greedy(self, max_tokens: int):
        return self.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    @staticmethod
    def timed_generate(llm, prompts, params):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return outputs, time.perf_counter() - start

    # ---- 1. memory saved by sharing ---------------------------------------------------------------
    def memory(self, workloads) -> list[dict]:
        rows = []
        for wl in workloads:
            llm = self.llm(kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=False, swap_space_bytes=0)
            for mode in ("parallel", "beam"):
                for width in (2, 4, 6):
                    if mode == "parallel":
                        params = [self.SamplingParams(n=width, temperature=1.0, seed=i, max_tokens=o, ignore_eos=True)
                                  for i, o in enumerate(wl.output_lens)]
                    else:
                        params = [self.SamplingParams(beam_width=width, max_tokens=o, ignore_eos=True)
                                  for o in wl.output_lens]
                    before = llm.kv_stats()
                    _, elapsed = self.timed_generate(llm, wl.prompts, params)
                    after = llm.kv_stats()
                    held = after["sharing_held_blocks_sum"] - before["sharing_held_blocks_sum"]
                    unshared = after["sharing_unshared_blocks_sum"] - before["sharing_unshared_blocks_sum"]
                    rows.append({"workload": wl.profile, "requests": wl.num_requests, "mode": mode, "width": width,
                                 "saved": 1 - held / unshared, "paper": PAPER_MEMORY[(wl.profile, mode)],
                                 "elapsed_s": round(elapsed, 2),
                                 "preemptions": after["num_recompute_preemptions"] + after["num_swap_preemptions"]})
                    log(f"[memory] {wl.name} {mode} {width}: saved {rows[-1]['saved']:.1%} ({elapsed:.1f} s)")
        return rows

    # ---- 2. shared prefix: off / on / pinned ---------------------------------------------------
    def prefix(self, own) -> list[dict]:
        rows = []
        for shots, length in PREFIX_LENGTHS.items():
            prefix = random_prefix(length, self.vocab_size, self.excluded, f"{shots}-shot")
            prompts = [prefix + p for p in own.prompts]
            params = [self.greedy(o) for o in own.output_lens]
            reference = None
            for arrangement in ("cache off", "cache on", "pinned"):
                llm = self.llm(kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=arrangement != "cache off")
                if arrangement == "pinned":
                    llm.register_prefix(prefix)
                before = llm.kv_stats()
                outputs, elapsed = self.timed_generate(llm, prompts, params)
                after = llm.kv_stats()
                tokens = [o.outputs[0].token_ids for o in outputs]
                reference = reference or tokens
                rows.append({"shots": shots, "prefix_tokens": length, "arrangement": arrangement,
                             "requests": len(prompts), "elapsed_s": round(elapsed, 2),
                             "requests_per_s": len(prompts) / elapsed,
                             "output_tokens_per_s": sum(own.output_lens) / elapsed,
                             "prompt_tokens_computed": after["prompt_tokens_total"] - before["prompt_tokens_total"],
                             "greedy_equal": sum(a == b for a, b in zip(tokens, reference)),
                             "paper_speedup": PAPER_PREFIX[shots]})
                log(f"[prefix] {shots}-shot {arrangement}: {rows[-1]['requests_per_s']:.2f} req/s")
            base = rows[-3]["requests_per_s"]
            for row in rows[-3:]:
                row["speedup"] = row["requests_per_s"] / base
        return rows

    # ---- 3. the CPU tier -----------------------------------------------------------------------
    def cpu_tier(self, own, num_prefixes: int, burst: int, cycles: int) -> dict:
        length = PREFIX_LENGTHS[5]
        prefixes = [random_prefix(length, self.vocab_size, self.excluded, f"tier-{i}") for i in range(num_prefixes)]
        bursts = []   # (prompts, output lengths), one prefix each, in turn, ``cycles`` times over
        for cycle in range(cycles):
            for index, prefix in enumerate(prefixes):
                start = (cycle * num_prefixes + index) * burst % max(1, own.num_requests - burst)
                bursts.append(([prefix + p for p in own.prompts[start:start + burst]],
                               own.output_lens[start:start + burst]))
        longest = max(len(p) + o for prompts, olens in bursts for p, o in zip(prompts, olens))
        blocks_for = lambda n: -(-n // 16)  # noqa: E731
        # one prefix and its burst fit, with a little slack; all prefixes do not
        need = blocks_for(length) + burst * (blocks_for(longest - length) + 1)
        num_blocks = need + need // 4
        tier_bytes = num_prefixes * blocks_for(length) * 16 * self.kv_bytes_per_token
        rows, reference = [], None
        for arrangement in ("cache off", "cache on", "cache on + CPU tier"):
            llm = self.llm(num_kv_blocks=num_blocks, max_model_len=longest + 16, swap_space_bytes=0,
                           enable_prefix_caching=arrangement != "cache off",
                           cpu_prefix_cache_bytes=tier_bytes if "tier" in arrangement else 0)
            before = llm.kv_stats()
            tokens, elapsed = [], 0.0
            for prompts, olens in bursts:
                outputs, seconds = self.timed_generate(llm, prompts, [self.greedy(o) for o in olens])
                tokens += [o.outputs[0].token_ids for o in outputs]
                elapsed += seconds
            after = llm.kv_stats()
            reference = reference or tokens
            num_requests = sum(len(p) for p, _ in bursts)
            rows.append({"arrangement": arrangement, "requests": num_requests, "elapsed_s": round(elapsed, 2),
                         "requests_per_s": num_requests / elapsed,
                         "prompt_tokens_computed": after["prompt_tokens_total"] - before["prompt_tokens_total"],
                         "prefix_hits": after["prefix_hits"] - before["prefix_hits"],
                         "cpu_prefix_hits": after["cpu_prefix_hits"] - before["cpu_prefix_hits"],
                         "greedy_equal": sum(a == b for a, b in zip(tokens, reference))})
            log(f"[cpu tier] {arrangement}: {rows[-1]['requests_per_s']:.2f} req/s")
        for row in rows:
            row["speedup"] = row["requests_per_s"] / rows[0]["requests_per_s"]
        return {"num_prefixes": num_prefixes, "prefix_tokens": length, "burst": burst, "cycles": cycles,
                "device_blocks": num_blocks, "blocks_per_prefix": blocks_for(length),
                "cpu_tier_blocks": tier_bytes // (16 * self.kv_bytes_per_token), "rows": rows}

    # ---- 4. block size -------------------------------------------------------------------------
    def block_sizes(self, workloads, sizes, results_dir) -> list[dict]:
        from paged.block_size_profile import LengthProfile
        rows = []
        for wl in workloads:
            path = os.path.join(results_dir, "workloads", f"sharing-{wl.name}.json")
            wl.save(path)
            predicted = LengthProfile.load(path).utilizations()
            auto = self.llm(block_size="auto", block_size_profile=path, kv_cache_memory_bytes=KV_BYTES,
                            enable_prefix_caching=False)
            choice = auto.engine.block_size_advisor.auto_choice
            log(f"[block size] {wl.name}: auto chose {choice.block_size} ({choice.reason})")
            del auto
            runs = {b: [] for b in sorted(set(sizes) | {choice.block_size})}
            for repeat in range(self.args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
                for block_size in order:
                    llm = self.llm(block_size=block_size, kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=False)
                    before = llm.kv_stats()
                    params = [self.greedy(o) for o in wl.output_lens]
                    _, elapsed = self.timed_generate(llm, wl.prompts, params)
                    after = llm.kv_stats()
                    utilization = ((after["kv_utilization_sum"] - before["kv_utilization_sum"])
                                   / (after["kv_utilization_steps"] - before["kv_utilization_steps"]))
                    runs[block_size].append((utilization, sum(wl.output_lens) / elapsed))
                    log(f"[block size] {wl.name} {block_size}: util {utilization:.1%}, "
                        f"{runs[block_size][-1][1]:.0f} out tok/s")
            base = sorted(t for _, t in runs[16])[len(runs[16]) // 2] if 16 in runs else None
            for block_size, samples in runs.items():
                throughput = sorted(t for _, t in samples)[len(samples) // 2]
                rows.append({"workload": wl.profile, "name": wl.name, "block_size": block_size,
                             "kv_utilization": samples[0][0], "predicted_utilization": predicted.get(block_size),
                             "output_tokens_per_s": throughput,
                             "throughput_vs_16": throughput / base if base else None,
                             "auto": block_size == choice.block_size,
                             "attention_cost_s": choice.attention_cost_s.get(block_size)})
        return rows


# ---- report ------------------------------------------------------------------------------------
def pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def render(results: dict) -> str:
    lines = ["## Memory saved by sharing", "",
             "| workload | requests | sharing | width | blocks saved | paper (width 2-6) |", "|---|---|---|---|---|---|"]
    for r in results["memory"]:
        lines.append(f"| {r['workload']} | {r['requests']} | {r['mode']} | {r['width']} | {pct(r['saved'])} "
                     f"| {r['paper']} |")
    lines += ["", "## Shared prefix", "",
              "| prefix | arrangement | req/s | vs cache off | paper | prompt tokens computed | greedy = cache off |",
              "|---|---|---|---|---|---|---|"]
    for r in results["prefix"]:
        lines.append(f"| {r['shots']}-shot ({r['prefix_tokens']} tok) | {r['arrangement']} | {r['requests_per_s']:.2f} "
                     f"| {r['speedup']:.2f}x | {r['paper_speedup'] if r['arrangement'] != 'cache off' else ''} "
                     f"| {r['prompt_tokens_computed']} | {r['greedy_equal']}/{r['requests']} |")
    tier = results["cpu_tier"]
    lines += ["", f"## CPU tier ({tier['num_prefixes']} prefixes of {tier['prefix_tokens']} tokens = "
                  f"{tier['blocks_per_prefix']} blocks each, bursts of {tier['burst']}, {tier['cycles']} rounds; "
                  f"device pool {tier['device_blocks']} blocks, CPU tier {tier['cpu_tier_blocks']} blocks)", "",
              "| arrangement | req/s | vs cache off | prompt tokens computed | prefix hits | from CPU tier | greedy = cache off |",
              "|---|---|---|---|---|---|---|"]
    for r in tier["rows"]:
        lines.append(f"| {r['arrangement']} | {r['requests_per_s']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['prompt_tokens_computed']} | {r['prefix_hits']} | {r['cpu_prefix_hits']} "
                     f"| {r['greedy_equal']}/{r['requests']} |")
    lines += ["", "## Block size", "",
              "| workload | block size | KV utilization | predicted | out tok/s | vs 16 | auto |", "|---|---|---|---|---|---|---|"]
    for r in results["block_size"]:
        ratio = "" if r["throughput_vs_16"] is None else f"{r['throughput_vs_16']:.2f}"
        lines.append(f"| {r['name']} | {r['block_size']} | {pct(r['kv_utilization'])} "
                     f"| {pct(r['predicted_utilization'])} | {r['output_tokens_per_s']:.0f} | {ratio} "
                     f"| {'chosen' if r['auto'] else ''} |")
    meta = results["meta"]
    lines += ["", f"Machine: {meta['cpu']}, {meta['nproc']} CPUs, {meta['threads']} threads; load average "
                  f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end. Command: `{meta['command']}`."]
    return "\n".join(lines) + "\n"


def plot(results: dict, results_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, mode in zip(axes, ("parallel", "beam")):
        for offset, workload in ((-0.2, "alpaca"), (0.2, "sharegpt")):
            rows = [r for r in results["memory"] if r["mode"] == mode and r["workload"] == workload]
            ax.bar([r["width"] + offset for r in rows], [100 * r["saved"] for r in rows], width=0.4, label=workload)
        ax.set_title("parallel sampling" if mode == "parallel" else "beam search")
        ax.set_xlabel("n" if mode == "parallel" else "beam width")
        ax.set_xticks([2, 4, 6])
    axes[0].set_ylabel("KV blocks saved (%)")
    axes[0].legend()
    paths.append(os.path.join(results_dir, "sharing_memory.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['shots']}-shot\n{r['arrangement']}" for r in results["prefix"]]
    labels += [f"tier test\n{r['arrangement']}" for r in results["cpu_tier"]["rows"]]
    values = [r["speedup"] for r in results["prefix"]] + [r["speedup"] for r in results["cpu_tier"]["rows"]]
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=6)
    ax.set_ylabel("throughput vs cache off")
    paths.append(os.path.join(results_dir, "sharing_prefix.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["name"] for r in results["block_size"]):
        rows = [r for r in results["block_size"] if r["name"] == name]
        ax.plot([r["block_size"] for r in rows], [100 * r["kv_utilization"] for r in rows], "o-", label=f"{name} measured")
        ax.plot([r["block_size"] for r in rows], [100 * r["predicted_utilization"] for r in rows], "x--",
                label=f"{name} predicted")
        auto = [r for r in rows if r["auto"]]
        ax.plot([auto[0]["block_size"]], [100 * auto[0]["kv_utilization"]], "k*", markersize=12)
    ax.set_xscale("log", base=2)
    sizes = sorted({r["block_size"] for r in results["block_size"]})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("block size (tokens; * = auto's choice)")
    ax.set_ylabel("KV utilization (%)")
    ax.legend(fontsize=7)
    paths.append(os.path.join(results_dir, "sharing_block_size.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model-store", "tiny-llama"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small workloads (a check, not a measurement)")
    ap.add_argument("--repeats", type=int, default=1, help="block-size runs, interleaved; median throughput")
    ap.add_argument("--results-dir", default=os.path.join(BENCH, "results"))
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.set_num_threads(args.threads)

    q = args.quick
    wl = lambda profile, n, scale: workload_for_model(args.model, profile, n, scale)  # noqa: E731
    sharing_wls = [wl("alpaca", 8 if q else 32, 1.0), wl("sharegpt", 4 if q else 12, 0.25)]
    own = wl("alpaca", 12 if q else 32, 0.5)
    size_wls = [wl("alpaca", 24 if q else 100, 1.0), wl("sharegpt", 8 if q else 32, 0.5)]
    bench = Bench(args)
    meta = machine()
    results = {"meta": {"cpu": meta["cpu"], "nproc": meta["nproc"], "threads": args.threads,
                        "loadavg_start": meta["loadavg"], "command": " ".join(["python"] + sys.argv),
                        "torch": torch.__version__, "model": args.model}}
    started = time.perf_counter()
    results["memory"] = bench.memory(sharing_wls)
    results["prefix"] = bench.prefix(own)
    results["cpu_tier"] = bench.cpu_tier(own, num_prefixes=3 if q else 4, burst=4 if q else 6, cycles=2)
    results["block_size"] = bench.block_sizes(size_wls, (8, 16, 32), args.results_dir)
    results["meta"]["loadavg_end"] = machine()["loadavg"]
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)

    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "sharing.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render(results)
    with open(os.path.join(args.results_dir, "sharing.md"), "w") as f:
        f.write(table)
    print(table)
    try:
        for path in plot(results, args.results_dir):
            log(f"plot: {path}")
    except ImportError:
        log("matplotlib is missing (pip install -e '.[bench]'): no plots")


if __name__ == "__main__":
    main()
