"""The engine on ``kv_memory: virtual``: greedy tokens equal HF's (so the paged engine's) however it
batches, chunks or preempts; every page goes back (the OS says so: mincore); ``kv_stats`` reports
resident KV on the same scale for both memory models; and what virtual memory cannot do (block
sharing, pins, tensor parallel, CUDA) is refused with the field named. Block-size parameters do
not apply: a sequence's KV is one contiguous slot.
"""
from __future__ import annotations

import pytest
import torch
from test_hf_equivalence import MAX_TOKENS, PROMPTS, assert_matches_reference, hf_greedy

from paged import LLM, EngineConfig, SamplingParams
from paged.errors import InvalidRequestError
from paged_handler.settings import parse_handler_config

PAGE = 4096
# Ten of the suite's prompts (one of 94 tokens with its output) keep the added time small.
NUM_PROMPTS = 10
VIRTUAL = dict(kv_memory="virtual", dtype="float32", seed=0, max_num_seqs=32)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return hf_greedy(str(tiny_llama_dir), PROMPTS[:NUM_PROMPTS], MAX_TOKENS[:NUM_PROMPTS])


@pytest.fixture(scope="module")
def virtual_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), kv_cache_memory_bytes=64 << 20, **VIRTUAL)


def generate(llm: LLM, prompts=PROMPTS[:NUM_PROMPTS], max_tokens=MAX_TOKENS[:NUM_PROMPTS],
             **params) -> list[list[int]]:
    outputs = llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0, **params) for m in max_tokens],
                           use_tqdm=False)
    return [out.outputs[0].token_ids for out in outputs]


def assert_pages_back(llm: LLM) -> None:
    """No sequence holds KV; what stays committed is the warm slots' (deferred reclaim), equal to
    what the OS has resident; emptying the cache brings the mapping back to zero pages."""
    manager = llm.engine.scheduler.kv_manager
    manager.check_invariants()
    cache, stats = manager.cache, llm.kv_stats()
    assert not manager.slots and not manager.swapped and stats["swap_bytes_used"] == 0
    assert stats["committed_pages"] == stats["warm_pages"] == (stats["warm_slots"] and stats["committed_pages"])
    assert cache.resident_bytes() == stats["resident_kv_bytes"] == stats["committed_pages"] * PAGE
    llm.engine.scheduler.reset_kv_cache()
    assert cache.resident_bytes() == 0 and llm.kv_stats()["resident_kv_bytes"] == 0


@pytest.mark.smoke
def test_virtual_greedy_equals_hf_with_contiguous_attention(virtual_llm, reference):
    assert_matches_reference(generate(virtual_llm), reference)
    info = virtual_llm.engine.performance_info()
    assert info["attention_layout"] == "contiguous" and info["kv_memory"]["kv_memory"] == "virtual"
    assert info["kv_memory"]["reclaim"] == "deferred" and info["kv_memory"]["page_bytes"] == PAGE
    assert_pages_back(virtual_llm)


def test_virtual_greedy_equals_hf_with_forced_prefill_chunking(tiny_llama_dir, reference):
    llm = LLM(str(tiny_llama_dir), kv_cache_memory_bytes=16 << 20, max_num_batched_tokens=24,
              kv_deferred_reclaim=False, **VIRTUAL)
    assert_matches_reference(generate(llm), reference)
    assert llm.kv_stats()["resident_kv_bytes"] == 0 == llm.engine.scheduler.kv_manager.cache.resident_bytes()
    assert_pages_back(llm)


@pytest.mark.parametrize("mode, deferred", [("recompute", True), ("swap", False)])
def test_virtual_greedy_equals_hf_under_preemption(tiny_llama_dir, reference, mode, deferred):
    # 208 pages of 4 KiB: the longest of these requests takes 176 (16 regions x 11 pages)
    llm = LLM(str(tiny_llama_dir), kv_cache_memory_bytes=208 * PAGE, max_num_batched_tokens=64,
              preemption_mode=mode, kv_deferred_reclaim=deferred, **VIRTUAL)
    assert_matches_reference(generate(llm), reference)
    stats = llm.kv_stats()
    preemptions = stats[f"num_{mode}_preemptions"]
    assert preemptions > 0 and stats["num_recompute_preemptions"] + stats["num_swap_preemptions"] == preemptions
    assert stats["peak_resident_kv_bytes"] <= stats["kv_budget_bytes"] == 208 * PAGE
    assert_pages_back(llm)


def test_virtual_bfloat16_stays_close_to_hf_bfloat16(tiny_llama_dir):
    """bf16 rounds differently op by op, so exact equality with HF is not expected: the first tokens
    agree. The paged engine's tokens are equal: both kernels add in the same order."""
    prompts, max_tokens = PROMPTS[:6], [4] * 6
    reference = hf_greedy(str(tiny_llama_dir), prompts, max_tokens, dtype=torch.bfloat16)
    llm = LLM(str(tiny_llama_dir), kv_cache_memory_bytes=16 << 20, **{**VIRTUAL, "dtype": "bfloat16"})
    got = generate(llm, prompts, max_tokens)
    assert sum(tokens[:1] == ref.tokens[:1] for tokens, ref in zip(got, reference)) >= 5
    paged = LLM(str(tiny_llama_dir), dtype="bfloat16", block_size=16, kv_cache_memory_bytes=16 << 20)
    assert generate(paged, prompts, max_tokens) == got
    assert_pages_back(llm)


