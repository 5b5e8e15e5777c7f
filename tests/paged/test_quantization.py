"""Weight-only int8 (``quantization="int8"``): the model's logits stay close to the unquantized
model's, the engine runs end to end with it, and it is off unless asked for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paged import LLM, SamplingParams
from paged.models.llama import AttentionMetadata, LlamaForCausalLM
from paged_kernels.linear import path_unavailable_reason

PROMPT = [1, 345, 9012, 77, 5021, 18, 15000, 42, 7, 7, 2001, 300, 301, 302, 1000, 999, 5, 6, 7, 8]
BLOCK_SIZE = 16


def prompt_logits(model: LlamaForCausalLM, prompt: list[int]) -> torch.Tensor:
    """fp32 logits at every position of one prompt, prefilled in one step."""
    args = model.args
    blocks = -(-len(prompt) // BLOCK_SIZE)
    cache = torch.zeros(args.num_layers, 2, blocks, BLOCK_SIZE, args.num_kv_heads, args.head_dim,
                        dtype=model.embed_tokens.weight.dtype)
    meta = AttentionMetadata(slot_mapping=torch.arange(len(prompt)),
                             block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                             seq_lens=torch.tensor([len(prompt)], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, len(prompt)], dtype=torch.int32))
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), [(layer[0], layer[1]) for layer in cache], meta)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_logits_stay_close_to_the_unquantized_model(tiny_llama_dir, dtype):
    """On the tiny random model int8 weights moved the logits ~5% (max error over max logit;
    bf16 alone moves them ~3%), cosine >= 0.996; the bounds leave room for other hosts' paths."""
    reference = prompt_logits(LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype, linear_backend="torch"),
                              PROMPT)
    # The packed kernel where it runs (no probe: faster to load); the engine test below probes.
    backend = "packed" if path_unavailable_reason("packed", dtype, "int8") is None else None
    quantized = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype, linear_backend=backend,
                                                 quantization="int8")
    assert quantized.linear_backend.startswith("int8")
    logits = prompt_logits(quantized, PROMPT)
    assert float((logits - reference).abs().max() / reference.abs().max()) < 0.15
    assert float(F.cosine_similarity(logits, reference, dim=-1).min()) > 0.99
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.7


def test_engine_generates_end_to_end_with_int8_weights(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", quantization="int8", num_kv_blocks=64, seed=0)
    params = [SamplingParams(max_tokens=8, temperature=0.0), SamplingParams(max_tokens=5, temperature=0.8, seed=1)]
    outputs = llm.generate([PROMPT, "hello there"], params, use_tqdm=False)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [8, 5]
    assert all(out.outputs[0].finish_reason == "length" for out in outputs)
    assert llm.engine.performance_info()["linear_backend"].startswith("int8")
    stats = llm.kv_stats()
    assert stats["free_blocks"] == stats["num_blocks"]


def test_quantization_is_off_by_default(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), torch.float32, linear_backend="torch")
    assert model.linear_backend == "torch" and all(layer.int8 is None for layer in model.linears())
