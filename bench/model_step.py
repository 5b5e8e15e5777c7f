"""One model step (forward + logits of every sequence), in each model variant, at several batch sizes.

Variants are models loaded in this one process: GEMM path (oneDNN prepacked or F.linear) x dense
part (torch.compile'd everywhere; eager, which runs the compiled C++ kernels of
kernels/paged_kernels/csrc/dense_cpu.cpp where they load; or "torchops", the plain torch reference ops of
paged/models/forward_ops.py, i.e. eager before those kernels), and "probed" (from_pretrained(compile=True,
linear_backend=None): both chosen by the load-time probes). "packed+eager" runs every GEMM on the packed
kernel, so its decoder layers run as one compiled call per step (paged/models/decoder_stack.py);
"packed+per-layer" is the same model with that call turned off (one Python call per op). Each case is a decode step of B
sequences with a --context-token KV history each, or a prefill step of B new tokens in --prefill-seqs sequences; variants are
interleaved round by round and the minimum over --repeats rounds is kept (the machine is noisy).
Also prints the step-phase split (gemm / attention / other) of the eager oneDNN variant.

    python bench/model_step.py --model model-store/tiny-llama --batches 1,8,64,256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository root first, so the engine's packages import from a checkout.
sys.path.insert(0, ROOT)

from paged.models import forward_ops, llama  # noqa: E402
from paged.models.llama import AttentionMetadata, LlamaForCausalLM  # noqa: E402
from paged.step_timer import StepTimer  # noqa: E402
from throughput import cpu_model  # noqa: E402

# name: (linear_backend, dense part: "eager", "per-layer" (eager, no one-call stack), "torchops", "compiled"
# everywhere, or "probe")
VARIANTS = {"onednn+compiled": ("onednn", "compiled"), "onednn+eager": ("onednn", "eager"),
            "onednn+torchops": ("onednn", "torchops"), "torch+compiled": ("torch", "compiled"),
            "torch+eager": ("torch", "eager"), "probed": (None, "probe"), "packed+eager": ("packed", "eager"),
            "packed+per-layer": ("packed", "per-layer")}
TORCH_OPS = forward_ops.DenseOps(add_norm=forward_ops.torch_add_rms_norm, rotary=forward_ops.torch_rotary_qkv,
                                 silu_mul=forward_ops.torch_silu_and_mul)


def use_first_norm(dense: str) -> None:
    """The model's first-layer norm is a direct call (not through its ops): point it at the
    reference for a "torchops" variant, at forward_ops' choice otherwise."""
    llama.rms_norm = forward_ops.torch_rms_norm if dense == "torchops" else forward_ops.rms_norm


def make_step(args, batch: int, context: int, prefill_seqs: int, dtype: torch.dtype, block_size: int = 16):
    """Flat inputs of one step: ``batch`` decode tokens, or (prefill_seqs > 0) ``batch`` new tokens
    split over ``prefill_seqs`` sequences with no history."""
    if prefill_seqs:
        q_lens = [batch // prefill_seqs + (i < batch % prefill_seqs) for i in range(prefill_seqs)]
        kv_lens = q_lens
    else:
        q_lens, kv_lens = [1] * batch, [context + 1] * batch
    blocks = [-(-n // block_size) for n in kv_lens]
    cache = torch.zeros(args.num_layers, 2, sum(blocks) + 1, block_size, args.num_kv_heads, args.head_dim,
                        dtype=dtype)
    tables = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32)
    positions, slots, first = [], [], 0
    for i, (q, kv, nb) in enumerate(zip(q_lens, kv_lens, blocks)):
        tables[i, :nb] = torch.arange(first, first + nb)
        for p in range(kv - q, kv):
            positions.append(p)
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
        first += nb
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (sum(q_lens),), generator=gen)
    last = (starts[1:] - 1).long()

    def inputs():
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=tables,
                                 seq_lens=torch.tensor(kv_lens, dtype=torch.int32), query_start_loc=starts)
        return ids, torch.tensor(positions), [(c[0], c[1]) for c in cache], meta

    return inputs, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model-store", "tiny-llama"))
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--prefill", default="512", help="prefill step sizes in tokens ('' for none)")
    ap.add_argument("--prefill-seqs", type=int, default=4)
    ap.add_argument("--context", type=int, default=128, help="KV tokens of each decoding sequence")
    ap.add_argument("--variants", default="onednn+compiled,onednn+eager,torch+eager,probed")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "model_step.json"))
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    dtype = getattr(torch, opts.dtype)

    models = {}
    for name in opts.variants.split(","):
        backend, dense = VARIANTS[name]
        start = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(opts.model, dtype, compile=dense == "probe",
                                                 linear_backend=backend)
        model.fuse_layers = dense != "per-layer"
        if dense == "compiled":
            model.compile_dense(always=True)
        if dense == "torchops":
            model.dense_plan = forward_ops.DensePlan(ops=(TORCH_OPS,))
        models[name] = model
        print(f"loaded {name} in {time.perf_counter() - start:.1f} s: GEMMs {model.linear_backend}; "
              f"compile {model.compile_status}", flush=True)
    cases = [("decode", int(b), 0) for b in opts.batches.split(",") if b]
    cases += [("prefill", int(t), opts.prefill_seqs) for t in opts.prefill.split(",") if t]
    rows = []
    with torch.inference_mode():
        for kind, size, seqs in cases:
            inputs, last = make_step(next(iter(models.values())).args, size, opts.context, seqs, dtype)

            def step(name):
                use_first_norm(VARIANTS[name][1])
                model = models[name]
                ids, pos, caches, meta = inputs()
                return model.compute_logits(model(ids, pos, caches, meta)[last])

            best = dict.fromkeys(models, float("inf"))
            for name in models:
                step(name)
            for _ in range(opts.repeats):
                for name in models:
                    start = time.perf_counter()
                    step(name)
                    best[name] = min(best[name], time.perf_counter() - start)
            row = {"kind": kind, "tokens": size, **{name: round(t * 1e3, 3) for name, t in best.items()}}
            eager = models.get("onednn+eager")
            if eager is not None:
                timer = StepTimer(enabled=True)
                eager.step_timer = timer
                for _ in range(3):
                    with timer.phase("forward_other"):
                        step("onednn+eager")
                    timer.step_done()
                eager.step_timer = None
                split = timer.report()
                row["onednn+eager split ms"] = {k: split[k] for k in ("gemm", "attention", "forward_other")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump({"cpu": cpu_model(), "dtype": opts.dtype,
                   "threads": opts.threads, "load_avg": os.getloadavg(), "rows": rows,
                   "linear_probe": {n: m.linear_probe for n, m in models.items()},
                   "compile_status": {n: m.compile_status for n, m in models.items()}}, f, indent=1)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
