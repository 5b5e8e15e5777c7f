"""Sampler on real Sequence / SequenceGroup objects: greedy, top-k / top-p / min-p, temperature,
penalties (vLLM semantics), min_tokens, logprobs, and seeded per-request generators."""
from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch

from paged.sampler import Sampler
from paged.sampling_params import SamplingParams
from paged.sequence import SequenceGroup

EOS = 0
PROMPT = [3, 4]


def make_seq(params: SamplingParams, prompt=PROMPT, output=(), seed: int | None = 0, seq_id: int = 1):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    group = SequenceGroup(f"req-{seq_id}", None, list(prompt), params, seq_id, 0.0, generator, None)
    seq = group.seqs[0]
    seq.token_ids.extend(output)
    return seq


def logits_for(probs) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (exactly, up to float rounding)."""
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


def draw_many(params: SamplingParams, logits: torch.Tensor, num: int = 2000, seed: int = 0,
              output=()) -> collections.Counter:
    seq = make_seq(params, output=output, seed=seed)
    result = Sampler([EOS]).sample(logits[None, :].clone(), [seq], [num])[0]
    assert len(result.token_ids) == num
    return collections.Counter(result.token_ids)


def sample_one(params: SamplingParams, logits, output=(), prompt=PROMPT, eos=(EOS,), seed=0):
    seq = make_seq(params, prompt=prompt, output=output, seed=seed)
    return Sampler(list(eos)).sample(torch.as_tensor(logits, dtype=torch.float32)[None, :].clone(), [seq], [1])[0]


def all_logprobs(params: SamplingParams, logits, output=(), prompt=PROMPT) -> torch.Tensor:
    """The logprob of every token, as the sampler reports them (needs vocab <= 20)."""
    vocab = len(logits)
    result = sample_one(dataclasses.replace(params, logprobs=vocab), logits, output=output, prompt=prompt)
    top = result.logprobs[0]
    assert sorted(top) == list(range(vocab))
    return torch.tensor([top[t] for t in range(vocab)])


PROBS = [0.5, 0.3, 0.15, 0.05]     # tokens 0..3, already sorted by probability


# ---- greedy ---------------------------------------------------------------------------------------
def test_greedy_picks_the_argmax_of_every_row():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 50, generator=gen)
    params = SamplingParams(temperature=0.0)
    seqs = [make_seq(params, seed=None, seq_id=i) for i in range(5)]
    results = Sampler([EOS]).sample(logits.clone(), seqs, [1] * 5)
    assert [r.token_ids for r in results] == [[t] for t in logits.argmax(dim=-1).tolist()]


def test_a_greedy_row_without_a_finite_maximum_fails_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(7))
    logits[1, 20] = float("nan")
    params = SamplingParams(temperature=0.0)
    seqs = [make_seq(params, seed=None, seq_id=i) for i in range(3)]
    results = Sampler([EOS]).sample(logits.clone(), seqs, [1] * 3)
    assert results[1].token_ids == [] and results[1].error.status == 500
    assert [results[0].token_ids, results[2].token_ids] == [[int(logits[0].argmax())], [int(logits[2].argmax())]]


def test_greedy_rows_beside_rows_that_need_processing_get_their_own_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(8))
    greedy, with_logprobs = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2)
    seqs = [make_seq(p, seed=None, seq_id=i) for i, p in enumerate([with_logprobs, greedy, with_logprobs, greedy])]
    results = Sampler([EOS]).sample(logits.clone(), seqs, [1] * 4)
    assert [r.token_ids for r in results] == [[t] for t in logits.argmax(dim=-1).tolist()]
    assert results[1].logprobs is None and results[0].logprobs is not None


def test_top_k_1_is_greedy_whatever_the_temperature():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(50, generator=gen)
    for seed in range(20):
        result = sample_one(SamplingParams(temperature=1.5, top_k=1), logits, seed=seed)
        assert result.token_ids == [int(logits.argmax())]


def test_greedy_with_several_samples_repeats_the_argmax():
    logits = torch.tensor([0.1, 2.0, 0.3])
    seq = make_seq(SamplingParams(temperature=0.0, n=3), seed=None)
    result = Sampler([EOS]).sample(logits[None, :].clone(), [seq], [3])[0]
    assert result.token_ids == [1, 1, 1]


def test_sampler_does_not_modify_the_callers_logits():
    logits = torch.tensor([[1.0, -1.0, 0.5, 2.0, -0.3, 0.7]])
    before = logits.clone()
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, min_tokens=2, logprobs=2)
    Sampler([EOS]).sample(logits, [make_seq(params, output=[1])], [1])
    assert torch.equal(logits, before)


# ---- filters --------------------------------------------------------------------------------------
def test_random_sampling_follows_the_distribution():
    counts = draw_many(SamplingParams(temperature=1.0), logits_for(PROBS), num=4000)
    for token, p in enumerate(PROBS):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)


@pytest.mark.parametrize("top_k, allowed", [(2, {0, 1}), (3, {0, 1, 2})])
def test_top_k_keeps_only_the_k_most_likely_tokens(top_k, allowed):
    counts = draw_many(SamplingParams(top_k=top_k), logits_for(PROBS))
    assert set(counts) == allowed


@pytest.mark.parametrize("top_p, allowed", [
    (0.4, {0}),          # the first token alone reaches 0.4
    (0.75, {0, 1}),      # 0.5 < 0.75 <= 0.8
    (0.9, {0, 1, 2}),    # 0.8 < 0.9 <= 0.95
    (0.99, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p(top_p, allowed):
    counts = draw_many(SamplingParams(top_p=top_p), logits_for(PROBS))
    assert set(counts) == allowed


def test_top_p_renormalises_over_the_nucleus():
    counts = draw_many(SamplingParams(top_p=0.75), logits_for(PROBS), num=4000)
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)


def test_top_p_keeps_the_nucleus_whatever_the_token_order():
    probs = [0.05, 0.3, 0.15, 0.5]         # the same distribution, shuffled ids
    counts = draw_many(SamplingParams(top_p=0.75), logits_for(probs))
    assert set(counts) == {1, 3}


@pytest.mark.parametrize("min_p, allowed", [
    (0.2, {0, 1, 2}),    # threshold 0.1
    (0.5, {0, 1}),       # threshold 0.25
    (0.9, {0}),          # threshold 0.45
])
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(min_p, allowed):
    counts = draw_many(SamplingParams(min_p=min_p), logits_for(PROBS))
    assert set(counts) == allowed


def test_top_k_and_top_p_combine_as_an_intersection():
    counts = draw_many(SamplingParams(top_k=3, top_p=0.75), logits_for(PROBS))
    assert set(counts) == {0, 1}


@pytest.mark.parametrize("temperature, expected_p1", [
    (1.0, 2 / 3),        # logits [0, ln 2]: probabilities 1/3, 2/3
    (0.5, 4 / 5),        # logits / 0.5 = [0, 2 ln 2]: 1/5, 4/5
    (2.0, math.sqrt(2) / (1 + math.sqrt(2))),
])
def test_temperature_divides_the_logits(temperature, expected_p1):
    logits = torch.tensor([0.0, math.log(2.0)])
    counts = draw_many(SamplingParams(temperature=temperature), logits, num=4000)
    assert counts[1] / 4000 == pytest.approx(expected_p1, abs=0.03)


def test_a_very_low_temperature_always_picks_the_argmax():
    counts = draw_many(SamplingParams(temperature=0.01), logits_for(PROBS))
    assert set(counts) == {0}


def test_an_accepted_tiny_temperature_does_not_break_sampling():
    params = SamplingParams(temperature=1e-39)
    result = sample_one(params, [1.0, 3.0, 2.0])
    assert result.token_ids == [1]


# ---- penalties (vLLM semantics) -------------------------------------------------------------------
PEN_LOGITS = [2.0, -1.0, 0.5, 1.0, -0.5, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    # prompt holds 0 and 1, output holds 3 (twice) and 4; tokens 2 and 5 were never seen
    got = all_logprobs(SamplingParams(temperature=0.0, repetition_penalty=2.0), PEN_LOGITS,
                       prompt=[0, 1], output=[3, 3, 4])
    expected = torch.tensor([2.0 / 2, -1.0 * 2, 0.5, 1.0 / 2, -0.5 * 2, 0.0])
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_repetition_penalty_counts_a_token_once_however_often_it_appears():
    got = all_logprobs(SamplingParams(temperature=0.0, repetition_penalty=2.0), PEN_LOGITS,
                       prompt=[0, 0, 0], output=[0, 0])
    expected = torch.tensor([1.0, -1.0, 0.5, 1.0, -0.5, 0.0])
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_presence_penalty_subtracts_once_per_token_present_in_the_output():
    got = all_logprobs(SamplingParams(temperature=0.0, presence_penalty=0.5), PEN_LOGITS,
                       prompt=[0, 1], output=[3, 3, 4])
    expected = torch.tensor([2.0, -1.0, 0.5, 1.0 - 0.5, -0.5 - 0.5, 0.0])
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5), "prompt tokens are not penalised"


def test_frequency_penalty_subtracts_count_times_penalty():
    got = all_logprobs(SamplingParams(temperature=0.0, frequency_penalty=0.25), PEN_LOGITS,
                       prompt=[0, 1], output=[3, 3, 4])
    expected = torch.tensor([2.0, -1.0, 0.5, 1.0 - 2 * 0.25, -0.5 - 0.25, 0.0])
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_negative_presence_and_frequency_penalties_encourage_repeats():
    got = all_logprobs(SamplingParams(temperature=0.0, presence_penalty=-1.0, frequency_penalty=-0.5),
                       PEN_LOGITS, prompt=[0], output=[5, 5])
    expected = torch.tensor([2.0, -1.0, 0.5, 1.0, -0.5, 0.0 + 1.0 + 2 * 0.5])
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_all_penalties_together_apply_repetition_first_then_presence_and_frequency():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = all_logprobs(params, PEN_LOGITS, prompt=[0, 1], output=[3, 3, 4])
    expected = torch.tensor([1.0, -2.0, 0.5, 0.5 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 0.0])
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_no_penalty_without_output_tokens_for_presence_and_frequency():
    got = all_logprobs(SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0),
                       PEN_LOGITS, prompt=[0, 1, 2])
    assert torch.allclose(got, torch.log_softmax(torch.tensor(PEN_LOGITS), -1), atol=1e-5)


def test_a_frequency_penalty_steers_greedy_away_from_a_repeated_token():
    logits = [0.0, 3.0, 2.5]
    assert sample_one(SamplingParams(temperature=0.0), logits, output=[1, 1]).token_ids == [1]
    assert sample_one(SamplingParams(temperature=0.0, frequency_penalty=0.5), logits, output=[1, 1]).token_ids == [2]


# ---- min_tokens -----------------------------------------------------------------------------------
def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = [10.0, 0.0, 9.0, 1.0]           # eos (0) then stop token 2 would win
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert sample_one(params, logits, output=[1, 1]).token_ids == [3]
    assert sample_one(params, logits, output=[1, 1, 1]).token_ids == [0], "allowed again once min_tokens is met"


def test_min_tokens_ban_gives_the_banned_tokens_no_probability_when_sampling():
    params = SamplingParams(min_tokens=1, stop_token_ids=[1])
    counts = draw_many(params, logits_for([0.4, 0.4, 0.1, 0.1]))
    assert set(counts) == {2, 3}


def test_min_tokens_bans_every_eos_id_and_ignores_ids_outside_the_vocabulary():
    params = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[99])
    result = sample_one(params, [5.0, 4.0, 1.0], eos=(0, 1))
    assert result.token_ids == [2]


def test_min_tokens_banned_tokens_report_minus_infinity_logprob():
    params = SamplingParams(temperature=0.0, min_tokens=1, logprobs=3)
    top = sample_one(params, [5.0, 1.0, 2.0]).logprobs[0]
    assert top[EOS] == float("-inf")


# ---- logprobs -------------------------------------------------------------------------------------
def test_logprobs_list_the_chosen_token_first_then_the_top_alternatives():
    logits = torch.tensor([0.0, 4.0, 3.0, 2.0, 1.0])
    params = SamplingParams(temperature=0.0, logprobs=2)
    result = sample_one(params, logits)
    expected = torch.log_softmax(logits, -1)
    top = result.logprobs[0]
    assert list(top) == [1, 2], "chosen (1) first, then the best other token; no duplicate"
    assert top[1] == pytest.approx(float(expected[1]))
    assert top[2] == pytest.approx(float(expected[2]))
    assert result.chosen_logprobs == [pytest.approx(float(expected[1]))]


def test_logprobs_of_a_sampled_token_outside_the_top_n_add_one_entry():
    logits = logits_for([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(logprobs=1)
    seq = make_seq(params, seed=0)
    result = Sampler([EOS]).sample(logits[None, :].clone(), [seq], [400])[0]
    expected = torch.log_softmax(logits, -1)
    seen_tail = False
    for token, top in zip(result.token_ids, result.logprobs):
        assert next(iter(top)) == token
        assert top[token] == pytest.approx(float(expected[token]))
        assert 0 in top
        assert len(top) == (1 if token == 0 else 2)
        seen_tail |= token != 0
    assert seen_tail


def test_logprobs_zero_returns_only_the_chosen_token():
    result = sample_one(SamplingParams(temperature=0.0, logprobs=0), [0.0, 1.0, 2.0])
    assert list(result.logprobs[0]) == [2]


def test_chosen_logprob_of_a_sample_is_its_log_probability():
    logits = logits_for(PROBS)
    result = sample_one(SamplingParams(logprobs=0), logits, seed=3)
    token = result.token_ids[0]
    assert result.chosen_logprobs[0] == pytest.approx(math.log(PROBS[token]), abs=1e-5)


# ---- seeded draws ---------------------------------------------------------------------------------
def run_steps(seed: int, steps: int = 30) -> list[int]:
    params = SamplingParams(temperature=1.0)
    seq = make_seq(params, seed=seed)
    logits = torch.randn(steps, 40, generator=torch.Generator().manual_seed(99))
    sampler = Sampler([EOS])
    out = []
    for step in range(steps):
        out += sampler.sample(logits[step:step + 1].clone(), [seq], [1])[0].token_ids
    return out


def test_the_same_seed_gives_the_same_draws():
    assert run_steps(seed=5) == run_steps(seed=5)


def test_different_seeds_give_different_draws():
    assert run_steps(seed=5) != run_steps(seed=6)


def test_a_seeded_request_draws_the_same_tokens_whatever_else_is_in_the_batch():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(11))
    sampler = Sampler([EOS])
    alone = make_seq(SamplingParams(temperature=0.8), seed=42, seq_id=1)
    alone_tokens = sampler.sample(logits[1:2].clone(), [alone], [4])[0].token_ids

    batched = make_seq(SamplingParams(temperature=0.8), seed=42, seq_id=1)
    others = [make_seq(SamplingParams(temperature=1.0), seed=0, seq_id=2),
              make_seq(SamplingParams(temperature=0.0), seed=None, seq_id=3)]
    results = sampler.sample(logits.clone(), [others[0], batched, others[1]], [3, 4, 1])
    assert results[1].token_ids == alone_tokens
    assert [len(r.token_ids) for r in results] == [3, 4, 1]


# ---- logits in the model's dtype ------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, logprobs=2),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5),
], ids=["greedy", "greedy-logprobs", "top-p", "penalties"])
def test_bf16_logits_give_what_their_fp32_copy_gives(params):
    # The executor may hand over the LM head's bf16 output; its fp32 copy is exact.
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    results = []
    for rows in (logits, logits.float()):
        seqs = [make_seq(params, output=(5, 6), seed=11, seq_id=i) for i in range(3)]
        results.append(Sampler([EOS]).sample(rows, seqs, [1, 1, 1]))
    assert results[0] == results[1]
    assert logits.dtype == torch.bfloat16  # the caller's logits are not modified or converted in place
