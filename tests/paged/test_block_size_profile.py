"""Block size from the workload: predicted KV utilization per block size, the choice rule, profile
files (and their errors), ``block_size="auto"`` at start-up, and the engine's own recommendation."""
from __future__ import annotations

import json
import random

import pytest

from paged import EngineConfig, LLMEngine, SamplingParams
from paged.block_size_profile import (CANDIDATE_BLOCK_SIZES, DEFAULT_BLOCK_SIZE, MIN_REQUESTS, LengthProfile,
                                      choose_at_start, choose_block_size, slots_over_life)

FLAT_COSTS = {b: 1e-3 for b in CANDIDATE_BLOCK_SIZES}   # attention costs that favour no block size


def short_requests(n=200, seed=0) -> list[list[int]]:
    """Alpaca-like: ~20-token prompts, ~60-token outputs."""
    rng = random.Random(seed)
    return [[rng.randint(8, 40), rng.randint(20, 120)] for _ in range(n)]


def long_requests(n=200, seed=0) -> list[list[int]]:
    """Long documents: ~1000-token prompts, ~400-token outputs."""
    rng = random.Random(seed)
    return [[rng.randint(600, 1400), rng.randint(200, 600)] for _ in range(n)]


def write_profile(path, requests, costs=FLAT_COSTS) -> str:
    data = {"format": "paged-length-profile", "version": 1, "requests": requests}
    if costs is not None:
        data["attention_cost_s"] = {str(b): c for b, c in costs.items()}
    path.write_text(json.dumps(data))
    return str(path)


def profile_of(requests) -> LengthProfile:
    profile = LengthProfile()
    for prompt_len, output_len in requests:
        profile.record(prompt_len, output_len)
    return profile


