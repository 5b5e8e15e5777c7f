"""LLMEngine behaviour: admission, abort, deadlines, seeded sampling, stop conditions, forks."""
from __future__ import annotations

import time

import pytest

from paged import LLM, EngineConfig, EngineOverloadedError, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=16, num_kv_blocks=256, max_model_len=512, dtype="float32")


def pool_is_whole(engine: LLMEngine) -> bool:
    engine.scheduler.block_manager.check_invariants()
    return engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_request_longer_than_max_model_len_is_refused_with_the_excess(llm):
    with pytest.raises(ValueError, match=r"exceeds max_model_len 512 by 10"):
        llm.engine.add_request("too-long", [5] * 500, SamplingParams(max_tokens=22))
    assert not llm.engine.has_unfinished_requests()


def test_request_larger_than_the_pool_is_refused(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=8, block_size=16, dtype="float32"))
    with pytest.raises(ValueError, match=r"whole pool has 8"):
        engine.add_request("big", [5] * 100, SamplingParams(max_tokens=60))


@pytest.mark.parametrize("prompt", [[], "", [-1], [10**9], ["a"], [1.5], None])
def test_bad_prompts_are_refused(llm, prompt):
    with pytest.raises(ValueError):
        llm.engine.add_request("bad", prompt, SamplingParams())
    assert "bad" not in llm.engine.requests


def test_duplicate_request_id_is_refused(llm):
    engine = llm.engine
    engine.add_request("same", "hello", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("same", "hello", SamplingParams(max_tokens=2))
    finally:
        engine.abort_request("same")
    assert pool_is_whole(engine)


def test_full_waiting_queue_raises_overloaded(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, max_waiting_requests=2, dtype="float32"))
    engine.add_request("a", "one", SamplingParams(max_tokens=2))
    engine.add_request("b", "two", SamplingParams(max_tokens=2))
    with pytest.raises(EngineOverloadedError):
        engine.add_request("c", "three", SamplingParams(max_tokens=2))


def test_abort_mid_generation_frees_every_block(llm):
    engine = llm.engine
    engine.add_request("keep", "def main():", SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("drop", "import os", SamplingParams(max_tokens=30, ignore_eos=True, n=2))
    for _ in range(5):
        engine.step()
    engine.abort_request("drop")
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert "drop" not in outputs and outputs["keep"].finished
    assert pool_is_whole(engine)


def test_request_past_its_deadline_finishes_with_timeout(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, request_timeout_s=0.05, dtype="float32"))
    engine.add_request("slow", "hello", SamplingParams(max_tokens=500, ignore_eos=True))
    engine.step()
    time.sleep(0.1)
    outputs = engine.step()
    assert [o.outputs[0].finish_reason for o in outputs] == ["timeout"]
    assert outputs[0].finished and not engine.has_unfinished_requests()
    assert pool_is_whole(engine)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = llm.generate(["def main():"], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    batch = llm.generate(["import sys", "def main():", "x = [1, 2, 3]"], [others, params, others],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert pool_is_whole(llm.engine)


def test_different_seeds_give_different_samples(llm):
    a = llm.generate(["def main():"], SamplingParams(max_tokens=16, temperature=1.0, seed=1), use_tqdm=False)
    b = llm.generate(["def main():"], SamplingParams(max_tokens=16, temperature=1.0, seed=2), use_tqdm=False)
    assert a[0].outputs[0].token_ids != b[0].outputs[0].token_ids


def test_stop_string_ends_the_text_before_it(llm):
    greedy = llm.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)
    text = greedy[0].outputs[0].text
    stop = text[5:8]
    assert stop and stop in text
    out = llm.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]


