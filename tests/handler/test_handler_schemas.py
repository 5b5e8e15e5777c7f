"""Request decoding and schemas without a server: every refusal is a RequestError naming the field."""
from __future__ import annotations

import json

import pytest

from paged_handler.errors import RequestError
from paged_handler.schemas import (MAX_JSON_DEPTH, ChatRequest, CompletionRequest, NativeRequest, decode_body,
                             make_sampling_params, validate)
from paged_handler.settings import parse_handler_config
from paged.sampling_params import LIMITS, LIST_LIMITS, SamplingParams

LIMIT = 1 << 20


def refused(raw=None, model=NativeRequest, body=None) -> RequestError:
    """The error a body gets from decoding, the schema and SamplingParams (in that order)."""
    with pytest.raises(RequestError) as info:
        req = validate(model, decode_body(raw, LIMIT) if body is None else body)
        if hasattr(req, "check_options"):
            req.check_options()
        make_sampling_params(req.sampling_kwargs())
    err = info.value.body()["error"]
    assert info.value.status == 400 and set(err) >= {"message", "type", "param"} and err["message"]
    return info.value


def test_good_native_roundtrip():
    req = validate(NativeRequest, decode_body(b'{"prompt": "hi", "max_tokens": 5, "temperature": 0, "stop": "x"}',
                                              LIMIT))
    p = make_sampling_params(req.sampling_kwargs())
    assert p.max_tokens == 5 and p.temperature == 0 and p.stop == ["x"] and not req.stream
    req = validate(NativeRequest, {"prompt": [1, 2, 3], "stream": True, "n": 2, "top_p": 0.5, "seed": 3})
    assert req.prompt == [1, 2, 3] and req.stream


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b'{"prompt": "\xff\xfe"}', None),
    (b"[1, 2]", None),
    (b"", None),
    (b"null", None),
    (b'"just a string"', None),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None),
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b'{"max_tokens": 5}', "prompt"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": [1, "a"]}', "prompt"),
    (b'{"prompt": [1, true]}', "prompt"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "ok", "stop": ["\\udfff"]}', "stop"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 5.0}', "max_tokens"),
    (b'{"prompt": "x", "stream": "yes"}', "stream"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "x", "foo": 1}', "foo"),
    (b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 1000000000000}', "max_tokens"),
    (b'{"prompt": "x", "temperature": -0.5}', "temperature"),
    (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "x", "top_p": 1.5}', "top_p"),
    (b'{"prompt": "x", "n": 0}', "n"),
    (b'{"prompt": "x", "n": 1000}', "n"),
    (b'{"prompt": "x", "beam_width": 0}', "beam_width"),
    (b'{"prompt": "x", "beam_width": 1000}', "beam_width"),
    (b'{"prompt": "x", "n": 4, "beam_width": 2}', "n"),
    (b'{"prompt": "x", "repetition_penalty": 1e-300}', "repetition_penalty"),
    (b'{"prompt": "x", "stop_token_ids": [-1]}', "stop_token_ids"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
])
def test_bad_native_bodies_name_the_field(raw, param):
    err = refused(raw)
    assert err.param == param, err.message


def test_deep_nesting_in_a_field_is_refused_naming_it():
    deep: object = "x"
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    err = refused(body=None, raw=json.dumps({"prompt": "x", "stop": deep}).encode())
    assert err.param == "stop" and "nested" in err.message


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_schema_bounds_are_the_sampling_params_bounds(name):
    """Each LIMITS range is enforced by the request schema at exactly the same edges."""
    rng = LIMITS[name]
    extra = {"max_tokens": LIMITS["max_tokens"].high} if name == "min_tokens" else {}
    for edge, inclusive, step in ((rng.low, rng.low_inclusive, -1), (rng.high, rng.high_inclusive, +1)):
        if edge is None:
            continue
        inside = edge if inclusive else edge - step * (1 if rng.integer else 1e-9)
        outside = edge + step * (1 if rng.integer else 1e-6) if inclusive else edge
        if rng.integer:
            inside, outside = int(inside), int(outside)
        ok = validate(NativeRequest, {"prompt": "x", name: inside, **extra})
        SamplingParams(**ok.sampling_kwargs())
        with pytest.raises(RequestError) as info:
            validate(NativeRequest, {"prompt": "x", name: outside, **extra})
        assert info.value.param == name


@pytest.mark.parametrize("name", sorted(LIST_LIMITS))
def test_schema_list_caps_are_the_sampling_params_caps(name):
    most, _ = LIST_LIMITS[name]
    item = "s" if name == "stop" else 5
    validate(NativeRequest, {"prompt": "x", name: [item] * most})
    with pytest.raises(RequestError) as info:
        validate(NativeRequest, {"prompt": "x", name: [item] * (most + 1)})
    assert info.value.param == name