# ---- predicted utilization -----------------------------------------------------------------------
def test_slots_over_life_equals_counting_every_step():
    rng = random.Random(3)
    for _ in range(200):
        p, o, b = rng.randint(1, 300), rng.randint(1, 300), rng.choice([1, 3, 4, 16, 64])
        live = sum(range(p, p + o))
        allocated = sum(-(-n // b) * b for n in range(p, p + o))
        assert slots_over_life(p, o, b) == (live, allocated)


def test_utilization_falls_as_the_block_grows_and_is_exact_at_block_one():
    profile = profile_of(short_requests())
    utilization = [profile.utilization(b) for b in CANDIDATE_BLOCK_SIZES]
    assert utilization == sorted(utilization, reverse=True)
    assert LengthProfile(candidates=(1,)).utilization(1) == 1.0
    one = LengthProfile(candidates=(1,))
    one.record(10, 5)
    assert one.utilization(1) == 1.0


def test_the_profile_keeps_the_most_recent_requests_and_their_sums():
    profile = LengthProfile(max_records=3)
    for request in [(50, 5), (10, 10), (20, 20), (30, 30)]:
        profile.record(*request)
    assert list(profile.records) == [(10, 10), (20, 20), (30, 30)]
    fresh = profile_of([(10, 10), (20, 20), (30, 30)])
    assert profile.utilizations() == fresh.utilizations()


def test_requests_without_output_leave_no_record():
    profile = LengthProfile()
    profile.record(10, 0)
    assert len(profile) == 0


# ---- the choice ----------------------------------------------------------------------------------
def test_the_largest_block_reaching_the_target_is_chosen():
    utilization = {4: 0.99, 8: 0.97, 16: 0.96, 32: 0.90, 64: 0.80}
    assert choose_block_size(utilization, FLAT_COSTS, target=0.95)[0] == 16


def test_a_markedly_slower_block_is_not_chosen_however_little_it_wastes():
    utilization = {4: 0.99, 8: 0.97, 16: 0.90, 32: 0.85, 64: 0.80}
    costs = {**FLAT_COSTS, 8: 2e-3}                         # 8 is twice as slow
    assert choose_block_size(utilization, costs, target=0.95)[0] == 4
    costs[4] = 3e-3
    block_size, reason = choose_block_size(utilization, costs, target=0.95)
    assert block_size == 16 and "highest" in reason, "none affordable reaches the target: the best utilization"


def test_short_requests_get_a_smaller_block_and_long_ones_a_larger_block():
    short = choose_block_size(profile_of(short_requests()).utilizations(), FLAT_COSTS)[0]
    long = choose_block_size(profile_of(long_requests()).utilizations(), FLAT_COSTS)[0]
    assert short < DEFAULT_BLOCK_SIZE < long


# ---- files ---------------------------------------------------------------------------------------
def test_a_saved_profile_loads_back_with_its_costs(tmp_path):
    profile = profile_of(short_requests(50))
    path = str(tmp_path / "profile.json")
    profile.save(path, FLAT_COSTS)
    loaded = LengthProfile.load(path)
    assert list(loaded.records) == list(profile.records)
    assert loaded.attention_cost_s == FLAT_COSTS


def test_a_bench_workload_file_reads_as_a_profile(tmp_path):
    path = tmp_path / "workload.json"
    path.write_text(json.dumps({"name": "w", "prompts": [[1, 2, 3], [4] * 40], "output_lens": [7, 9]}))
    assert list(LengthProfile.load(str(path)).records) == [(3, 7), (40, 9)]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"format": "something-else", "version": 1, "requests": [[1, 1]]}), "not a length profile"),
    (json.dumps({"format": "paged-length-profile", "version": 2, "requests": [[1, 1]]}), "version 2"),
    (json.dumps({"format": "paged-length-profile", "version": 1, "requests": []}), "holds no requests"),
    (json.dumps({"format": "paged-length-profile", "version": 1, "requests": "many"}), "must be a list"),
    (json.dumps({"format": "paged-length-profile", "version": 1, "requests": [[10, 5], [0, 5]]}),
     r"request 1: expected \[prompt_len, output_len\]"),
    (json.dumps({"format": "paged-length-profile", "version": 1, "requests": [[10, 5, 1]]}), "request 0"),
    (json.dumps({"format": "paged-length-profile", "version": 1, "requests": [[10, 2.5]]}), "request 0"),
    (json.dumps({"format": "paged-length-profile", "version": 1, "requests": [[10, 5]],
                 "attention_cost_s": {"16": -1}}), "attention_cost_s"),
    (json.dumps({"prompts": [[1, 2]], "output_lens": [3, 4]}), "equal length"),
])
def test_an_invalid_profile_is_a_clear_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        LengthProfile.load(str(path))
    assert str(path) in str(info.value)


def test_without_a_profile_the_default_block_size_is_used(tmp_path):
    never = lambda *_: pytest.fail("nothing to measure")    # noqa: E731
    assert choose_at_start(None, never).block_size == DEFAULT_BLOCK_SIZE
    assert choose_at_start(str(tmp_path / "not-yet.json"), never).block_size == DEFAULT_BLOCK_SIZE


def test_a_profile_without_costs_is_measured(tmp_path):
    path = write_profile(tmp_path / "p.json", short_requests(40), costs=None)
    seen = {}

    def measure(lengths, candidates):
        seen["lengths"], seen["candidates"] = lengths, tuple(candidates)
        return {b: 1e-3 * b for b in candidates}              # larger blocks cost more here
    choice = choose_at_start(path, measure)
    assert seen["candidates"] == CANDIDATE_BLOCK_SIZES and 0 < len(seen["lengths"]) <= 40
    assert choice.block_size == 4 and choice.attention_cost_s[64] == 64e-3


# ---- the engine ----------------------------------------------------------------------------------
def test_block_size_auto_and_profile_settings_are_validated():
    assert EngineConfig(model="m", block_size="auto", dtype="float32").block_size == "auto"
    for bad in ("16", "Auto", 0, 300, 2.0):
        with pytest.raises(ValueError, match="block_size"):
            EngineConfig(model="m", block_size=bad, dtype="float32")
    with pytest.raises(ValueError, match="block_size_profile"):
        EngineConfig(model="m", block_size_profile=3, dtype="float32")


