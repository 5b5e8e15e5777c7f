"""Pinned shared prefixes and the CPU tier of the prefix cache, through the engine: tokens computed
(``kv_stats()["prompt_tokens_total"]``), hits, and greedy outputs equal to the cache-off outputs,
with chunked prefill and preemption by recompute."""
from __future__ import annotations

import pytest

from paged import LLM, EngineConfig, SamplingParams

BS = 16
PREFIX = list(range(1000, 1000 + 4 * BS))          # four full blocks of token ids
TAILS = [[7, 8, 9, 10, 11], [20, 21, 22], list(range(300, 318)), [5, 4, 3, 2, 1, 0, 9], list(range(40, 53)), [60, 61]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LONGER = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


PREFILL_ONLY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def flood_prompts(n: int = 6, length: int = 6 * BS, first_token: int = 2000) -> list[list[int]]:
    return [[first_token + 97 * i + j for j in range(length)] for i in range(n)]


def flood(llm: LLM, n: int = 6, length: int = 6 * BS, first_token: int = 2000) -> None:
    """Unrelated prompts, enough to evict every unpinned cached block of a small pool."""
    llm.generate(flood_prompts(n, length, first_token), PREFILL_ONLY, use_tqdm=False)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def generate(llm: LLM, prompts, params=GREEDY):
    return llm.generate(prompts, params, use_tqdm=False)


def prompt_tokens(llm: LLM) -> int:
    return llm.kv_stats()["prompt_tokens_total"]


def assert_pool_whole(llm: LLM) -> None:
    bm = llm.engine.scheduler.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Greedy outputs with the prefix cache off: what every cache arrangement must reproduce."""
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=256, max_model_len=256,
              enable_prefix_caching=False, dtype="float32")
    prompts = [PREFIX + t for t in TAILS]
    return dict(zip(map(tuple, prompts), token_ids(generate(llm, prompts, LONGER))))


def expected(reference, prompts, max_tokens: int = GREEDY.max_tokens) -> list[list[int]]:
    """Greedy output is a prefix of the longer greedy output (EOS is ignored)."""
    return [reference[tuple(p)][:max_tokens] for p in prompts]


# ---- pinned prefixes -----------------------------------------------------------------------------
def test_a_request_behind_a_pinned_prefix_computes_only_its_own_tokens_even_after_a_flood(tiny_llama_dir, reference):
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=32, max_model_len=256, swap_space_bytes=0, dtype="float32")
    assert llm.register_prefix(PREFIX + [5]) == len(PREFIX), "the full blocks are pinned"
    before = prompt_tokens(llm)
    first = generate(llm, [PREFIX + TAILS[0]])
    assert prompt_tokens(llm) - before == len(TAILS[0])
    flood(llm)                                                     # evicts everything not pinned
    assert llm.engine.scheduler.block_manager.find_cached_prefix(flood_prompts()[0]) == [], "the flood itself was evicted"
    before = prompt_tokens(llm)
    rest = generate(llm, [PREFIX + t for t in TAILS[1:]])
    assert prompt_tokens(llm) - before == sum(len(t) for t in TAILS[1:])
    assert token_ids(first + rest) == expected(reference, [PREFIX + t for t in TAILS])
    assert llm.engine.shared_prefixes()[0]["hit_tokens"] == len(PREFIX) * len(TAILS)


def test_unregistering_makes_the_prefix_blocks_evictable_and_the_pool_whole(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=32, max_model_len=256, swap_space_bytes=0, dtype="float32")
    llm.register_prefix(PREFIX + [5])
    assert llm.kv_stats()["pinned_blocks"] == 4 and llm.kv_stats()["free_blocks"] == 28
    assert llm.unregister_prefix(PREFIX + [5]) == len(PREFIX)
    assert llm.kv_stats()["pinned_blocks"] == 0
    assert_pool_whole(llm)
    flood(llm)
    before = prompt_tokens(llm)
    generate(llm, [PREFIX + TAILS[0]])
    assert prompt_tokens(llm) - before == len(PREFIX) + len(TAILS[0]), "evicted, so computed again"
    assert_pool_whole(llm)


def test_registration_that_leaves_no_room_for_a_max_length_request_is_refused(tiny_llama_dir):
    # max_model_len 128 at block 16: one request may need up to 8 + 2 blocks; the pool has 14
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=14, max_model_len=128, swap_space_bytes=0, dtype="float32")
    with pytest.raises(ValueError, match=r"max_model_len=128 tokens needs up to 10"):
        llm.register_prefix(list(range(1000, 1000 + 5 * BS)))
    assert llm.kv_stats()["pinned_blocks"] == 0 and not llm.engine.has_unfinished_requests()
    assert llm.register_prefix(PREFIX) == len(PREFIX), "four blocks leave exactly the room needed"
    with pytest.raises(ValueError, match="would make 5 of the pool's 14 blocks pinned"):
        llm.register_prefix(list(range(3000, 3000 + BS)))


def test_registering_the_same_prefix_again_computes_nothing(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=64, max_model_len=256, swap_space_bytes=0, dtype="float32")
    llm.register_prefix(PREFIX)
    before = prompt_tokens(llm)
    assert llm.register_prefix(PREFIX) == len(PREFIX)
    assert prompt_tokens(llm) == before and len(llm.engine.shared_prefixes()) == 1


def test_shared_prefix_errors_are_clear(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=64, max_model_len=256, swap_space_bytes=0, dtype="float32")
    with pytest.raises(ValueError, match="not registered"):
        llm.unregister_prefix(PREFIX)
    llm.engine.add_request("busy", [1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="no unfinished requests"):
        llm.register_prefix(PREFIX)
    llm.engine.abort_request("busy")
    no_cache = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=64, max_model_len=256,
                   enable_prefix_caching=False, swap_space_bytes=0, dtype="float32")
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        no_cache.register_prefix(PREFIX)


def test_pinned_prefix_with_chunked_prefill_and_preemption_by_recompute(tiny_llama_dir, reference):
    """A tight pool preempts; every re-admission takes the pinned blocks again instead of
    recomputing them, and the outputs do not change."""
    # max_model_len 112 leaves room for 7 + 2 blocks beside the 4 pinned: 9 for six requests
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=13, max_model_len=112, swap_space_bytes=0,
              max_num_batched_tokens=24, preemption_mode="recompute", dtype="float32")
    llm.register_prefix(PREFIX)
    prompts = [PREFIX + t for t in TAILS]
    outputs = generate(llm, prompts, LONGER)
    stats = llm.kv_stats()
    assert stats["num_recompute_preemptions"] > 0, "the pool was never short"
    assert token_ids(outputs) == expected(reference, prompts, LONGER.max_tokens)
    hits = llm.engine.shared_prefixes()[0]["hit_tokens"]
    assert hits == len(PREFIX) * (len(prompts) + stats["num_recompute_preemptions"]), \
        "every admission, first or after preemption, took the pinned blocks"
    llm.unregister_prefix(PREFIX)
    assert_pool_whole(llm)


# ---- the CPU tier --------------------------------------------------------------------------------
def tier_llm(tiny_llama_dir, cpu_prefix_blocks: int, **kwargs) -> LLM:
    block_bytes = 8192 * BS            # tiny-llama, fp32: 8 KiB of KV per token
    settings = {"block_size": BS, "num_kv_blocks": 24, "max_model_len": 256, "swap_space_bytes": 0,
                "dtype": "float32", **kwargs}
    return LLM(str(tiny_llama_dir), cpu_prefix_cache_bytes=cpu_prefix_blocks * block_bytes, **settings)


@pytest.mark.parametrize("chunk", [2048, 24])
def test_a_prefix_evicted_from_the_device_is_served_from_the_cpu_tier(tiny_llama_dir, reference, chunk):
    llm = tier_llm(tiny_llama_dir, cpu_prefix_blocks=64, max_num_batched_tokens=chunk)
    first = generate(llm, [PREFIX + TAILS[0]])
    flood(llm)
    assert llm.engine.scheduler.block_manager.find_cached_prefix(PREFIX + [0])[0] not in range(24), "evicted to the tier"
    before = llm.kv_stats()
    second = generate(llm, [PREFIX + TAILS[1]])
    after = llm.kv_stats()
    assert after["cpu_prefix_hits"] - before["cpu_prefix_hits"] == len(PREFIX)
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == len(TAILS[1])
    assert token_ids(first + second) == expected(reference, [PREFIX + TAILS[0], PREFIX + TAILS[1]])
    assert_pool_whole(llm)


def test_without_the_cpu_tier_the_evicted_prefix_is_recomputed(tiny_llama_dir, reference):
    llm = tier_llm(tiny_llama_dir, cpu_prefix_blocks=0)
    generate(llm, [PREFIX + TAILS[0]])
    flood(llm)
    before = prompt_tokens(llm)
    second = generate(llm, [PREFIX + TAILS[1]])
    assert prompt_tokens(llm) - before == len(PREFIX) + len(TAILS[1])
    assert llm.kv_stats()["cpu_prefix_hits"] == 0
    assert token_ids(second) == expected(reference, [PREFIX + TAILS[1]])


def test_requests_preempted_by_recompute_come_back_from_the_cpu_tier(tiny_llama_dir, reference):
    """A tight pool: preempted requests' cached blocks are evicted to the tier before they are
    admitted again, so their re-admission loads them instead of recomputing; outputs unchanged."""
    llm = tier_llm(tiny_llama_dir, cpu_prefix_blocks=32, num_kv_blocks=12, max_model_len=112,
                   max_num_batched_tokens=24, preemption_mode="recompute")
    prompts = [PREFIX + t for t in TAILS]
    outputs = generate(llm, prompts, LONGER)
    stats = llm.kv_stats()
    assert stats["num_recompute_preemptions"] > 0 and stats["cpu_prefix_hits"] > 0
    assert token_ids(outputs) == expected(reference, prompts, LONGER.max_tokens)
    assert_pool_whole(llm)


def test_the_cpu_tier_does_not_stop_preemption_by_swap(tiny_llama_dir, reference):
    """The tier fills the CPU pool first; swap-outs then take its blocks and outputs stay equal."""
    block_bytes = 8192 * BS
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=16, max_model_len=112, max_num_batched_tokens=64,
              swap_space_bytes=4 * block_bytes, cpu_prefix_cache_bytes=16 * block_bytes, preemption_mode="swap", dtype="float32")
    flood(llm, 3, 5 * BS)
    flood(llm, 3, 6 * BS, first_token=5000)                   # pushes the first flood's blocks to the tier
    stats = llm.kv_stats()
    assert stats["cpu_prefix_cached_blocks"] == 16 and stats["num_cpu_blocks"] == 20, \
        "the tier took its whole share: beyond swap's own 4 blocks, a swap-out must take tier blocks"
    prompts = [PREFIX + t for t in TAILS]
    outputs = generate(llm, prompts, LONGER)
    assert llm.kv_stats()["num_swap_preemptions"] > 0
    assert token_ids(outputs) == expected(reference, prompts, LONGER.max_tokens)
    assert_pool_whole(llm)


def test_cpu_tier_size_must_hold_a_block(tiny_llama_dir):
    with pytest.raises(ValueError, match="holds no block"):
        LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=24, cpu_prefix_cache_bytes=100, dtype="float32")


@pytest.mark.parametrize("kwargs", [dict(cpu_prefix_cache_bytes=-1), dict(cpu_prefix_cache_bytes=1.5),
                                    dict(cpu_prefix_cache_bytes=True),
                                    dict(cpu_prefix_cache_bytes=1 << 20, enable_prefix_caching=False)])
def test_invalid_cpu_prefix_cache_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="cpu_prefix_cache_bytes"):
        EngineConfig(model="model-store/tiny-llama", **kwargs)


# ---- sharing statistics --------------------------------------------------------------------------
def test_parallel_samples_share_their_prompt_blocks(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), block_size=BS, num_kv_blocks=128, max_model_len=256, swap_space_bytes=0,
              enable_prefix_caching=False, dtype="float32")
    generate(llm, [PREFIX + TAILS[0]], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
    stats = llm.kv_stats()
    assert stats["sharing_unshared_blocks_sum"] > stats["sharing_held_blocks_sum"] > 0
    assert 0.5 < stats["blocks_saved_by_sharing"] < 0.75, "4 samples of a 5-block prompt hold ~6-8 blocks, not 20"
