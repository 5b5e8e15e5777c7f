"""The backbone: the engine's greedy tokens equal HuggingFace transformers' ``generate`` (fp32, CPU),
token for token, however the engine batches, chunks, pages, preempts or shares the work."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from paged import LLM, SamplingParams

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "The quick brown fox",
    "# Copyright 2024\n" * 6,
    "for i in range(10):\n    print(i)\n" * 4,
    "x",
    "Return the sum of the squares of the numbers in the list, skipping any value that is None.",
    "while True:\n    line = input()\n    if not line:\n        break\n    total += int(line)\n" * 3,
    "\"\"\"Utilities for parsing configuration files.\n\nThis module reads INI and JSON files.\"\"\"\n",
    "try:\n    value = compute()\nexcept ValueError as error:\n",
    "Héllo wörld — naïve café, 東京, emoji 🎉 and more",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n" * 5,
    "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;",
    "lambda",
    "if __name__ == '__main__':\n    main()\n",
    "with open(path) as handle:\n    data = handle.read()\n" * 8,
]
MAX_TOKENS = [24, 40, 16, 32, 20, 28, 36, 12, 24, 30, 18, 26, 22, 34, 40, 16, 20]


def hf_greedy(model_dir: str, prompts: list[str], max_tokens: list[int], dtype=torch.float32) -> list[list[int]]:
    """Reference continuations: one prompt at a time (no padding), stopping at EOS as HF does."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outputs = []
    with torch.inference_mode():
        for prompt, count in zip(prompts, max_tokens):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
            outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


@pytest.fixture(scope="module")
def llama_reference(tiny_llama_dir):
    return hf_greedy(str(tiny_llama_dir), PROMPTS, MAX_TOKENS)


def run_engine(model_dir, prompts=PROMPTS, max_tokens=MAX_TOKENS, n=1, **engine_kwargs):
    llm = LLM(str(model_dir), seed=0, **engine_kwargs)
    params = [SamplingParams(max_tokens=m, temperature=0.0, n=n) for m in max_tokens]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, outputs


def assert_pool_whole(llm: LLM) -> None:
    stats = llm.kv_stats()
    assert stats["free_blocks"] == stats["num_blocks"], stats
    assert stats["free_cpu_blocks"] == stats["num_cpu_blocks"], stats
    llm.engine.block_manager.check_invariants()


