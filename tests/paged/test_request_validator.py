"""The one request validator (engine and handler): every refusal names the field at fault."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from paged.config import EngineConfig
from paged.errors import InvalidRequestError
from paged.request_validator import RequestLimits, RequestValidator
from paged.sampling_params import SamplingParams

VALIDATOR = RequestValidator(RequestLimits(max_model_len=64, vocab_size=100, max_num_seqs=4))


def refused_param(call) -> str | None:
    with pytest.raises(InvalidRequestError) as info:
        call()
    return info.value.param


@pytest.mark.parametrize("num_prompt_tokens, params, param", [
    (64, SamplingParams(max_tokens=1), "prompt"),
    (60, SamplingParams(max_tokens=5), "max_tokens"),
    (4, SamplingParams(n=5, temperature=1.0), "n"),
    (4, SamplingParams(n=2, best_of=5, temperature=1.0), "best_of"),
    (4, SamplingParams(beam_width=5), "beam_width"),
    (4, SamplingParams(stop_token_ids=[100]), "stop_token_ids"),
])
def test_each_engine_limit_names_its_field(num_prompt_tokens, params, param):
    assert refused_param(lambda: VALIDATOR.check(num_prompt_tokens, params)) == param


def test_a_request_within_every_limit_passes():
    VALIDATOR.check(60, SamplingParams(max_tokens=4, n=2, best_of=4, temperature=1.0, stop_token_ids=[99]))


@pytest.mark.parametrize("prompt", [[], [100], [-1], [True], ["a"], None, "text"])
def test_bad_token_id_prompts_are_refused(prompt):
    assert refused_param(lambda: VALIDATOR.check_prompt_ids(prompt)) == "prompt"


def test_the_excess_over_the_context_is_stated():
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len 64 by 6"):
        VALIDATOR.check(50, SamplingParams(max_tokens=20))


def test_limits_come_from_the_config_and_the_model():
    args = SimpleNamespace(max_position_embeddings=2048, sliding_window=512, vocab_size=32000)
    limits = RequestLimits.for_model(EngineConfig(model="m", max_num_seqs=8, dtype="float32"), args)
    assert limits == RequestLimits(max_model_len=512, vocab_size=32000, max_num_seqs=8)
    with pytest.raises(ValueError, match="exceeds the model's limit 512"):
        RequestLimits.for_model(EngineConfig(model="m", max_model_len=1024, dtype="float32"), args)