def test_stop_token_id_ends_generation(llm):
    greedy = llm.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)
    tokens = greedy[0].outputs[0].token_ids
    out = llm.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0.0,
                                                       stop_token_ids=[tokens[4]]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == tokens[:tokens.index(tokens[4]) + 1]


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(["hello"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_best_of_returns_the_n_most_likely_samples(llm):
    out = llm.generate(["def main():"], SamplingParams(max_tokens=8, n=2, best_of=5, temperature=1.0, seed=3,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 2
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    assert pool_is_whole(llm.engine)


def test_parallel_samples_differ_and_share_prompt_blocks(llm):
    engine = llm.engine
    engine.add_request("par", "def main():\n    " * 10, SamplingParams(max_tokens=10, n=4, temperature=1.0, seed=5,
                                                                      ignore_eos=True))
    engine.step()  # prefill, then fork into 4 samples sharing the prompt's blocks
    tables = [engine.scheduler.block_manager.block_table(s.seq_id) for s in engine.requests["par"].seqs]
    assert len(tables) == 4 and all(t[:-1] == tables[0][:-1] for t in tables)
    outputs = None
    while engine.has_unfinished_requests():
        outputs = engine.step() or outputs
    assert len({tuple(o.token_ids) for o in outputs[0].outputs}) > 1
    assert pool_is_whole(engine)


def test_logprobs_are_returned_for_each_chosen_token(llm):
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert next(iter(entry)) == token and len(entry) >= 3
        assert all(value <= 0.0 for value in entry.values())


def test_beam_search_reports_once_with_n_best_beams_and_frees_them(llm):
    engine = llm.engine
    engine.add_request("beam", "def main():", SamplingParams(beam_width=4, n=2, max_tokens=6, temperature=0.0))
    reports = []
    while engine.has_unfinished_requests():
        reports += engine.step()
    assert len(reports) == 1 and reports[0].finished and len(reports[0].outputs) == 2
    best, second = reports[0].outputs
    assert best.cumulative_logprob / len(best.token_ids) >= second.cumulative_logprob / len(second.token_ids)
    assert pool_is_whole(engine)


def test_beam_search_is_at_least_as_likely_as_greedy(llm):
    greedy = llm.generate(["import os"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0),
                          use_tqdm=False)[0].outputs[0]
    beam = llm.generate(["import os"], SamplingParams(beam_width=4, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert beam.cumulative_logprob >= greedy.cumulative_logprob - 1e-4  # fp rounding across batch shapes


def test_tensor_parallel_size_that_does_not_split_the_model_is_refused_before_any_process_starts(tiny_llama_dir):
    with pytest.raises(ValueError, match="8 attention heads do not divide by tensor_parallel_size 3"):
        LLMEngine(EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=3, dtype="float32"))


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32"))


def test_stop_strings_do_not_count_before_min_tokens(llm):
    plain = llm.generate(["def main():"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    early = plain.text[2:4]
    out = llm.generate(["def main():"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                       min_tokens=12, stop=[early]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain.token_ids and out.text == plain.text


def test_greedy_outputs_report_cumulative_logprobs_only_when_logprobs_are_asked_for(llm):
    """Greedy rows without logprobs skip the softmax (vLLM reports None for them too)."""
    out = llm.generate(["import os"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    plain = llm.generate(["import os"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert out.cumulative_logprob < 0.0
    assert abs(out.cumulative_logprob - sum(entry[t] for t, entry in zip(out.token_ids, out.logprobs))) < 1e-4
    assert plain.cumulative_logprob is None and plain.token_ids == out.token_ids


# ---- faults stay with their requests ----------------------------------------------------------------
def run_to_completion(engine: LLMEngine) -> dict:
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    return outputs


def test_a_step_that_raises_fails_only_its_requests_and_the_engine_serves_on(llm, monkeypatch):
    engine = llm.engine
    engine.add_request("victim", "def main():", SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    engine.add_request("victim-2", "import os", SamplingParams(max_tokens=8, ignore_eos=True, n=2))
    real_execute = engine.executor.execute
    monkeypatch.setattr(engine.executor, "execute", lambda plan: (_ for _ in ()).throw(RuntimeError("boom")))
    outputs = {o.request_id: o for o in engine.step()}
    monkeypatch.setattr(engine.executor, "execute", real_execute)
    assert set(outputs) == {"victim", "victim-2"}
    for out in outputs.values():
        assert out.finished and out.error is not None and out.error.status == 500
        assert all(c.finish_reason == "error" for c in out.outputs)
    assert not engine.has_unfinished_requests() and pool_is_whole(engine)
    after = llm.generate(["def main():"], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0),
                         use_tqdm=False)[0]
    assert after.error is None and len(after.outputs[0].token_ids) == 8
    assert engine.kv_stats()["num_step_faults"] >= 1 and "boom" in engine.first_fault


def test_an_executor_that_loses_its_kv_cache_fails_the_requests_holding_kv_and_restarts(tiny_llama_dir, monkeypatch):
    """The engine's recovery talks to the Executor protocol only: no tensor-parallel branch."""
    from paged.errors import ExecutorFailedError
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, max_num_seqs=1, compile=False, dtype="float32"))
    greedy = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    engine.add_request("holds-kv", "def main():", greedy)
    engine.add_request("waits", "def main():", greedy)
    engine.step()
    restarts = []
    real_execute = engine.executor.execute
    monkeypatch.setattr(engine.executor, "restart", lambda: restarts.append(True))
    monkeypatch.setattr(engine.executor, "execute",
                        lambda plan: (_ for _ in ()).throw(ExecutorFailedError("device lost")))
    failed = {o.request_id: o for o in engine.step()}
    assert set(failed) == {"holds-kv"} and failed["holds-kv"].error.status == 503
    assert "the executor failed" in str(failed["holds-kv"].error) and "KV cache was lost" in str(failed["holds-kv"].error)
    assert pool_is_whole(engine) and engine.kv_stats()["num_step_faults"] == 1
    monkeypatch.setattr(engine.executor, "execute", real_execute)
    outputs = run_to_completion(engine)
    assert restarts == [True], "restarted once, before the next step"
    assert outputs["waits"].error is None and len(outputs["waits"].outputs[0].token_ids) == 4
    assert pool_is_whole(engine)


def test_repeated_step_faults_make_the_engine_give_up(tiny_llama_dir, monkeypatch):
    from paged.errors import EngineDeadError
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, compile=False, dtype="float32"))
    monkeypatch.setattr(engine.executor, "execute", lambda plan: (_ for _ in ()).throw(MemoryError("no memory")))
    with pytest.raises(EngineDeadError, match="no memory"):
        for index in range(10):
            engine.add_request(f"r{index}", "hello", SamplingParams(max_tokens=2))
            engine.step()
    assert pool_is_whole(engine)


def test_non_finite_logits_fail_that_request_alone(llm, monkeypatch):
    engine = llm.engine
    engine.add_request("poisoned", "def main():", SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0))
    engine.add_request("healthy", "def main():", SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0))
    real_execute = engine.executor.execute

    def poison_first_row(plan):
        logits = real_execute(plan).clone()
        for row, seq in enumerate(plan.sampling_seqs):
            if seq.group.request_id == "poisoned":
                logits[row, 5] = float("nan")
        return logits

    monkeypatch.setattr(engine.executor, "execute", poison_first_row)
    outputs = run_to_completion(engine)
    assert outputs["poisoned"].error is not None and outputs["poisoned"].error.status == 500
    assert outputs["healthy"].error is None and len(outputs["healthy"].outputs[0].token_ids) == 6
    assert pool_is_whole(engine)


def test_parameters_that_leave_no_token_allowed_fail_with_a_client_error(llm):
    vocab = llm.engine.vocab_size
    bad = SamplingParams(max_tokens=4, min_tokens=2, temperature=0.0)
    bad.stop_token_ids = list(range(vocab))  # past the request limit, as an engine-internal caller could
    good = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate(["hello", "hello"], [bad, good], use_tqdm=False)
    assert outs[0].finished and outs[0].error is not None and outs[0].error.status == 400
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 4
    assert pool_is_whole(llm.engine)


# ---- admission ------------------------------------------------------------------------------------
def test_max_num_seqs_counts_every_sample_a_request_forks_into(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=128, max_num_seqs=4, compile=False, dtype="float32"))
    engine.add_request("three", "def main():", SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=1,
                                                              ignore_eos=True))
    engine.add_request("two", "import os", SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=2,
                                                          ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
        assert len(engine.scheduler.running) <= 4
        running = {seq.group.request_id for seq in engine.scheduler.running}
        assert running != {"three", "two"}, "3 + 2 samples would exceed max_num_seqs=4"
    assert pool_is_whole(engine)


def test_a_request_that_forks_beyond_max_num_seqs_is_refused(tiny_llama_dir):
    from paged.errors import InvalidRequestError
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=128, max_num_seqs=4, compile=False, dtype="float32"))
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("wide", "hello", SamplingParams(n=2, best_of=6, temperature=1.0))
    assert info.value.param == "best_of"


@pytest.mark.parametrize("prompt, params, param", [
    ([5] * 600, SamplingParams(max_tokens=2), "prompt"),
    ([5] * 500, SamplingParams(max_tokens=22), "max_tokens"),
    ([10**9], SamplingParams(), "prompt"),
    ("hello", SamplingParams(stop_token_ids=[10**7]), "stop_token_ids"),
])
def test_refusals_name_the_request_field_at_fault(llm, prompt, params, param):
    from paged.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request("refused", prompt, params)
    assert info.value.param == param


def test_a_request_can_be_aborted_while_it_waits(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, max_num_seqs=1, compile=False, dtype="float32"))
    engine.add_request("runs", "hello", SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("waits", "import os", SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert [s.group.request_id for s in engine.scheduler.waiting] == ["waits"]
    engine.abort_request("waits")
    assert not engine.scheduler.waiting
    outputs = run_to_completion(engine)
    assert set(outputs) == {"runs"} and pool_is_whole(engine)


def test_non_streamed_requests_report_once_when_finished(llm):
    engine = llm.engine
    engine.add_request("quiet", "hello", SamplingParams(max_tokens=5, ignore_eos=True), stream=False)
    engine.add_request("loud", "hello", SamplingParams(max_tokens=5, ignore_eos=True))
    reports = {"quiet": 0, "loud": 0}
    while engine.has_unfinished_requests():
        for out in engine.step():
            reports[out.request_id] += 1
            if out.request_id == "quiet":
                assert out.finished and len(out.outputs[0].token_ids) == 5
    assert reports["quiet"] == 1 and reports["loud"] >= 2


def test_generate_takes_more_prompts_than_the_waiting_queue_holds(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, max_waiting_requests=2, compile=False, dtype="float32")
    outs = llm.generate([f"x = {i}" for i in range(7)], SamplingParams(max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3] * 7
    assert pool_is_whole(llm.engine)


def test_generate_checks_every_prompt_before_any_runs(llm):
    steps_before = llm.engine.num_steps
    with pytest.raises(ValueError):
        llm.generate(["fine", [10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.num_steps == steps_before


def stream_to_end(engine: LLMEngine, prompts, params) -> list:
    for index, prompt in enumerate(prompts):
        engine.add_request(f"streamed-{index}", prompt, params)
    finished = run_to_completion(engine)
    return [finished[f"streamed-{index}"] for index in range(len(prompts))]


@pytest.mark.parametrize("extra", [{}, {"stop_token_ids": [13156, 14139]}],
                         ids=["plain", "stop-tokens"])
def test_text_decoded_once_at_the_end_equals_the_streamed_text(llm, extra):
    """Non-streamed requests without stop strings skip per-step detokenization: their final text
    must be what streaming built token by token (multi-byte characters, stop tokens included)."""
    prompts = ["Héllo wörld — naïve café, 東京, emoji 🎉", "def main():", bytes(range(200, 230)).decode("latin-1")]
    params = SamplingParams(max_tokens=40, temperature=0.0, **extra)
    quiet = llm.generate(prompts, params, use_tqdm=False)
    loud = stream_to_end(llm.engine, prompts, params)
    assert [o.outputs[0].token_ids for o in quiet] == [o.outputs[0].token_ids for o in loud]
    assert [o.outputs[0].text for o in quiet] == [o.outputs[0].text for o in loud]
    assert "\ufffd" in quiet[1].outputs[0].text, "a lone byte token: its replacement character is shown"
    if extra:
        assert [o.outputs[0].finish_reason for o in quiet] == ["length", "stop", "stop"]