def test_every_sampling_field_is_accepted_by_every_route():
    body = {"n": 2, "best_of": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 1,
            "max_tokens": 4, "min_tokens": 1, "stop": ["a"], "stop_token_ids": [3], "ignore_eos": True,
            "presence_penalty": 0.1, "frequency_penalty": 0.1, "repetition_penalty": 1.1, "length_penalty": 1.0,
            "beam_width": 1}
    for model, extra in ((NativeRequest, {"prompt": "x", "logprobs": 2}),
                         (CompletionRequest, {"prompt": "x", "logprobs": 2}),
                         (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                        "top_logprobs": 2})):
        params = make_sampling_params(validate(model, dict(body, **extra)).sampling_kwargs())
        assert params.best_of == 3 and params.logprobs == 2


def test_size_limit_bytes_and_decoded():
    big = json.dumps({"prompt": "a" * (2 * LIMIT)}).encode()
    assert "limit" in refused(big).message
    with pytest.raises(RequestError, match="limit"):
        decode_body({"prompt": "a" * (2 * LIMIT)}, LIMIT)  # the frontend already decoded the JSON


def test_decoded_json_values_are_checked_like_raw_ones():
    assert decode_body({"prompt": "x"}, LIMIT) == {"prompt": "x"}
    assert decode_body('{"prompt": "x"}', LIMIT) == {"prompt": "x"}
    with pytest.raises(RequestError, match="JSON object"):
        decode_body([1, 2], LIMIT)
    with pytest.raises(RequestError) as info:
        decode_body({"messages": [{"role": "user", "content": "\ud800"}]}, LIMIT)
    assert info.value.param == "messages"


def test_openai_options_this_server_refuses():
    req = validate(CompletionRequest, {"model": "llm", "prompt": ["hello"], "max_tokens": 3,
                                       "stream": True, "stream_options": {"include_usage": True}})
    req.check_options()
    assert req.single_prompt() == "hello"
    with pytest.raises(RequestError) as info:
        validate(CompletionRequest, {"model": "llm", "prompt": ["a", "b"]}).single_prompt()
    assert info.value.param == "prompt"
    for body, param in [({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "suffix": "z"}, "suffix"),
                        ({"prompt": "a", "logit_bias": {"5": 1}}, "logit_bias"),
                        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options")]:
        assert refused(model=CompletionRequest, body=dict(body, model="llm")).param == param
    msgs = [{"role": "user", "content": "hi"}]
    assert refused(model=ChatRequest, body={"messages": msgs, "top_logprobs": 2}).param == "top_logprobs"
    assert refused(model=ChatRequest, body={"messages": msgs, "stream_options": {}}).param == "stream_options"


def test_chat_schema():
    chat = validate(ChatRequest, {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                                  "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3})
    kwargs = chat.sampling_kwargs()
    assert kwargs["max_tokens"] == 4 and kwargs["logprobs"] == 3 and chat.messages[0].text() == "hi"
    assert "logprobs" not in validate(ChatRequest, {"messages": [{"role": "user", "content": "x"}]}).sampling_kwargs()
    for body in ({"model": "llm", "messages": []}, {"model": "llm", "messages": [{"role": "wizard", "content": "hi"}]}):
        with pytest.raises(RequestError) as info:
            validate(ChatRequest, body)
        assert info.value.param == "messages"


def test_handler_config_parsing(tmp_path):
    cfg, settings = parse_handler_config({"block_size": 8, "num_kv_blocks": 10, "request_timeout": 30,
                                          "max_request_bytes": 1000, "max_response_bytes": 5000}, str(tmp_path))
    assert cfg.block_size == 8 and cfg.request_timeout_s == 30 and cfg.model == str(tmp_path)
    assert settings["max_request_bytes"] == 1000 and settings["max_response_bytes"] == 5000
    for section, word in [({"block_sise": 8}, "block_sise"), ({"block_size": -1}, "block_size"),
                          ({"num_kv_blocks": 4, "kv_cache_memory_bytes": 100}, "not both"),
                          ({"dtype": "int3"}, "dtype"), ({"preemption_mode": "yolo"}, "preemption_mode"),
                          ({"max_request_bytes": "big"}, "max_request_bytes"),
                          ({"tokenizer_threads": 0}, "tokenizer_threads")]:
        with pytest.raises(ValueError, match=word):
            parse_handler_config(section, str(tmp_path))


def test_handler_config_passes_quantization_to_the_engine(tmp_path):
    cfg, _ = parse_handler_config({"quantization": "int8", "dtype": "bfloat16"}, str(tmp_path))
    assert cfg.quantization == "int8"
    with pytest.raises(ValueError, match="quantization"):
        parse_handler_config({"quantization": "int4"}, str(tmp_path))


def test_invalid_settings_fail_initialize_clearly(tmp_path, caplog):
    from paged_handler.ts_adapter import TorchServeHandler

    class Ctx:
        system_properties = {"model_dir": str(tmp_path)}
        model_yaml_config = {"handler": {"max_num_seqz": 4}}
        model_name = "llm"
        metrics = None
    with pytest.raises(ValueError, match="max_num_seqz"):
        TorchServeHandler().initialize(Ctx())
    assert "model-config.yaml" in caplog.text


def test_a_gguf_model_in_the_handler_config_is_found_in_the_archive(tmp_path):
    cfg, _ = parse_handler_config({"model": "weights.gguf"}, str(tmp_path))
    assert cfg.model == str(tmp_path / "weights.gguf")
