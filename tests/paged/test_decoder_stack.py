"""The decoder layers as one compiled call (paged/models/decoder_stack.py) compute what the
per-layer Python path computes, bit for bit: the same hidden states and the same KV written, on
prefill and decode rows in one step, with and without a qkv bias, int8 weights, and on paged or
contiguous KV. Where a row range cannot run as one call, the model runs its layers and says why."""
from __future__ import annotations

import pytest
import torch

from paged.models.decoder_stack import DecoderStack, describe_stack, unfused_reason
from paged.models.forward_ops import EAGER_OPS, TimedOps
from paged.models.llama import AttentionMetadata, LlamaForCausalLM
from paged.step_timer import StepTimer
from paged_kernels.linear import LinearPlan

# Two steps over three sequences: first their prompts (5, 3 and 9 tokens), then a decode token for
# the first two and the next chunk (4 tokens) of the third: prefill and decode rows in one batch.
STEPS = ([5, 3, 9], [1, 1, 4])
BLOCK_SIZE = 8
BLOCKS_PER_SEQ = 3


def load(model_dir, dtype: torch.dtype, quantization: str | None = None) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype, linear_backend="packed",
                                            quantization=quantization)


def run_steps(model: LlamaForCausalLM, fused: bool, contiguous: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The hidden states of each step of ``STEPS`` and the KV cache after them, from an empty cache.
    Contiguous KV is one block of ``BLOCK_SIZE * BLOCKS_PER_SEQ`` slots per sequence."""
    model.fuse_layers = fused
    args, num_seqs = model.args, len(STEPS[0])
    block_size, blocks_per_seq = (BLOCK_SIZE * BLOCKS_PER_SEQ, 1) if contiguous else (BLOCK_SIZE, BLOCKS_PER_SEQ)
    dtype = model.norm.weight.dtype
    cache = torch.zeros(args.num_layers, 2, num_seqs * blocks_per_seq, block_size, args.num_kv_heads, args.head_dim,
                        dtype=dtype)
    caches = [(layer[0], layer[1]) for layer in cache]
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
    generator = torch.Generator().manual_seed(0)
    lengths, hidden_states = [0] * num_seqs, []
    with torch.inference_mode():
        for q_lens in STEPS:
            positions = [pos for seq, q_len in enumerate(q_lens) for pos in range(lengths[seq], lengths[seq] + q_len)]
            owners = [seq for seq, q_len in enumerate(q_lens) for _ in range(q_len)]
            slots = [int(tables[seq, pos // block_size]) * block_size + pos % block_size
                     for seq, pos in zip(owners, positions)]
            lengths = [length + q_len for length, q_len in zip(lengths, q_lens)]
            meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=tables,
                                     seq_lens=torch.tensor(lengths, dtype=torch.int32),
                                     query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32),
                                     seq_slots=tables[:, 0].contiguous() if contiguous else None)
            ids = torch.randint(3, args.vocab_size, (len(positions),), generator=generator)
            hidden_states.append(model(ids, torch.tensor(positions), caches, meta))
    return hidden_states, cache


def assert_same_as_per_layer(monkeypatch, model: LlamaForCausalLM, contiguous: bool = False) -> None:
    calls = []
    one_call = DecoderStack.__call__
    monkeypatch.setattr(DecoderStack, "__call__", lambda *args: calls.append(1) or one_call(*args))
    fused_hidden, fused_cache = run_steps(model, fused=True, contiguous=contiguous)
    assert len(calls) == len(STEPS), "every step must run as one call for this comparison to mean anything"
    layer_hidden, layer_cache = run_steps(model, fused=False, contiguous=contiguous)
    assert len(calls) == len(STEPS)
    for fused, per_layer in zip(fused_hidden, layer_hidden):
        assert torch.equal(fused, per_layer)
    assert torch.equal(fused_cache, layer_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_call_equals_the_per_layer_path(monkeypatch, compiled_ops, tiny_llama_dir, dtype):
    assert_same_as_per_layer(monkeypatch, load(tiny_llama_dir, dtype))


def test_one_call_equals_the_per_layer_path_with_a_qkv_bias(monkeypatch, compiled_ops, tiny_qwen2_dir):
    model = load(tiny_qwen2_dir, torch.float32)
    assert model.args.attention_bias
    assert_same_as_per_layer(monkeypatch, model)


def test_one_call_equals_the_per_layer_path_with_int8_weights(monkeypatch, compiled_ops, tiny_llama_dir):
    assert_same_as_per_layer(monkeypatch, load(tiny_llama_dir, torch.bfloat16, quantization="int8"))


def test_one_call_equals_the_per_layer_path_on_contiguous_kv(monkeypatch, compiled_ops, tiny_llama_dir):
    assert_same_as_per_layer(monkeypatch, load(tiny_llama_dir, torch.float32), contiguous=True)


def test_rows_another_gemm_path_runs_stay_per_layer(compiled_ops, tiny_llama_dir):
    model = load(tiny_llama_dir, torch.float32)
    plan = LinearPlan(dtype=torch.float32, limits=(8, float("inf")), paths=("packed", "torch"))
    for linear in model.linears():
        linear.apply_plan(plan)
    model.linear_plan, model.bound = plan, {}
    assert unfused_reason(model, 8, EAGER_OPS) is None
    assert unfused_reason(model, 9, EAGER_OPS) == "the GEMM plan gives 9 rows the torch path"
    assert model.bound_layers(9)[2] is None and model.bound_layers(8)[2] is not None
    assert describe_stack(model) == ("one call for rows 1-8; per layer (the GEMM plan gives 9 rows the torch path) "
                                     "for rows 9-")


def test_a_step_timer_runs_the_layers_one_by_one(compiled_ops, tiny_llama_dir):
    model = load(tiny_llama_dir, torch.float32)
    timer = StepTimer(enabled=True)
    assert unfused_reason(model, 1, TimedOps(timer)) == "the dense ops are compiled or timed for these rows"
    model.step_timer = timer
    assert model.bound_layers(1)[2] is None


def test_turned_off_is_reported(compiled_ops, tiny_llama_dir):
    model = load(tiny_llama_dir, torch.float32)
    assert describe_stack(model) == "one call"
    model.fuse_layers = False
    assert describe_stack(model) == "per layer (turned off)"


def test_the_engine_setting_turns_the_one_call_off(compiled_ops, tiny_llama_dir):
    from paged import LLM

    for fuse in (True, False):
        llm = LLM(str(tiny_llama_dir), dtype="float32", linear_backend="packed", num_kv_blocks=32,
                  fuse_decoder_layers=fuse)
        try:
            expected = "one call" if fuse else "per layer (turned off)"
            assert llm.engine.performance_info()["decoder_stack"] == expected
        finally:
            llm.close()


def test_a_model_the_stack_cannot_run_never_builds_the_cpu_library_for_it(tiny_llama_dir, monkeypatch):
    # A model on a GPU asks too: the answer must come before the (slow) CPU library build.
    from paged_kernels import cpu_extension

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), torch.float32, linear_backend="torch")
    monkeypatch.setattr(cpu_extension, "load", lambda: pytest.fail("the CPU library was asked for"))
    assert unfused_reason(model, 1, EAGER_OPS) == "self_attn.qkv_proj is not a packed Linear"
