"""The model's performance paths change speed, not tokens: compiled dense regions and eager ops give
the same greedy tokens, varied batch sizes never recompile, a broken compiler falls back to eager
with one warning, and the step timer sees GEMMs and attention without changing the arithmetic."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from paged_kernels.linear import LinearPlan, onednn_unavailable_reason
from paged.models import forward_ops
from paged.models.llama import AttentionMetadata, LlamaForCausalLM
from paged.step_timer import StepTimer

BLOCK_SIZE = 16
PROMPTS = [[1, 345, 9012, 77, 5021, 18], [1, 15000, 42], [1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3],
           [1, 2001]]
# oneDNN where this host has it, so compiled-vs-eager is compared on the serving GEMM path.
GEMM = "onednn" if onednn_unavailable_reason(torch.float32) is None else "torch"


def load(model_dir, **kwargs) -> LlamaForCausalLM:
    kwargs.setdefault("linear_backend", GEMM)
    return LlamaForCausalLM.from_pretrained(str(model_dir), torch.float32, **kwargs)


def greedy(model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Prefill every prompt in one flat step, then decode all sequences together; one block table
    of consecutive blocks per sequence."""
    args = model.args
    blocks_per_seq = -(-(max(map(len, prompts)) + new_tokens) // BLOCK_SIZE)
    cache = torch.zeros(args.num_layers, 2, len(prompts) * blocks_per_seq, BLOCK_SIZE, args.num_kv_heads,
                        args.head_dim)
    caches = [(layer[0], layer[1]) for layer in cache]
    tables = torch.arange(len(prompts) * blocks_per_seq, dtype=torch.int32).view(len(prompts), blocks_per_seq)
    seqs = [list(p) for p in prompts]
    computed = [0] * len(seqs)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids, positions, slots, q_lens = [], [], [], []
            for i, seq in enumerate(seqs):
                for pos in range(computed[i], len(seq)):
                    ids.append(seq[pos])
                    positions.append(pos)
                    slots.append(int(tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
                q_lens.append(len(seq) - computed[i])
                computed[i] = len(seq)
            starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
            meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=tables,
                                     seq_lens=torch.tensor([len(s) for s in seqs], dtype=torch.int32),
                                     query_start_loc=starts)
            hidden = model(torch.tensor(ids), torch.tensor(positions), caches, meta)
            logits = model.compute_logits(hidden[(starts[1:] - 1).long()])
            for seq, token in zip(seqs, logits.argmax(-1).tolist()):
                seq.append(token)
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


@pytest.fixture(scope="module")
def eager_model(tiny_llama_dir):
    return load(tiny_llama_dir, compile=False)


@pytest.fixture(scope="module")
def compiled_model(tiny_llama_dir):
    model = load(tiny_llama_dir, compile=False)
    model.compile_dense(always=True)
    assert model.compile_status["active"], model.compile_status
    return model


@pytest.fixture(scope="module")
def eager_tokens(eager_model):
    return greedy(eager_model, PROMPTS, 12)


def test_compiled_regions_generate_the_same_greedy_tokens_as_eager(compiled_model, eager_tokens):
    assert greedy(compiled_model, PROMPTS, 12) == eager_tokens


def test_compiled_regions_compute_what_the_eager_regions_compute(compiled_model, tiny_llama_dir):
    ops = compiled_model.dense_plan.ops_for(5)
    weight = compiled_model.norm.weight
    sizes = dict(hidden_size=512, intermediate_size=1408, num_heads=8, num_kv_heads=2, head_dim=64, eps=1e-5)
    with torch.inference_mode():
        for name, eager in forward_ops.REGIONS.items():
            args = forward_ops.region_inputs(name, 5, sizes, weight)
            got, want = getattr(ops, name)(*args), eager(*args)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_varied_batch_sizes_do_not_recompile(compiled_model):
    from torch._dynamo.utils import counters

    before = dict(counters["stats"])
    greedy(compiled_model, PROMPTS[:1], 3)  # 6 prefill tokens, then 1 per step
    greedy(compiled_model, PROMPTS, 3)      # 30 prefill tokens, then 4 per step
    greedy(compiled_model, PROMPTS[:3], 2)
    assert dict(counters["stats"]) == before


def test_compile_probe_records_its_figures_and_choice(tiny_llama_dir):
    model = load(tiny_llama_dir, compile=True)
    status = model.compile_status
    assert status["requested"] and status["tokens"] == list(forward_ops.PROBE_TOKENS)
    for name in forward_ops.REGIONS:
        for eager_us, compiled_us, chosen in zip(status["eager_us"][name], status["compiled_us"][name],
                                                 status["chosen"][name]):
            margin_us = forward_ops.IN_MODEL_CALL_OVERHEAD_S * 1e6
            assert (chosen == "compiled") == (eager_us > compiled_us * forward_ops.COMPILED_MIN_SPEEDUP + margin_us)
    assert status["active"] == any("compiled" in c for c in status["chosen"].values())


def _broken_compile_at_build(fn, **kwargs):
    raise RuntimeError("no C++ compiler found")


def _broken_compile_at_first_call(fn, **kwargs):
    def compiled(*args):
        raise RuntimeError("InductorError: g++ exited with status 1")
    return compiled


@pytest.mark.parametrize("broken", [_broken_compile_at_build, _broken_compile_at_first_call])
def test_broken_compiler_falls_back_to_eager_with_one_warning(tiny_llama_dir, eager_tokens, monkeypatch, caplog,
                                                              broken):
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="paged.models.forward_ops"):
        model = load(tiny_llama_dir, compile=True)
    assert model.compile_status["requested"] and not model.compile_status["active"]
    assert "RuntimeError" in model.compile_status["reason"]
    assert [r.levelno for r in caplog.records if r.name == "paged.models.forward_ops"] == [logging.WARNING]
    assert model.dense_plan is forward_ops.EAGER_PLAN
    assert greedy(model, PROMPTS, 12) == eager_tokens


def test_step_timer_charges_gemm_and_attention_without_changing_results(eager_model, compiled_model):
    timer = StepTimer(enabled=True)
    compiled_model.step_timer = timer
    try:
        timed = greedy(compiled_model, PROMPTS, 4)
    finally:
        compiled_model.step_timer = None
    report = timer.report()
    assert report["gemm"] > 0 and report["attention"] > 0
    # A timed forward runs the eager ops, one by one: exactly the eager model's arithmetic.
    assert timed == greedy(eager_model, PROMPTS, 4)


def test_disabled_step_timer_records_nothing(compiled_model):
    timer = StepTimer(enabled=False)
    compiled_model.step_timer = timer
    try:
        greedy(compiled_model, PROMPTS[:1], 2)
    finally:
        compiled_model.step_timer = None
    assert all(value == 0 for key, value in timer.report().items() if key != "num_steps")


def test_steps_in_one_row_range_reuse_the_layers_bound_for_it(tiny_llama_dir):
    model = load(tiny_llama_dir, compile=False, linear_backend="torch")
    plan = LinearPlan(torch.float32, limits=(4, math.inf), paths=("torch", "torch"))  # two row ranges
    for linear in model.linears():
        linear.apply_plan(plan)
    model.linear_plan, model.bound = plan, {}
    ops, layers, _ = model.bound_layers(2)
    assert model.bound_layers(4)[1] is layers and model.bound_layers(1)[1] is layers
    assert model.bound_layers(5)[1] is not layers
    assert len(layers) == model.args.num_layers and ops is model.dense_plan.ops_for(2)


def test_a_new_gemm_plan_is_bound_at_the_next_step(tiny_llama_dir):
    model = load(tiny_llama_dir, compile=False)
    greedy(model, PROMPTS[:1], 2)
    before = model.bound_layers(1)[1]
    model.choose_linear_backend("torch", torch.float32, "cpu")
    after = model.bound_layers(1)[1]
    assert after is not before
    qkv = model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(after[0].attention.qkv_proj(x), F.linear(x, qkv.weight, qkv.bias))
