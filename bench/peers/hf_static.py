"""HF transformers `generate` with static, left-padded batches: the baseline most users start from.

Fairness choices (all in HF's favour where there was a choice):
- Requests are sorted by output length (longest first, prompt length as tie-break) before being
  cut into batches, so a batch's members want similar lengths and little compute is wasted.
- A batch generates to its longest member's output length (HF `generate` has one max_new_tokens
  per call); only each request's own first `output_len` tokens are kept and counted, so the
  throughput numerator is the same for every engine.
- EOS is ignored (generation_config.eos_token_id = None), like `ignore_eos` elsewhere.
- A batch never holds more KV than the budget: batch * (padded prompt + batch max output) *
  bytes per token <= --kv-bytes (a batch is cut early if the next request would overflow).
- --batch-sizes takes a list: each size runs the whole workload and the best one is reported
  (the others are kept under "sweep").

KV utilization (computed, as HF's DynamicCache is dense): at decode step t of a batch the cache
holds batch * (padded prompt + t) slots; the live ones are those of members still within their
own output length (their prompt + t). The per-step ratio is averaged over all decode steps of
the run, as our engine's kv_stats()["mean_kv_utilization"] does.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def plan_batches(prompt_lens: list[int], output_lens: list[int], batch_size: int,
                 kv_token_budget: int) -> list[list[int]]:
    order = sorted(range(len(prompt_lens)), key=lambda i: (-output_lens[i], -prompt_lens[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        cand = cur + [i]
        need = len(cand) * (max(prompt_lens[j] for j in cand) + max(output_lens[j] for j in cand))
        if cur and (len(cand) > batch_size or need > kv_token_budget):
            batches.append(cur)
            cur = [i]
        else:
            cur = cand
    if cur:
        batches.append(cur)
    return batches


def batch_kv_utilization(plens: list[int], olens: list[int]) -> tuple[float, int]:
    """(sum over decode steps of live/allocated slots, number of decode steps) of one padded batch."""
    P, T, B = max(plens), max(olens), len(plens)
    total = 0.0
    for t in range(1, T + 1):
        total += sum(p + t for p, o in zip(plens, olens) if t <= o) / (B * (P + t))
    return total, T


def main() -> None:
    ap = common.base_parser(__doc__)
    ap.add_argument("--batch-sizes", default="32,64",
                    help="comma-separated; each runs the whole workload, the best is reported")
    ap.add_argument("--batch-size-for", action="append", default=[], metavar="WORKLOAD=BS",
                    help="use only this batch size for this workload (overrides --batch-sizes)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager)")
    args = ap.parse_args()
    common.set_threads(args.threads)
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.set_num_threads(args.threads)

    workloads = common.load_workloads(args.workloads)
    kv_tok = args.kv_bytes // common.kv_bytes_per_token(args.model, args.dtype)

    def load():
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.attn)
        m.eval()
        m.generation_config.eos_token_id = None  # ignore EOS: every request runs to its length
        return m

    model, load_s = common.timed(load)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.no_grad()
    def run(prompts: list[list[int]], olens: list[int], batch_size: int):
        plens = [len(p) for p in prompts]
        outs: list[list[int] | None] = [None] * len(prompts)
        util_sum, util_steps = 0.0, 0
        for b in plan_batches(plens, olens, batch_size, kv_tok):
            P = max(plens[i] for i in b)
            T = max(olens[i] for i in b)
            ids = torch.full((len(b), P), pad_id, dtype=torch.long)
            mask = torch.zeros((len(b), P), dtype=torch.long)
            for r, i in enumerate(b):
                ids[r, P - plens[i]:] = torch.tensor(prompts[i])
                mask[r, P - plens[i]:] = 1
            cfg = GenerationConfig(do_sample=False, max_new_tokens=T, min_new_tokens=None,
                                   eos_token_id=None, pad_token_id=pad_id)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            for r, i in enumerate(b):
                outs[i] = gen[r, P:P + olens[i]].tolist()
            u, n = batch_kv_utilization([plens[i] for i in b], [olens[i] for i in b])
            util_sum += u
            util_steps += n
        return outs, (util_sum / util_steps if util_steps else None)

    wp, wo = common.warmup_workload(workloads[0], args.warmup_requests)
    _, warmup_s = common.timed(lambda: run(wp, wo, len(wp)))

    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    fixed = {k: int(v) for k, v in (item.split("=", 1) for item in args.batch_size_for)}
    results = {}
    for wl in workloads:
        sweep = {}
        best = None
        for bs in ([fixed[wl.name]] if wl.name in fixed else sizes):
            common.log(f"[hf_static] {wl.name}: batch size {bs} ...")
            (outs, util), el = common.timed(lambda: run(wl.prompts, wl.output_lens, bs))
            rec = common.result_record(wl, el, outs, util, batch_size=bs)
            common.log(f"[hf_static] {wl.name}: batch {bs}: {rec['output_tokens_per_s']:.1f} out tok/s "
                       f"({el:.1f} s), KV util {util:.3f}")
            sweep[bs] = {k: rec[k] for k in ("elapsed_s", "output_tokens_per_s", "mean_kv_utilization")}
            if best is None or rec["output_tokens_per_s"] > best["output_tokens_per_s"]:
                best = rec
        best["sweep"] = sweep
        results[wl.name] = best

    common.write_result(args.out, "hf_static", load_s, warmup_s, results,
                        {"batch_sizes": sizes, "batch_size_for": fixed, "attn_implementation": args.attn, "threads": args.threads,
                         "kv_bytes": args.kv_bytes, "kv_token_budget": kv_tok,
                         "transformers": __import__("transformers").__version__,
                         "torch": torch.__version__})


if __name__ == "__main__":
    main()
