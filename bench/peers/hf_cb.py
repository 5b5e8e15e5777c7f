"""HF transformers' own continuous batching (paged KV cache, `generate_batch`'s manager).

Uses the public manager API (`model.continuous_batching_context_manager` + `add_request`) rather
than `generate_batch`, because `generate_batch` takes one max_new_tokens for all requests and
each request here has its own output length. Set-up:
- ContinuousBatchingConfig: page_size = --block-size, num_blocks = KV budget / (page_size * KV
  bytes per token) (HF's "block" is page_size tokens of every layer), max_batch_tokens and
  max_requests_per_batch as max_num_batched_tokens / max_num_seqs elsewhere, FIFO scheduler,
  allow_block_sharing=False (no prefix caching, as for every engine here), seed 0.
- Its default sizing would take 60% of RAM, hence the explicit num_blocks.
- EOS disabled (eos_token_id=-1), fp32, greedy.
- HF runs the model on a background thread (its design): docs/performance.md says why this costs
  it 1.2-2.1x on this machine's OpenMP; it is what its users get, so it is measured as is.
- Its own warm-up runs inside the context manager, before the clock starts.
KV utilization is not exposed by its public API: reported as None.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> None:
    ap = common.base_parser(__doc__)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa | paged|eager")
    args = ap.parse_args()
    common.set_threads(args.threads)
    import logging
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    workloads = common.load_workloads(args.workloads)
    per_tok = common.kv_bytes_per_token(args.model, args.dtype)
    num_blocks = args.kv_bytes // (args.block_size * per_tok)

    def load():
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.attn)
        return m.eval()

    model, load_s = common.timed(load)

    def cb_config():
        return ContinuousBatchingConfig(
            page_size=args.block_size, num_blocks=num_blocks,
            max_batch_tokens=args.max_num_batched_tokens,
            max_requests_per_batch=args.max_num_seqs, scheduler_type="fifo",
            allow_block_sharing=False, seed=0)

    def gen_config():
        # A fresh one each time: the manager mutates the config it is given.
        return GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=16)

    def run_session(prompts, olens):
        """Open a manager (warm-up inside, untimed), then time add_request .. last result."""
        import time
        with torch.no_grad(), model.continuous_batching_context_manager(
                generation_config=gen_config(), continuous_batching_config=cb_config(),
                block=True, timeout=30, warmup=True) as manager:
            t0 = time.perf_counter()
            ids = [manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=L, eos_token_id=-1)
                   for i, (p, L) in enumerate(zip(prompts, olens))]
            got = {}
            while len(got) < len(ids):
                res = manager.get_result(timeout=1)
                if res is None:
                    if not manager.is_running():
                        raise RuntimeError("HF continuous batching thread died")
                    continue
                if res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(f"HF CB request {res.request_id} failed: {res.error}")
                    got[res.request_id] = list(res.generated_tokens)
            el = time.perf_counter() - t0
        return [got[i] for i in ids], el

    wp, wo = common.warmup_workload(workloads[0], args.warmup_requests)
    (_, _), warmup_s = common.timed(lambda: run_session(wp, wo))

    results = {}
    for wl in workloads:
        common.log(f"[hf_cb] {wl.name}: {wl.num_requests} requests ...")
        outs, el = run_session(wl.prompts, wl.output_lens)
        rec = common.result_record(wl, el, outs, None)
        common.log(f"[hf_cb] {wl.name}: {rec['output_tokens_per_s']:.1f} out tok/s ({el:.1f} s)")
        results[wl.name] = rec

    common.write_result(args.out, "hf_cb", load_s, warmup_s, results,
                        {"attn_implementation": args.attn, "page_size": args.block_size,
                         "num_blocks": num_blocks, "max_batch_tokens": args.max_num_batched_tokens,
                         "max_requests_per_batch": args.max_num_seqs, "threads": args.threads,
                         "kv_bytes": args.kv_bytes, "transformers": transformers.__version__,
                         "torch": torch.__version__})


if __name__ == "__main__":
    main()
