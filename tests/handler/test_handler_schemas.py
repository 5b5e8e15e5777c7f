"""Request parsing and validation without a server."""
from __future__ import annotations

import json

import pytest

from handler.llm_handler import parse_handler_config
from handler.schemas import (ChatRequest, CompletionRequest, NativeRequest, RequestError, check_prompt_ids,
                             decode_body, make_sampling_params, validate)

LIMIT = 1 << 20


def bad(raw=None, model=NativeRequest, body=None):
    with pytest.raises(RequestError) as ei:
        b = decode_body(raw, LIMIT) if body is None else body
        req = validate(model, b)
        check_prompt_ids(req.prompt if model is NativeRequest else req.single_prompt(), 16000)
        make_sampling_params(req.sampling_kwargs())
    err = ei.value.body()["error"]
    assert ei.value.status == 400 and set(err) >= {"message", "type", "param"} and err["message"]
    return ei.value


def test_good_native_roundtrip():
    req = validate(NativeRequest, decode_body(b'{"prompt": "hi", "max_tokens": 5, "temperature": 0, "stop": "x"}', LIMIT))
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
    (b'{"max_tokens": 5}', "prompt"),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": []}', "prompt"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": [1, "a"]}', "prompt"),
    (b'{"prompt": [1, true]}', "prompt"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 5.0}', "max_tokens"),
    (b'{"prompt": "x", "stream": "yes"}', "stream"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
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
    (b'{"prompt": [1, 16000]}', "prompt"),
    (b'{"prompt": [-1]}', "prompt"),
])
def test_bad_native(raw, param):
    err = bad(raw)
    assert err.param == param, err.message


def test_size_limit_bytes_and_decoded():
    big = json.dumps({"prompt": "a" * (2 * LIMIT)}).encode()
    assert "limit" in bad(big).message
    with pytest.raises(RequestError, match="limit"):
        decode_body({"prompt": "a" * (2 * LIMIT)}, LIMIT)  # the frontend already decoded the JSON


def test_decoded_json_values_accepted():
    assert decode_body({"prompt": "x"}, LIMIT) == {"prompt": "x"}
    assert decode_body('{"prompt": "x"}', LIMIT) == {"prompt": "x"}
    with pytest.raises(RequestError, match="JSON object"):
        decode_body([1, 2], LIMIT)


def test_openai_completion_and_chat():
    req = validate(CompletionRequest, {"model": "llm", "prompt": ["hello"], "max_tokens": 3,
                                       "stream": True, "stream_options": {"include_usage": True}})
    assert req.single_prompt() == "hello"
    bad(model=CompletionRequest, body={"model": "llm", "prompt": ["a", "b"]})
    bad(model=CompletionRequest, body={"model": "llm", "prompt": "a", "echo": True})
    chat = validate(ChatRequest, {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                                  "max_completion_tokens": 4})
    assert chat.sampling_kwargs()["max_tokens"] == 4 and chat.messages[0].text() == "hi"
    with pytest.raises(RequestError):
        validate(ChatRequest, {"model": "llm", "messages": []})
    with pytest.raises(RequestError):
        validate(ChatRequest, {"model": "llm", "messages": [{"role": "wizard", "content": "hi"}]})


def test_handler_config_parsing(tmp_path):
    cfg, settings = parse_handler_config({"block_size": 8, "num_kv_blocks": 10, "request_timeout": 30,
                                          "max_request_bytes": 1000}, str(tmp_path))
    assert cfg.block_size == 8 and cfg.request_timeout_s == 30 and cfg.model == str(tmp_path)
    assert settings["max_request_bytes"] == 1000
    for section, word in [({"block_sise": 8}, "block_sise"), ({"block_size": -1}, "block_size"),
                          ({"num_kv_blocks": 4, "kv_cache_memory_bytes": 100}, "not both"),
                          ({"dtype": "int3"}, "dtype"), ({"preemption_mode": "yolo"}, "preemption_mode"),
                          ({"max_request_bytes": "big"}, "max_request_bytes")]:
        with pytest.raises(ValueError, match=word):
            parse_handler_config(section, str(tmp_path))


def test_invalid_settings_fail_initialize_clearly(tmp_path, caplog):
    from handler.llm_handler import LLMHandler

    class Ctx:
        system_properties = {"model_dir": str(tmp_path)}
        model_yaml_config = {"handler": {"max_num_seqz": 4}}
        model_name = "llm"
        metrics = None
    with pytest.raises(ValueError, match="max_num_seqz"):
        LLMHandler().initialize(Ctx())
    assert "model-config.yaml" in caplog.text