def auto_engine(model_dir, profile_path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), block_size="auto", block_size_profile=profile_path,
                                  kv_cache_memory_bytes=16 << 20, swap_space_bytes=0, max_model_len=2048, dtype="float32"))


def test_auto_picks_a_smaller_block_for_short_requests_and_a_larger_for_long(tiny_llama_dir, tmp_path):
    short = auto_engine(tiny_llama_dir, write_profile(tmp_path / "short.json", short_requests()))
    long = auto_engine(tiny_llama_dir, write_profile(tmp_path / "long.json", long_requests()))
    assert short.kv_stats()["block_size"] < DEFAULT_BLOCK_SIZE < long.kv_stats()["block_size"]
    assert short.executor.kv_cache.device_cache.shape[3] == short.kv_stats()["block_size"]
    assert short.block_size_report()["auto_choice"]["block_size"] == short.kv_stats()["block_size"]


def test_auto_reads_a_workload_file_and_measures_the_attention_cost(tiny_llama_dir, tmp_path):
    path = tmp_path / "workload.json"
    rng = random.Random(1)
    path.write_text(json.dumps({"name": "short", "prompts": [[5] * rng.randint(8, 30) for _ in range(64)],
                                "output_lens": [rng.randint(20, 90) for _ in range(64)]}))
    engine = auto_engine(tiny_llama_dir, str(path))
    choice = engine.block_size_report()["auto_choice"]
    assert engine.kv_stats()["block_size"] == choice["block_size"] in CANDIDATE_BLOCK_SIZES
    assert set(choice["attention_cost_s"]) == {str(b) for b in CANDIDATE_BLOCK_SIZES}
    assert all(cost > 0 for cost in choice["attention_cost_s"].values())


def test_auto_with_an_invalid_profile_fails_to_start(tiny_llama_dir, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "paged-length-profile", "version": 1, "requests": [[-3, 4]]}))
    with pytest.raises(ValueError, match="bad.json: request 0"):
        auto_engine(tiny_llama_dir, str(path))


def test_the_engine_recommends_a_block_size_from_its_finished_requests(tiny_llama_dir, tmp_path):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), block_size=16, num_kv_blocks=256,
                                    swap_space_bytes=0, max_model_len=512, dtype="float32"))
    engine.block_size_advisor.measure = lambda *_: pytest.fail("a stats read measured the attention")
    assert engine.kv_stats()["recommended_block_size"] is None, "too few requests yet"
    rng = random.Random(0)
    for i in range(MIN_REQUESTS):
        engine.add_request(f"r{i}", [rng.randint(10, 500) for _ in range(rng.randint(4, 12))],
                           SamplingParams(max_tokens=rng.randint(2, 6), ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_stats()["recommended_block_size"] is None, "no attention costs yet, and kv_stats never measures"
    assert "measure_attention_costs" in engine.block_size_report()["reason"]
    # equal attention costs: the choice then follows utilization alone, not this machine's timings
    engine.block_size_advisor.measure = lambda lengths, sizes: {size: 1e-3 for size in sizes}
    engine.measure_attention_costs()
    recommended = engine.kv_stats()["recommended_block_size"]
    assert recommended in CANDIDATE_BLOCK_SIZES and recommended < 16, "a few tokens each: small blocks"
    report = engine.block_size_report()
    assert report["num_requests"] == MIN_REQUESTS and set(report["attention_cost_s"]) == {str(b) for b in CANDIDATE_BLOCK_SIZES}
    path = str(tmp_path / "saved.json")
    engine.save_length_profile(path)
    saved = LengthProfile.load(path)
    assert len(saved) == MIN_REQUESTS and saved.attention_cost_s is not None
    assert choose_at_start(path, lambda *_: pytest.fail("costs were saved")).block_size == recommended
