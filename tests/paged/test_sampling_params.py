"""SamplingParams validation: every invalid value is an InvalidRequestError (a ValueError) naming the field."""
from __future__ import annotations

import math

import pytest

from paged.errors import InvalidRequestError
from paged.sampling_params import (LIMITS, MAX_BEAM_WIDTH, MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                                    MAX_STOP_TOKEN_IDS, SamplingParams)

NAN = float("nan")
INF = float("inf")

INVALID = [
    # field, kwargs
    ("n", dict(n=0)),
    ("n", dict(n=-1)),
    ("n", dict(n=MAX_N + 1)),
    ("n", dict(n=1.0)),
    ("n", dict(n=True)),
    ("n", dict(n="2")),
    ("best_of", dict(n=3, best_of=2)),
    ("best_of", dict(best_of=MAX_N + 1)),
    ("best_of", dict(best_of=2.5)),
    ("beam_width", dict(beam_width=0)),
    ("beam_width", dict(beam_width=MAX_BEAM_WIDTH + 1)),
    ("n", dict(beam_width=2, n=3)),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=100.5)),
    ("temperature", dict(temperature=NAN)),
    ("temperature", dict(temperature=INF)),
    ("temperature", dict(temperature="1")),
    ("temperature", dict(temperature=None)),
    ("temperature", dict(beam_width=2, temperature=0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=-0.5)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=NAN)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=1.5)),
    ("top_k", dict(top_k=False)),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.5)),
    ("min_p", dict(min_p=NAN)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=2**63)),
    ("seed", dict(seed=1.0)),
    ("seed", dict(seed="7")),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-5)),
    ("max_tokens", dict(max_tokens=2.0)),
    ("max_tokens", dict(max_tokens=None)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=17, max_tokens=16)),
    ("min_tokens", dict(min_tokens=1.0)),
    ("presence_penalty", dict(presence_penalty=2.01)),
    ("presence_penalty", dict(presence_penalty=-2.01)),
    ("presence_penalty", dict(presence_penalty=NAN)),
    ("frequency_penalty", dict(frequency_penalty=3)),
    ("frequency_penalty", dict(frequency_penalty=-3)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=10.5)),
    ("repetition_penalty", dict(repetition_penalty=1e-300)),
    ("repetition_penalty", dict(repetition_penalty=0.009)),
    ("length_penalty", dict(length_penalty=11.0)),
    ("length_penalty", dict(length_penalty=-11.0)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=True)),
    ("logprobs", dict(logprobs=2.0)),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop="")),
    ("stop", dict(stop=["ok", 3])),
    ("stop", dict(stop=None)),
    ("stop", dict(stop=7)),
    ("stop", dict(stop=["s"] * (MAX_STOP_STRINGS + 1))),
    ("stop", dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=[True])),
    ("stop_token_ids", dict(stop_token_ids=["2"])),
    ("stop_token_ids", dict(stop_token_ids=[1.0])),
    ("stop_token_ids", dict(stop_token_ids=5)),
    ("stop_token_ids", dict(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))),
    ("ignore_eos", dict(ignore_eos=1)),
    ("ignore_eos", dict(ignore_eos="yes")),
    ("best_of", dict(beam_width=2, n=1, best_of=2)),
]


@pytest.mark.parametrize("field, kwargs", INVALID, ids=[f"{f}-{kw}" for f, kw in INVALID])
def test_an_invalid_value_is_an_invalid_request_error_naming_the_field(field, kwargs):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_defaults_are_valid_and_mean_plain_sampling():
    p = SamplingParams()
    assert (p.n, p.best_of, p.beam_width) == (1, 1, 1)
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.seed is None
    assert not p.greedy and not p.use_beam_search and p.num_seqs == 1


VALID_EDGES = [
    dict(n=MAX_N), dict(n=2, best_of=MAX_N), dict(temperature=0.0), dict(temperature=100.0),
    dict(top_p=1e-9), dict(top_p=1.0), dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(top_k=10**6),
    dict(min_p=0.0), dict(min_p=1.0), dict(seed=0), dict(seed=2**63 - 1), dict(max_tokens=1),
    dict(min_tokens=16, max_tokens=16), dict(presence_penalty=-2.0), dict(presence_penalty=2.0),
    dict(frequency_penalty=-2), dict(repetition_penalty=0.01), dict(repetition_penalty=10.0),
    dict(length_penalty=-10.0), dict(logprobs=0), dict(logprobs=20), dict(stop_token_ids=[0, 5]),
    dict(beam_width=4, n=4), dict(beam_width=4, n=1, temperature=0.0), dict(ignore_eos=True),
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=[str(kw) for kw in VALID_EDGES])
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_best_of_defaults_to_n():
    assert SamplingParams(n=3).best_of == 3
    assert SamplingParams(n=3).num_seqs == 3


def test_best_of_sets_how_many_sequences_run():
    assert SamplingParams(n=2, best_of=5).num_seqs == 5


def test_beam_width_sets_how_many_sequences_run():
    p = SamplingParams(beam_width=4, n=2)
    assert p.use_beam_search and p.num_seqs == 4


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_stop_tuples_become_lists():
    p = SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4))
    assert p.stop == ["a", "b"] and p.stop_token_ids == [3, 4]


def test_the_stop_list_is_copied_not_shared_with_the_caller():
    stop = ["x"]
    p = SamplingParams(stop=stop)
    stop.append("y")
    assert p.stop == ["x"]


@pytest.mark.parametrize("kwargs, greedy", [
    (dict(temperature=0.0), True), (dict(top_k=1), True), (dict(temperature=0.0, top_k=5), True),
    (dict(temperature=1e-3), False), (dict(top_k=2), False), (dict(), False),
])
def test_greedy_means_temperature_zero_or_top_k_one(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


def test_the_error_message_shows_the_rejected_value():
    with pytest.raises(ValueError, match=r"top_p.*1\.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=math.nan)


@pytest.mark.parametrize("name", [n for n, r in LIMITS.items() if r.high is not None and n != "min_tokens"])
def test_every_bounded_field_is_checked_against_the_limits_table(name):
    allowed = LIMITS[name]
    above = allowed.high + 1 if allowed.integer else allowed.high * 1.5 + 1
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{name: above})
    assert info.value.param == name


def test_the_largest_allowed_lists_are_accepted():
    p = SamplingParams(stop=["s" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
                       stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    assert len(p.stop) == MAX_STOP_STRINGS and len(p.stop_token_ids) == MAX_STOP_TOKEN_IDS
