"""Both KV memory models on the same work (``make bench-memory``): paged blocks vs virtual-contiguous
slots over OS pages, the same model, workloads and KV budget, in one run.

What it measures, each model in turn (interleaved repeats, medians where timed):

1. Throughput and memory over time: a ShareGPT-like workload (bench/workload.py) under a KV budget
   that holds about a third of it at once. Output tokens/s, preemptions, the most sequences running
   at once (what fits the budget), mean KV utilization, and per step the live tokens and the
   resident KV bytes (``kv_stats``: paged = blocks off the free list x block bytes; virtual =
   committed pages x page bytes, checked against mincore every few steps). The plot adds what the
   same virtual slots would commit on 2 MiB pages (computed from the slots' lengths) and the paged
   pool's own footprint (all of it is committed when the engine starts).
2. Attention time per decoded token: the kernel alone (bench/attention_layouts.py's paged bs=16
   and contiguous layouts on the same K/V, this model's shapes) and inside the engine's step
   (``PAGED_STEP_TIMER=1``: the attention phase, which includes the KV writes, over a decode-heavy
   workload).
3. Prefill throughput for long prompts: 4 prompts of 1,024 tokens in one step and chunked by 256,
   and the latency of one 1,536-token prompt (time to its first token).
4. What virtual gives up, with sharing on for paged: parallel sampling (n = 4; virtual runs the
   same samples as separate requests), a 341-token shared prefix (paged with prefix caching;
   virtual recomputes it), beam search (paged only; virtual refuses it).

Prints a table next to the papers' claims, writes bench/results/memory.json and .md and the plot
docs/images/memory.png. Timings on a shared machine are indicative.

    python bench/memory.py                       # a few minutes on 2 cores
    python bench/memory.py --smoke --results-dir /tmp/m   # tiny sizes: checks the script only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(BENCH))  # for workload.py; appended, so installed modules come first

from workload import special_token_ids, workload_for_model  # noqa: E402

MODELS = ("paged", "virtual")
BLOCK_SIZE = 16
HUGE_PAGE = 2 << 20
PAPERS = {
    "kernel": "+20-26% attention latency, paged vs contiguous kernel (vLLM paper, GPU)",
    "prefill": "up to 1.36x prefill throughput, virtual vs paged (vAttention, GPU)",
    "latency": "up to 42% lower latency (vAttention, GPU)",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args):
        import torch

        from paged import LLM, SamplingParams
        from paged.models.llama import ModelArgs
        self.torch, self.LLM, self.SamplingParams, self.args = torch, LLM, SamplingParams, args
        self.model_args = ModelArgs.from_checkpoint(args.model)
        self.excluded = special_token_ids(args.model)
        # --cpu-time: one thread, timed by its CPU time, so other processes' load does not count
        self.clock = time.thread_time if args.cpu_time else time.perf_counter

    # ---- engines ------------------------------------------------------------------------------
    def engine(self, model: str, **overrides):
        """An engine of the memory model with the bench's budget (warmed up)."""
        settings = dict(dtype="float32", seed=0, kv_cache_memory_bytes=self.args.kv_bytes,
                        max_num_seqs=self.args.max_num_seqs, max_num_batched_tokens=2048)
        if model == "paged":
            settings.update(block_size=BLOCK_SIZE, enable_prefix_caching=False)
        else:
            settings.update(kv_memory="virtual")
        settings.update(overrides)
        llm = self.LLM(self.args.model, **settings)
        llm.generate([[5, 6, 7, 8]], self.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        return llm

    def greedy(self, max_tokens: int, **kwargs):
        return self.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)

    def random_prompt(self, length: int, seed: str) -> list[int]:
        import random
        rng = random.Random(seed)
        out = []
        while len(out) < length:
            token = rng.randrange(self.model_args.vocab_size)
            if token not in self.excluded:
                out.append(token)
        return out

    def run(self, llm, prompts, params, trace: bool = False) -> dict:
        """Every request at once, stepped to the end: outputs, elapsed seconds and (``trace``) per
        step the live tokens, resident KV bytes and running sequences."""
        engine = llm.engine
        ids = [f"r{i}" for i in range(len(prompts))]
        finished, steps = {}, []
        manager = engine.scheduler.kv_manager
        cache = getattr(manager, "cache", None)   # the virtual KV memory, for mincore and 2 MiB pages
        os_checks = []
        start = self.clock()
        for request_id, prompt, p in zip(ids, prompts, params):
            engine.add_request(request_id, prompt, p, stream=False)
        while len(finished) < len(ids):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            if trace:
                stats = engine.kv_stats()
                row = [round(self.clock() - start, 4), stats["live_tokens"], stats["resident_kv_bytes"],
                       stats["num_running"], stats["kv_usage"] * stats["kv_budget_bytes"]]
                if cache is not None:
                    row.append(self.huge_page_bytes(cache))
                    if len(steps) % 25 == 0:
                        os_checks.append(cache.resident_bytes() - stats["resident_kv_bytes"])
                steps.append(row)
        elapsed = self.clock() - start
        outputs = [finished[i] for i in ids]
        return {"outputs": outputs, "elapsed_s": elapsed, "stats": engine.kv_stats(), "trace": steps,
                "os_minus_counter_bytes": os_checks}

    @staticmethod
    def huge_page_bytes(cache) -> int:
        """What the live slots would commit on 2 MiB pages (every (layer, K|V) region rounds up)."""
        per_region = cache.token_bytes
        pages = sum(math.ceil(n * per_region / HUGE_PAGE) for n in cache.reserved.values())
        return pages * cache.regions_per_slot * HUGE_PAGE

    # ---- 1. throughput and memory over time -----------------------------------------------------
    def throughput(self, workload) -> dict:
        params = [self.greedy(n) for n in workload.output_lens]
        engines = {model: self.engine(model) for model in MODELS}
        runs: dict[str, list[dict]] = {model: [] for model in MODELS}
        for repeat in range(self.args.repeats):
            for model in (MODELS if repeat % 2 == 0 else MODELS[::-1]):
                before = engines[model].kv_stats()
                result = self.run(engines[model], workload.prompts, params, trace=True)
                after = result["stats"]
                result["preemptions"] = (after["num_recompute_preemptions"] + after["num_swap_preemptions"]
                                         - before["num_recompute_preemptions"] - before["num_swap_preemptions"])
                util = (after["kv_utilization_sum"] - before["kv_utilization_sum"]) / max(
                    1, after["kv_utilization_steps"] - before["kv_utilization_steps"])
                result["mean_kv_utilization"] = util
                runs[model].append(result)
                log(f"[throughput] {model} repeat {repeat}: {sum(workload.output_lens) / result['elapsed_s']:.0f} "
                    f"tok/s, {result['preemptions']} preemptions")
        tokens = {model: [o.outputs[0].token_ids for o in runs[model][0]["outputs"]] for model in MODELS}
        rows = {}
        for model in MODELS:
            last = runs[model][-1]
            rows[model] = {
                "output_tok_s": statistics.median(sum(workload.output_lens) / r["elapsed_s"] for r in runs[model]),
                "elapsed_s": [round(r["elapsed_s"], 3) for r in runs[model]],
                "preemptions": last["preemptions"],
                "peak_running": max(step[3] for step in last["trace"]),
                "mean_kv_utilization": last["mean_kv_utilization"],
                "peak_resident_kv_bytes": max(step[2] for step in last["trace"]),
                "trace": last["trace"],
                "os_minus_counter_bytes": last["os_minus_counter_bytes"],
            }
            if model == "paged":
                pool = engines[model].kv_stats()
                rows[model]["pool_bytes"] = pool["num_blocks"] * pool["block_bytes"]
        return {"workload": workload.summary(), "kv_budget_bytes": self.args.kv_bytes, "rows": rows,
                "greedy_equal": sum(a == b for a, b in zip(tokens["paged"], tokens["virtual"])),
                "token_bytes": self.model_args.kv_bytes_per_token * 4}

    # ---- 2. attention per decoded token ---------------------------------------------------------
    def kernel_alone(self) -> list[dict]:
        """bench/attention_layouts.py on this model's shapes: paged bs=16 vs contiguous, decode."""
        from attention_layouts import build, step, time_layouts
        a = self.model_args
        shapes = argparse.Namespace(dtype="fp32", layers=a.num_layers, num_heads=a.num_heads,
                                    num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, huge_pages=False)
        rows = []
        cases = [(16, 256), (64, 512)] if not self.args.smoke else [(2, 40)]
        scale = a.head_dim ** -0.5
        with self.torch.inference_mode():
            for index, (batch, kv) in enumerate(cases):
                built = build([1] * batch, [kv] * batch, shapes, seed=index)
                built["layouts"] = {k: v for k, v in built["layouts"].items() if k in ("contiguous", "paged bs=16")}
                same = self.torch.equal(step(built, "contiguous", scale), step(built, "paged bs=16", scale))
                times = time_layouts(built, scale, self.args.kernel_repeats, shapes.layers, self.clock)
                rows.append({"case": f"decode b{batch} kv{kv}", "outputs_identical": same,
                             "us_per_token": {name: t * a.num_layers / batch for name, t in times.items()},
                             "paged_over_contiguous": times["paged bs=16"] / times["contiguous"] - 1})
                log(f"[kernel] decode b{batch} kv{kv}: paged/contiguous {rows[-1]['paged_over_contiguous']:+.1%}")
        return rows

    def attention_in_step(self, num_requests: int, prompt_len: int, output_len: int) -> dict:
        os.environ["PAGED_STEP_TIMER"] = "1"   # read when an engine's timer is made
        try:
            engines = {model: self.engine(model, kv_cache_memory_bytes=max(self.args.kv_bytes, 64 << 20))
                       for model in MODELS}
        finally:
            os.environ.pop("PAGED_STEP_TIMER")
        prompts = [self.random_prompt(prompt_len, f"decode-{i}") for i in range(num_requests)]
        params = [self.greedy(output_len) for _ in prompts]
        samples: dict[str, list[dict]] = {model: [] for model in MODELS}
        for repeat in range(self.args.repeats):
            for model in (MODELS if repeat % 2 == 0 else MODELS[::-1]):
                engine = engines[model].engine
                engine.timer.reset()
                result = self.run(engines[model], prompts, params)
                timing = engine.step_timings()
                steps = timing["num_steps"]
                decoded = num_requests * output_len
                samples[model].append({"attention_us_per_token": 1000 * timing["attention"] * steps / decoded,
                                       "step_us_per_token": 1000 * timing["total"] * steps / decoded,
                                       "elapsed_s": result["elapsed_s"]})
        rows = {model: {key: statistics.median(s[key] for s in samples[model]) for key in samples[model][0]}
                for model in MODELS}
        log(f"[step] attention us/token paged {rows['paged']['attention_us_per_token']:.1f}, "
            f"virtual {rows['virtual']['attention_us_per_token']:.1f}")
        return {"num_requests": num_requests, "prompt_len": prompt_len, "output_len": output_len, "rows": rows,
                "paged_over_virtual": rows["paged"]["attention_us_per_token"]
                / rows["virtual"]["attention_us_per_token"] - 1}

    # ---- 3. prefill ---------------------------------------------------------------------------------
    def prefill(self, num_prompts: int, prompt_len: int, chunk: int, latency_len: int) -> dict:
        budget = max(self.args.kv_bytes, 64 << 20)
        cases = {"one step": dict(max_num_batched_tokens=num_prompts * prompt_len),
                 f"chunked by {chunk}": dict(max_num_batched_tokens=chunk)}
        prompts = [self.random_prompt(prompt_len, f"prefill-{i}") for i in range(num_prompts)]
        latency_prompt = [self.random_prompt(latency_len, "latency")]
        rows = []
        for case, settings in cases.items():
            engines = {model: self.engine(model, kv_cache_memory_bytes=budget, **settings) for model in MODELS}
            times: dict[str, list[float]] = {model: [] for model in MODELS}
            latency: dict[str, list[float]] = {model: [] for model in MODELS}
            for repeat in range(self.args.repeats + 1):
                for model in (MODELS if repeat % 2 == 0 else MODELS[::-1]):
                    times[model].append(self.run(engines[model], prompts, [self.greedy(1)] * num_prompts)["elapsed_s"])
                    latency[model].append(self.run(engines[model], latency_prompt, [self.greedy(1)])["elapsed_s"])
            row = {"case": case}
            for model in MODELS:
                row[model] = {"prompt_tok_s": num_prompts * prompt_len / statistics.median(times[model]),
                              "latency_ms": 1000 * statistics.median(latency[model])}
            row["virtual_over_paged"] = row["virtual"]["prompt_tok_s"] / row["paged"]["prompt_tok_s"]
            row["latency_virtual_vs_paged"] = row["virtual"]["latency_ms"] / row["paged"]["latency_ms"] - 1
            rows.append(row)
            log(f"[prefill] {case}: virtual/paged {row['virtual_over_paged']:.3f}x")
        return {"num_prompts": num_prompts, "prompt_len": prompt_len, "latency_prompt_len": latency_len, "rows": rows}

    # ---- 4. what virtual gives up: sharing -------------------------------------------------------
    def sharing(self, own) -> list[dict]:
        rows = []
        prompts, outs = own.prompts, own.output_lens
        width = 4
        # Parallel sampling: paged shares each prompt among its samples; virtual runs each sample as
        # a request of its own (same seeds, so the same work).
        paged, virtual = self.engine("paged"), self.engine("virtual")
        sampled = [self.SamplingParams(n=width, temperature=1.0, seed=i, max_tokens=o, ignore_eos=True)
                   for i, o in enumerate(outs)]
        apart = [self.SamplingParams(temperature=1.0, seed=1000 * i + j, max_tokens=o, ignore_eos=True)
                 for i, o in enumerate(outs) for j in range(width)]
        rows.append(self.compare(f"parallel sampling n={width}", width * sum(outs),
                                 self.run(paged, prompts, sampled, trace=True),
                                 self.run(virtual, [p for p in prompts for _ in range(width)], apart, trace=True)))
        # A shared prefix: paged with prefix caching; virtual computes it for every request.
        prefix = self.random_prompt(341, "5-shot")
        with_prefix = [prefix + p for p in prompts]
        paged_cached = self.engine("paged", enable_prefix_caching=True)
        rows.append(self.compare("shared 341-token prefix", sum(outs),
                                 self.run(paged_cached, with_prefix, [self.greedy(o) for o in outs], trace=True),
                                 self.run(virtual, with_prefix, [self.greedy(o) for o in outs], trace=True)))
        rows[-1]["paged_prefix_hit_rate"] = paged_cached.kv_stats()["prefix_hit_rate"]
        # Beam search: paged only.
        beams = [self.SamplingParams(beam_width=width, n=1, max_tokens=o, ignore_eos=True) for o in outs]
        result = self.run(paged, prompts, beams, trace=True)
        refusal = None
        try:
            virtual.generate(prompts[:1], beams[:1], use_tqdm=False)
        except ValueError as exc:
            refusal = f"{type(exc).__name__}({getattr(exc, 'param', None)!r}): {exc}"
        rows.append({"case": f"beam search width {width}", "paged": self.summary(result, sum(outs)),
                     "virtual": None, "virtual_refused": refusal})
        for row in rows:
            log(f"[sharing] {row['case']}: {row.get('virtual_over_paged_tok_s', 'virtual refused')}")
        return rows

    def summary(self, result: dict, output_tokens: int) -> dict:
        return {"output_tok_s": output_tokens / result["elapsed_s"],
                "peak_resident_kv_bytes": max(step[2] for step in result["trace"]),
                "peak_running": max(step[3] for step in result["trace"]),
                "preemptions": result["stats"]["num_recompute_preemptions"] + result["stats"]["num_swap_preemptions"]}

    def compare(self, case: str, output_tokens: int, paged: dict, virtual: dict) -> dict:
        row = {"case": case, "paged": self.summary(paged, output_tokens),
               "virtual": self.summary(virtual, output_tokens)}
        row["virtual_over_paged_tok_s"] = row["virtual"]["output_tok_s"] / row["paged"]["output_tok_s"]
        row["virtual_over_paged_peak_kv"] = (row["virtual"]["peak_resident_kv_bytes"]
                                             / row["paged"]["peak_resident_kv_bytes"])
        return row


