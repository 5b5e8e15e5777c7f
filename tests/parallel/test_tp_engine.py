"""The engine with tensor_parallel_size = 2 (two torchrun ranks, shared-memory all-reduce) gives
HF transformers' greedy tokens and the single-device engine's, token for token (tie-aware, see
tp_reference.py), with chunked prefill, preemption by swap and by recompute, prefix-cache hits,
parallel samples and beam search. One group serves the whole module (starting one takes seconds).
"""
import pytest
import torch

from paged import LLM, SamplingParams
from tp_helpers import pids_alive
from tp_reference import MAX_TOKENS, PROMPTS, HFReference, compare_greedy

# A small pool (40 blocks of 8 tokens for 10 requests) forces preemption, and a token budget
# below the longest prompts forces chunked prefill.
SETTINGS = dict(block_size=8, num_kv_blocks=40, max_num_batched_tokens=64, enable_prefix_caching=True,
                preemption_mode="swap", seed=0, dtype="float32")


@pytest.fixture(scope="module")
def tp_llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tensor_parallel_size=2, **SETTINGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def single_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **SETTINGS)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return HFReference(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_tokens(hf):
    return hf.greedy(PROMPTS, MAX_TOKENS)


def greedy(llm: LLM, prompts=PROMPTS, max_tokens=MAX_TOKENS, n=1) -> list:
    params = [SamplingParams(max_tokens=m, temperature=0.0, n=n) for m in max_tokens]
    return llm.generate(prompts, params, use_tqdm=False)


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def assert_pool_whole(llm: LLM) -> None:
    stats = llm.kv_stats()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["free_cpu_blocks"] == stats["num_cpu_blocks"]
    llm.engine.scheduler.block_manager.check_invariants()


def test_each_rank_holds_one_kv_head_and_reports_its_pid(tp_llm):
    info = tp_llm.engine.performance_info()["tensor_parallel"]
    ranks = info["ranks"]
    assert info["size"] == 2 and info["state"] == "running"
    assert [r["rank"] for r in ranks] == [0, 1] and [r["kv_heads"] for r in ranks] == [1, 1]
    assert sorted(pids_alive([info["agent_pid"]] + [r["pid"] for r in ranks])) == \
        sorted([info["agent_pid"]] + [r["pid"] for r in ranks])


def test_greedy_equals_hf_and_single_device_under_swap_preemption_and_chunked_prefill(
        tp_llm, single_llm, hf, hf_tokens):
    before = tp_llm.kv_stats()["num_swap_preemptions"]
    got = tokens(greedy(tp_llm))
    assert tp_llm.kv_stats()["num_swap_preemptions"] > before, "the pool was never short"
    assert max(len(hf.prompt_ids(p)) for p in PROMPTS) > SETTINGS["max_num_batched_tokens"], "no prompt was chunked"
    compare_greedy(hf, PROMPTS, got, hf_tokens)
    compare_greedy(hf, PROMPTS, got, tokens(greedy(single_llm)))
    assert_pool_whole(tp_llm)


def test_greedy_equals_hf_under_recompute_preemption(tp_llm, hf, hf_tokens, monkeypatch):
    # The ranks do not care how the scheduler preempts: switching the mode of the running engine
    # saves starting a second group.
    monkeypatch.setattr(tp_llm.engine.config, "preemption_mode", "recompute")
    before = tp_llm.kv_stats()["num_recompute_preemptions"]
    got = tokens(greedy(tp_llm))
    assert tp_llm.kv_stats()["num_recompute_preemptions"] > before, "the pool was never short"
    compare_greedy(hf, PROMPTS, got, hf_tokens)
    assert_pool_whole(tp_llm)


def test_greedy_equals_hf_with_prefix_cache_hits(tp_llm, hf):
    shared = "def area(r):\n    return 3.14159 * r * r\n\n\n" * 3
    prompts = [shared + tail for tail in ("def perimeter(r):", "import math", "class Circle:")]
    max_tokens = [12, 16, 10]
    first = greedy(tp_llm, prompts[:1], max_tokens[:1])
    hits = tp_llm.kv_stats()["prefix_hits"]
    rest = greedy(tp_llm, prompts[1:], max_tokens[1:])
    assert tp_llm.kv_stats()["prefix_hits"] > hits and all(out.num_cached_tokens > 0 for out in rest)
    compare_greedy(hf, prompts, tokens(first + rest), hf.greedy(prompts, max_tokens))
    assert_pool_whole(tp_llm)


def test_parallel_greedy_samples_equal_hf(tp_llm, hf, hf_tokens):
    outputs = greedy(tp_llm, PROMPTS[:4], MAX_TOKENS[:4], n=3)
    for index, out in enumerate(outputs):
        samples = [o.token_ids for o in out.outputs]
        assert len(samples) == 3
        compare_greedy(hf, [PROMPTS[index]] * 3, samples, [hf_tokens[index]] * 3)
    assert_pool_whole(tp_llm)


def test_beam_search_equals_hf_beam_search(tp_llm, hf):
    """As in the single-device test: no end tokens in play, so both run the classic algorithm."""
    prompts, width, length = PROMPTS[:3], 3, 8
    outputs = tp_llm.generate(prompts, SamplingParams(beam_width=width, n=width, max_tokens=length, ignore_eos=True,
                                                      temperature=0.0), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([hf.prompt_ids(prompt)])
        with torch.inference_mode():
            generated = hf.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                                          num_return_sequences=width, max_new_tokens=length, min_new_tokens=length,
                                          do_sample=False, length_penalty=1.0, pad_token_id=0)
        assert [o.token_ids for o in out.outputs] == generated[:, ids.shape[1]:].tolist()
    assert_pool_whole(tp_llm)