def test_virtual_greedy_equals_hf_with_triton_backend_interpreted(tiny_llama3_dir):
    """The Triton contiguous kernel (run by Triton's CPU interpreter here) serves the engine too."""
    prompts, max_tokens = PROMPTS[:3], [4, 3, 3]
    reference = hf_greedy(str(tiny_llama3_dir), prompts, max_tokens)
    llm = LLM(str(tiny_llama3_dir), kv_cache_memory_bytes=16 << 20, max_num_batched_tokens=32,
              attention_backend="triton", **VIRTUAL)
    assert_matches_reference(generate(llm, prompts, max_tokens), reference)
    assert llm.engine.performance_info()["attention"] == "triton"
    assert_pages_back(llm)


def test_kv_stats_report_resident_kv_on_one_scale_for_both_models(tiny_llama_dir, virtual_llm):
    paged = LLM(str(tiny_llama_dir), dtype="float32", block_size=16, kv_cache_memory_bytes=16 << 20,
                enable_prefix_caching=False)
    generate(paged, PROMPTS[:3], [5, 5, 5])
    generate(virtual_llm, PROMPTS[:3], [5, 5, 5])
    stats = {"paged": paged.kv_stats(), "virtual": virtual_llm.kv_stats()}
    for model, s in stats.items():
        assert s["kv_memory"] == model
        for key in ("resident_kv_bytes", "peak_resident_kv_bytes", "kv_budget_bytes", "kv_usage", "live_tokens",
                    "mean_kv_utilization", "num_running", "num_swap_preemptions"):
            assert key in s, (model, key)
        assert 0 < s["peak_resident_kv_bytes"] <= s["kv_budget_bytes"]
    p, v = stats["paged"], stats["virtual"]
    assert p["resident_kv_bytes"] == 0 and p["block_bytes"] == 16 * 8192  # freed blocks hold nothing
    bm = paged.engine.scheduler.kv_manager
    assert p["peak_resident_kv_bytes"] == bm.peak_blocks_off_free_list * p["block_bytes"] > 0
    assert v["resident_kv_bytes"] == virtual_llm.engine.scheduler.kv_manager.cache.resident_bytes()
    assert {"num_blocks", "free_blocks"} <= set(p) and not {"num_blocks", "free_blocks"} & set(v)
    assert {"page_bytes", "committed_pages", "warm_slots"} <= set(v)


# ---- what virtual memory refuses ----------------------------------------------------------------
@pytest.mark.parametrize("settings, field", [
    (dict(kv_memory="virtual", enable_prefix_caching=True), "enable_prefix_caching"),
    (dict(kv_memory="virtual", cpu_prefix_cache_bytes=1 << 20), "cpu_prefix_cache_bytes"),
    (dict(kv_memory="virtual", block_size="auto"), "block_size"),
    (dict(kv_memory="virtual", num_kv_blocks=64), "num_kv_blocks"),
    (dict(kv_memory="virtual", tensor_parallel_size=2), "tensor_parallel_size"),
    (dict(kv_memory="virtual", device="cuda"), "device"),
    (dict(kv_memory="paged", kv_huge_pages=False), "kv_huge_pages"),
    (dict(kv_memory="paged", kv_deferred_reclaim=True), "kv_deferred_reclaim"),
    (dict(kv_memory="virtual", kv_huge_pages="yes"), "kv_huge_pages"),
    (dict(kv_memory="contiguous"), "kv_memory"),
])
def test_settings_virtual_memory_cannot_take_are_refused_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="m", **settings)


def test_virtual_turns_prefix_caching_off_by_default_and_paged_keeps_it_on():
    assert EngineConfig(model="m", kv_memory="virtual", dtype="float32").enable_prefix_caching is False
    assert EngineConfig(model="m", dtype="float32").enable_prefix_caching is True
    with pytest.raises(ValueError, match="set enable_prefix_caching to false"):
        EngineConfig(model="m", kv_memory="virtual", enable_prefix_caching=True, dtype="float32")
    assert "cuMemMap" in str(pytest.raises(ValueError, EngineConfig, model="m", kv_memory="virtual",
                                           device="cuda:0").value)


@pytest.mark.parametrize("params, field", [
    (dict(n=2), "n"), (dict(n=1, best_of=3, temperature=0.8), "best_of"), (dict(beam_width=2, n=2), "beam_width"),
])
def test_requests_of_several_sequences_are_refused_naming_the_field(virtual_llm, params, field):
    with pytest.raises(InvalidRequestError, match="kv_memory 'virtual'") as error:
        virtual_llm.generate(["x"], SamplingParams(max_tokens=4, **params), use_tqdm=False)
    assert error.value.param == field
    assert not virtual_llm.engine.has_unfinished_requests()


def test_pinned_prefixes_are_refused_by_the_engine_and_the_handler_setting(virtual_llm, tmp_path):
    with pytest.raises(InvalidRequestError, match="kv_memory 'paged'"):
        virtual_llm.register_prefix("You are a helpful assistant.\n" * 4)
    assert not virtual_llm.engine.has_unfinished_requests() and virtual_llm.kv_stats()["num_running"] == 0
    with pytest.raises(ValueError, match="shared_prefixes"):
        parse_handler_config({"kv_memory": "virtual", "shared_prefixes": ["You are a helpful assistant."]},
                             str(tmp_path))
    config, _ = parse_handler_config({"kv_memory": "virtual", "kv_huge_pages": False}, str(tmp_path))
    assert config.kv_memory == "virtual" and config.enable_prefix_caching is False


def test_a_request_longer_than_the_page_budget_is_refused(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_cache_memory_bytes=64 * PAGE, **VIRTUAL)   # 4 pages a region: 32 tokens
    with pytest.raises(InvalidRequestError, match="KV pages") as error:
        llm.generate(["x" * 10], SamplingParams(max_tokens=40), use_tqdm=False)
    assert error.value.param == "max_tokens"
