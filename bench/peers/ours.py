"""Our engine (`paged.LLM`) on the benchmark workloads.

Same set-up as the peers: --dtype (fp32 by default), greedy, ignore_eos, prefix caching off, the KV budget as
kv_cache_memory_bytes, block_size / max_num_seqs / max_num_batched_tokens from the command line
(defaults 16 / 256 / 2048), 2 threads. Everything runs on the main thread (docs/performance.md: the
thread that steps the model must be the first to run torch ops). Mean KV utilization is the
engine's own per-step live/allocated slots, averaged over the steps of each workload's run.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(common.BENCH_DIR)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _util_counters(llm):
    stats = llm.kv_stats()
    return stats["kv_utilization_sum"], stats["kv_utilization_steps"]


def main() -> None:
    ap = common.base_parser(__doc__)
    ap.add_argument("--prefix-caching", action="store_true", help="(off for the throughput run)")
    ap.add_argument("--quantization", default=None, choices=("int8",),
                    help="weight-only int8 GEMMs (EngineConfig.quantization); no peer runs the same")
    args = ap.parse_args()
    common.set_threads(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    from paged import LLM, SamplingParams

    workloads = common.load_workloads(args.workloads)
    llm, load_s = common.timed(lambda: LLM(
        args.model, block_size=args.block_size, kv_cache_memory_bytes=args.kv_bytes,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=args.prefix_caching, dtype=args.dtype,
        quantization=args.quantization, seed=0))

    def run(prompts, olens):
        params = [SamplingParams(max_tokens=L, temperature=0.0, ignore_eos=True) for L in olens]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    wp, wo = common.warmup_workload(workloads[0], args.warmup_requests)
    _, warmup_s = common.timed(lambda: run(wp, wo))

    results = {}
    for wl in workloads:
        common.log(f"[ours] {wl.name}: {wl.num_requests} requests ...")
        before = _util_counters(llm)
        outs, el = common.timed(lambda: run(wl.prompts, wl.output_lens))
        after = _util_counters(llm)
        stats = llm.kv_stats()
        if before and after and after[1] > before[1]:
            util = (after[0] - before[0]) / (after[1] - before[1])
        else:  # engine-lifetime mean (includes the warm-up)
            util = stats.get("mean_kv_utilization")
        rec = common.result_record(
            wl, el, outs, util,
            kv_stats={k: stats.get(k) for k in ("num_blocks", "block_size", "num_recompute_preemptions",
                                                 "num_swap_preemptions", "num_steps")})
        common.log(f"[ours] {wl.name}: {rec['output_tokens_per_s']:.1f} out tok/s ({el:.1f} s), "
                   f"KV util {util if util is None else round(util, 4)}")
        results[wl.name] = rec

    common.write_result(args.out, "ours", load_s, warmup_s, results,
                        {"block_size": args.block_size, "kv_bytes": args.kv_bytes,
                         "max_num_seqs": args.max_num_seqs,
                         "max_num_batched_tokens": args.max_num_batched_tokens,
                         "prefix_caching": args.prefix_caching, "threads": args.threads,
                         "dtype": args.dtype, "quantization": args.quantization,
                         "torch": torch.__version__, **llm.engine.performance_info()})


if __name__ == "__main__":
    main()