def assert_equal_to_reference(outputs, reference) -> None:
    got = [out.outputs[0].token_ids for out in outputs]
    mismatches = [i for i, (g, r) in enumerate(zip(got, reference)) if g != r]
    assert not mismatches, f"prompts {mismatches} differ: engine {[got[i] for i in mismatches]} " \
                           f"vs HF {[reference[i] for i in mismatches]}"


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_greedy_equals_hf_for_block_size(tiny_llama_dir, llama_reference, block_size):
    llm, outputs = run_engine(tiny_llama_dir, block_size=block_size, num_kv_blocks=4096 // block_size + 64)
    assert_equal_to_reference(outputs, llama_reference)
    assert_pool_whole(llm)


def test_greedy_equals_hf_with_forced_prefill_chunking(tiny_llama_dir, llama_reference):
    llm, outputs = run_engine(tiny_llama_dir, block_size=16, num_kv_blocks=512, max_num_batched_tokens=24)
    assert_equal_to_reference(outputs, llama_reference)
    assert_pool_whole(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_greedy_equals_hf_under_preemption(tiny_llama_dir, llama_reference, mode):
    llm, outputs = run_engine(tiny_llama_dir, block_size=8, num_kv_blocks=40, max_num_batched_tokens=64,
                              preemption_mode=mode)
    stats = llm.kv_stats()
    assert stats["num_recompute_preemptions"] + stats["num_swap_preemptions"] > 0, "pool was never short"
    if mode == "recompute":
        assert stats["num_swap_preemptions"] == 0 and stats["num_recompute_preemptions"] > 0
    if mode == "swap":
        assert stats["num_swap_preemptions"] > 0
    assert_equal_to_reference(outputs, llama_reference)
    assert_pool_whole(llm)


def test_greedy_equals_hf_with_prefix_cache_hits(tiny_llama_dir):
    shared = "def add(a, b):\n    return a + b\n\n\n" * 6
    prompts = [shared + tail for tail in ("def mul(a, b):", "class Point:", "import math", "x = 1")]
    max_tokens = [16, 20, 12, 18]
    reference = hf_greedy(str(tiny_llama_dir), prompts, max_tokens)
    llm = LLM(str(tiny_llama_dir), block_size=16, num_kv_blocks=256, enable_prefix_caching=True)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    first = llm.generate(prompts[:1], params[:1], use_tqdm=False)
    rest = llm.generate(prompts[1:], params[1:], use_tqdm=False)
    assert llm.kv_stats()["prefix_hits"] > 0
    assert all(out.num_cached_tokens > 0 for out in rest)
    assert_equal_to_reference(first + rest, reference)
    assert_pool_whole(llm)


def test_parallel_greedy_samples_share_the_prompt_and_equal_hf(tiny_llama_dir, llama_reference):
    llm, outputs = run_engine(tiny_llama_dir, prompts=PROMPTS[:6], max_tokens=MAX_TOKENS[:6], n=3,
                              block_size=16, num_kv_blocks=512)
    for out, reference in zip(outputs, llama_reference[:6]):
        assert [o.token_ids for o in out.outputs] == [reference] * 3
    assert_pool_whole(llm)


def test_greedy_equals_hf_on_qwen2_style_checkpoint(tiny_qwen2_dir):
    reference = hf_greedy(str(tiny_qwen2_dir), PROMPTS, MAX_TOKENS)
    llm, outputs = run_engine(tiny_qwen2_dir, block_size=16, num_kv_blocks=512, max_num_batched_tokens=48)
    assert_equal_to_reference(outputs, reference)
    assert_pool_whole(llm)


def test_greedy_equals_hf_with_llama3_rope_scaling(tiny_llama3_dir):
    reference = hf_greedy(str(tiny_llama3_dir), PROMPTS, MAX_TOKENS)
    llm, outputs = run_engine(tiny_llama3_dir, block_size=16, num_kv_blocks=512)
    assert_equal_to_reference(outputs, reference)
    assert_pool_whole(llm)


def test_bfloat16_stays_close_to_hf_bfloat16(tiny_llama_dir):
    """bf16 rounds differently op by op, so exact equality is not expected: the first tokens agree."""
    prompts, max_tokens = PROMPTS[:8], [8] * 8
    reference = hf_greedy(str(tiny_llama_dir), prompts, max_tokens, dtype=torch.bfloat16)
    llm, outputs = run_engine(tiny_llama_dir, prompts=prompts, max_tokens=max_tokens, dtype="bfloat16",
                              block_size=16, num_kv_blocks=256)
    first_tokens_equal = sum(out.outputs[0].token_ids[:1] == ref[:1] for out, ref in zip(outputs, reference))
    assert first_tokens_equal >= 6
    assert_pool_whole(llm)


def test_greedy_equals_hf_with_triton_backend_interpreted(tiny_llama3_dir):
    """The Triton kernels (run by Triton's CPU interpreter here) serve the whole engine too."""
    prompts, max_tokens = PROMPTS[:4], [6, 4, 5, 3]
    reference = hf_greedy(str(tiny_llama3_dir), prompts, max_tokens)
    llm, outputs = run_engine(tiny_llama3_dir, prompts=prompts, max_tokens=max_tokens, block_size=16,
                              num_kv_blocks=64, max_num_batched_tokens=32, attention_backend="triton")
    assert_equal_to_reference(outputs, reference)
    assert_pool_whole(llm)


def test_beam_search_equals_hf_beam_search(tiny_llama_dir):
    """Without end tokens in play (HF: min_new_tokens, ours: ignore_eos) both run the classic
    algorithm to max length, so the returned beams must agree token for token, best first."""
    prompts, width, length = PROMPTS[:4], 3, 8
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    llm = LLM(str(tiny_llama_dir), block_size=16, num_kv_blocks=256)
    outputs = llm.generate(prompts, SamplingParams(beam_width=width, n=width, max_tokens=length, ignore_eos=True,
                                                   temperature=0.0), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                                       num_return_sequences=width, max_new_tokens=length, min_new_tokens=length,
                                       do_sample=False, length_penalty=1.0, pad_token_id=0)
        assert [o.token_ids for o in out.outputs] == generated[:, ids.shape[1]:].tolist()
    assert_pool_whole(llm)