# ---- report ---------------------------------------------------------------------------------------
def mib(x: float) -> str:
    return f"{x / (1 << 20):.1f} MiB"


def render(results: dict) -> str:
    t, k, s, p, sh = (results["throughput"], results["kernel"], results["attention_in_step"], results["prefill"],
                      results["sharing"])
    lines = ["# Paged vs virtual KV memory on this CPU (indicative)", "",
             f"{results['meta']['cpu']}, {results['meta']['threads']} threads, {results['meta']['clock']}, load average "
             f"{results['meta']['loadavg_start']} -> {results['meta']['loadavg_end']}; model {results['meta']['model']}, "
             f"fp32; KV budget {mib(t['kv_budget_bytes'])} for both; `{results['meta']['command']}`", "",
             "| | paged (block 16) | virtual (4 KiB pages) | virtual / paged |", "|---|---|---|---|"]
    tp, tv = t["rows"]["paged"], t["rows"]["virtual"]
    wl = t["workload"]
    lines += [
        f"| throughput, {wl['name']} x{wl['num_requests']} (out tok/s) | {tp['output_tok_s']:.0f} | "
        f"{tv['output_tok_s']:.0f} | {tv['output_tok_s'] / tp['output_tok_s']:.3f}x |",
        f"| most sequences running at once | {tp['peak_running']} | {tv['peak_running']} | |",
        f"| preemptions | {tp['preemptions']} | {tv['preemptions']} | |",
        f"| mean KV utilization | {tp['mean_kv_utilization']:.1%} | {tv['mean_kv_utilization']:.1%} | |",
        f"| peak resident KV | {mib(tp['peak_resident_kv_bytes'])} (pool: {mib(tp['pool_bytes'])} committed "
        f"at start) | {mib(tv['peak_resident_kv_bytes'])} | |",
    ]
    for row in k:
        up = row["us_per_token"]
        lines.append(f"| attention kernel alone, {row['case']} (us per decoded token, all layers) | "
                     f"{up['paged bs=16']:.2f} | {up['contiguous']:.2f} | paged {row['paged_over_contiguous']:+.1%} |")
    sp, sv = s["rows"]["paged"], s["rows"]["virtual"]
    lines.append(f"| attention in the step, {s['num_requests']} x ({s['prompt_len']} + {s['output_len']}) "
                 f"(us per decoded token) | {sp['attention_us_per_token']:.1f} | {sv['attention_us_per_token']:.1f} | "
                 f"paged {s['paged_over_virtual']:+.1%} |")
    lines.append(f"| whole step, same run (us per decoded token) | {sp['step_us_per_token']:.1f} | "
                 f"{sv['step_us_per_token']:.1f} | {sv['step_us_per_token'] / sp['step_us_per_token']:.3f}x |")
    for row in p["rows"]:
        lines.append(f"| prefill {p['num_prompts']} x {p['prompt_len']}, {row['case']} (prompt tok/s) | "
                     f"{row['paged']['prompt_tok_s']:.0f} | {row['virtual']['prompt_tok_s']:.0f} | "
                     f"{row['virtual_over_paged']:.3f}x |")
        lines.append(f"| time to first token, 1 x {p['latency_prompt_len']}, {row['case']} (ms) | "
                     f"{row['paged']['latency_ms']:.0f} | {row['virtual']['latency_ms']:.0f} | "
                     f"{row['latency_virtual_vs_paged']:+.1%} |")
    for row in sh:
        if row["virtual"] is None:
            lines.append(f"| {row['case']}, sharing on for paged (out tok/s) | {row['paged']['output_tok_s']:.0f} | "
                         f"refused | |")
            continue
        lines.append(f"| {row['case']}, sharing on for paged (out tok/s) | {row['paged']['output_tok_s']:.0f} | "
                     f"{row['virtual']['output_tok_s']:.0f} | {row['virtual_over_paged_tok_s']:.3f}x |")
        lines.append(f"| {row['case']}: peak resident KV | {mib(row['paged']['peak_resident_kv_bytes'])} | "
                     f"{mib(row['virtual']['peak_resident_kv_bytes'])} | {row['virtual_over_paged_peak_kv']:.2f}x |")
    kernel_mid = statistics.median(row["paged_over_contiguous"] for row in k)
    prefill_best = max(row["virtual_over_paged"] for row in p["rows"])
    latency_best = min(row["latency_virtual_vs_paged"] for row in p["rows"])
    lines += ["", "| the papers' claim | here |", "|---|---|",
              f"| {PAPERS['kernel']} | kernel alone {kernel_mid:+.1%} (median of cases), in the step "
              f"{s['paged_over_virtual']:+.1%} |",
              f"| {PAPERS['prefill']} | best case {prefill_best:.3f}x |",
              f"| {PAPERS['latency']} | time to first token {latency_best:+.1%} (best case) |",
              "", f"Greedy outputs equal between the two models: {t['greedy_equal']}/{wl['num_requests']}; "
              f"virtual's page counter minus mincore's resident bytes at sampled steps: "
              f"{sorted(set(tv['os_minus_counter_bytes']))}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = results["throughput"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    ax = axes[0]
    token_bytes = t["token_bytes"]
    for model, color in (("paged", "tab:blue"), ("virtual", "tab:orange")):
        trace = t["rows"][model]["trace"]
        x = [r[0] / trace[-1][0] for r in trace]   # both runs on one axis: the fraction of the run's time
        unit = "blocks of 16" if model == "paged" else "4 KiB pages, warm slots included"
        ax.plot(x, [r[2] / (1 << 20) for r in trace], color=color, label=f"{model}: resident KV ({unit})")
        if model == "virtual":
            ax.plot(x, [r[4] / (1 << 20) for r in trace], color=color, lw=0.8, ls="-.",
                    label="virtual: pages of live sequences")
            ax.plot(x, [r[5] / (1 << 20) for r in trace], "--", color="tab:green",
                    label="virtual on 2 MiB pages (computed from the same slots)")
        ax.plot(x, [r[1] * token_bytes / (1 << 20) for r in trace], ":", color=color,
                label=f"{model}: live tokens x KV bytes per token")
    ax.axhline(t["rows"]["paged"]["pool_bytes"] / (1 << 20), color="grey", lw=0.8,
               label="paged pool (committed at start) = budget")
    ax.set_xlabel("fraction of the run")
    ax.set_ylabel("MiB")
    ax.set_yscale("log")
    ax.set_title(f"KV memory over a run ({t['workload']['name']}, budget {mib(t['kv_budget_bytes'])})", fontsize=9)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    ax = axes[1]
    labels, values = [], []
    tp, tv = t["rows"]["paged"], t["rows"]["virtual"]
    labels.append("throughput")
    values.append(tv["output_tok_s"] / tp["output_tok_s"])
    for row in results["kernel"]:
        labels.append(f"kernel\n{row['case'].replace('decode ', '')}")
        values.append(1 / (1 + row["paged_over_contiguous"]))
    labels.append("attention\nin step")
    values.append(1 + results["attention_in_step"]["paged_over_virtual"])
    for row in results["prefill"]["rows"]:
        labels.append(f"prefill\n{row['case']}")
        values.append(row["virtual_over_paged"])
    for row in results["sharing"]:
        if row["virtual"] is not None:
            labels.append(row["case"].replace(" sampling", "\nsampling").replace(" 341-token", "\n341-token"))
            values.append(row["virtual_over_paged_tok_s"])
    # within 5%: the run-to-run noise of this kind of measurement on a shared machine
    ax.bar(range(len(values)), values,
           color=["tab:green" if v > 1.05 else "tab:red" if v < 0.95 else "tab:gray" for v in values])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(values)), labels, fontsize=6, rotation=30)
    ax.set_ylabel("virtual speed / paged speed")
    ax.set_title("virtual vs paged (>1: virtual faster; grey: within 5%)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "model-store" / "tiny-llama"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, timed by its CPU time (for a busy machine; the step timer stays wall clock)")
    ap.add_argument("--kv-bytes", type=int, default=16 << 20, help="the KV budget of every engine (default 16 MiB)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every timed run")
    ap.add_argument("--kernel-repeats", type=int, default=7)
    ap.add_argument("--results-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "memory.png")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the script, measures nothing")
    args = ap.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    if args.smoke:
        args.repeats, args.kernel_repeats, args.max_num_seqs = 1, 2, 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    smoke = args.smoke
    started = time.perf_counter()
    results = {"meta": {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
                        "clock": "thread CPU time" if args.cpu_time else "wall clock",
                        "model": args.model, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                        "command": " ".join(["python", *([sys.argv[0]] if argv is None else ["bench/memory.py"]),
                                             *(sys.argv[1:] if argv is None else argv)])}}
    results["throughput"] = bench.throughput(workload_for_model(args.model, "sharegpt", 6 if smoke else 64,
                                                                0.1 if smoke else 0.25))
    results["kernel"] = bench.kernel_alone()
    results["attention_in_step"] = bench.attention_in_step(2 if smoke else 16, 16 if smoke else 64,
                                                           8 if smoke else 192)
    results["prefill"] = bench.prefill(2 if smoke else 4, 64 if smoke else 1024, 32 if smoke else 256,
                                       96 if smoke else 1536)
    results["sharing"] = bench.sharing(workload_for_model(args.model, "alpaca", 3 if smoke else 16, 0.5))
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    table = render(results)
    (args.results_dir / "memory.md").write_text(table)
    print(table)
    try:
        plot(results, args.plot)
        log(f"plot: {args.plot}")
    except ImportError:
        log("matplotlib is missing (pip install -e '.[bench]'): no plot")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
