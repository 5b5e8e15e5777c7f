"""The protocol-neutral service against a fake engine and the real tokenizer (no TorchServe).

Specifies what is checked before the engine sees a request, how engine errors become answers,
and the answer shapes (logprobs, chunk sizes) that do not need a real model.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from paged_handler.errors import RequestError
from paged_handler.formats import Delta, NativeFormat, ResponseContext
from paged_handler.service import LLMService
from paged_handler.settings import HANDLER_DEFAULTS
from paged_handler.tokenization import TokenizerPool
from paged.async_engine import AsyncLLMEngine
from paged.config import EngineConfig
from ts_fake_engine import FAIL_REQUEST_TOKEN, FakeEngine


class BigVocabEngine(FakeEngine):
    vocab_size = 16000
    max_model_len = 256


@pytest.fixture(scope="module")
def tokenizers(tiny_llama_dir):
    pool = TokenizerPool(str(tiny_llama_dir), threads=1, max_pending=4)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def stack(tokenizers):
    holder = {}

    def factory(cfg):
        holder["engine"] = BigVocabEngine(cfg)
        return holder["engine"]
    engine = AsyncLLMEngine(EngineConfig(model="fake", max_num_seqs=8), engine_factory=factory, warmup=False,
                            idle_wait_s=0.05).start(timeout=120)
    settings = dict(HANDLER_DEFAULTS, max_response_bytes=96 * 1024)
    yield LLMService(engine, tokenizers, settings, "llm"), holder["engine"]
    engine.shutdown()


def serve(service, route, body, rid, sent=None):
    sent = [] if sent is None else sent
    return asyncio.run(service.serve(route, json.dumps(body).encode(), rid, lambda c, t: sent.append(c)))


def refusal(service, route, body, rid) -> RequestError:
    with pytest.raises(RequestError) as info:
        serve(service, route, body, rid)
    return info.value


def test_unknown_model_is_a_404_naming_the_field(stack):
    service, engine = stack
    for route, body in (("completions", {"model": "gpt-9", "prompt": [5]}),
                        ("chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})):
        err = refusal(service, route, body, f"unknown-model-{route}")
        assert err.status == 404 and err.param == "model" and "gpt-9" in err.message
    assert not [rid for rid, _ in engine.added if rid.startswith("unknown-model")]


def test_the_served_name_and_the_torchserve_name_are_both_known(stack):
    service, _ = stack
    answer = serve(service, "completions", {"model": "llm", "prompt": [5, 6], "max_tokens": 2}, "known-model")
    assert answer.status == 200 and json.loads(answer.body)["model"] == "llm"


def test_chat_without_max_tokens_may_fill_the_context(stack):
    service, engine = stack
    answer = serve(service, "chat", {"messages": [{"role": "user", "content": "hello there"}]}, "chat-default")
    usage = json.loads(answer.body)["usage"]
    assert engine.params["chat-default"].max_tokens == BigVocabEngine.max_model_len - usage["prompt_tokens"]


def test_prompts_reach_the_engine_as_token_ids(stack, tokenizers):
    service, engine = stack
    serve(service, "native", {"prompt": "def f(x):", "max_tokens": 2}, "text-prompt")
    (prompt,) = [p for rid, p in engine.added if rid == "text-prompt"]
    assert prompt == asyncio.run(tokenizers.encode("def f(x):"))


@pytest.mark.parametrize("body, param", [
    ({"prompt": [5], "stop_token_ids": [16000]}, "stop_token_ids"),
    ({"prompt": [5, 16000]}, "prompt"),
    ({"prompt": [5], "n": 9}, "n"),
    ({"prompt": [5], "n": 2, "best_of": 9}, "best_of"),
    ({"prompt": [5], "beam_width": 9}, "beam_width"),
    ({"prompt": [5] * 250, "max_tokens": 10}, "max_tokens"),
    ({"prompt": [5] * 256}, "prompt"),
    ({"prompt": "word " * 20000}, "prompt"),
])
def test_requests_beyond_the_engine_limits_are_refused_before_it_sees_them(stack, body, param):
    service, engine = stack
    rid = f"limit-{param}-{len(engine.added)}"
    err = refusal(service, "native", body, rid)
    assert err.status == 400 and err.param == param, err.message
    assert rid not in engine.params


def test_an_answer_too_large_for_one_response_is_refused_unless_streamed(stack):
    service, engine = stack
    body = {"prompt": [5, 6], "n": 4, "logprobs": 20, "max_tokens": 60}
    err = refusal(service, "native", body, "too-large")
    assert err.param == "max_tokens" and "stream" in err.message and "too-large" not in engine.params
    chunks = []
    answer = serve(service, "native", dict(body, stream=True), "too-large-streamed", chunks)
    assert answer.status == 200 and chunks
    assert all(len(c.encode()) <= service.response_budget for c in chunks + [answer.body])


def test_a_large_delta_is_split_into_chunks_that_fit(stack):
    service, _ = stack
    fmt = NativeFormat(ResponseContext("r", "llm", logprobs=3, token_text=str))
    ids = list(range(4000))
    deltas = [Delta(i, "é\n" * 30000, ids, [{t: -1.0, t + 1: -2.0} for t in ids]) for i in range(2)]
    chunks = service._chunks(fmt, deltas)
    assert len(chunks) > 2 and all(len(c.encode()) <= service.response_budget for c in chunks)
    for index in (0, 1):
        pieces = [c for obj in map(json.loads, chunks) for c in obj["choices"] if c["index"] == index]
        assert "".join(p["text"] for p in pieces) == deltas[index].text
        assert [t for p in pieces for t in p["token_ids"]] == ids
        assert [lp["token_id"] for p in pieces for lp in p["logprobs"]] == ids


def test_a_request_the_engine_fails_gets_its_status_and_others_are_unaffected(stack):
    service, _ = stack

    async def both():
        good = asyncio.create_task(service.serve("native", json.dumps({"prompt": [5], "max_tokens": 8}).encode(),
                                                 "unaffected", lambda c, t: None))
        with pytest.raises(RequestError) as info:
            await service.serve("native", json.dumps({"prompt": [5, FAIL_REQUEST_TOKEN]}).encode(), "failed",
                                lambda c, t: None)
        return info.value, await good
    err, good = asyncio.run(both())
    assert err.status == 400 and err.type == "invalid_request_error" and "allowed" in err.message
    assert good.status == 200 and json.loads(good.body)["choices"][0]["finish_reason"] == "length"


def test_a_failure_after_the_stream_started_ends_it_with_an_error_chunk(stack):
    service, _ = stack
    chunks = []
    answer = serve(service, "completions", {"prompt": [5, FAIL_REQUEST_TOKEN], "stream": True, "max_tokens": 8},
                   "mid-stream", chunks)
    assert chunks and all(c.startswith("data: ") for c in chunks)
    error_event, done = answer.body.split("\n\n")[:2]
    assert json.loads(error_event[len("data: "):])["error"]["code"] == 400 and done == "data: [DONE]"


def test_completion_logprobs_are_openai_parallel_lists(stack):
    service, _ = stack
    answer = serve(service, "completions", {"prompt": [5, 6], "max_tokens": 5, "logprobs": 2}, "cmpl-logprobs")
    choice = json.loads(answer.body)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_chat_logprobs_list_each_token_with_its_alternatives(stack):
    service, _ = stack
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 1}
    choice = json.loads(serve(service, "chat", body, "chat-logprobs").body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) <= 1
               for e in content)
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)
    no_logprobs = json.loads(serve(service, "chat", dict(body, logprobs=False, top_logprobs=None),
                                   "chat-no-logprobs").body)
    assert no_logprobs["choices"][0]["logprobs"] is None


def test_a_text_longer_than_the_context_is_refused_without_tokenizing(stack, monkeypatch):
    service, _ = stack

    async def must_not_run(text):
        raise AssertionError("tokenized a prompt that cannot fit")
    monkeypatch.setattr(service.tokenizers, "encode", must_not_run)
    err = refusal(service, "native", {"prompt": "x" * (service.max_prompt_chars + 1)}, "long-text")
    assert err.param == "prompt"


def test_tokenization_waits_are_bounded(tokenizers, monkeypatch):
    import threading

    release = threading.Event()
    monkeypatch.setattr(tokenizers, "_encode", lambda text: release.wait(30) and [1])

    async def burst():
        tasks = [asyncio.create_task(tokenizers.encode("x")) for _ in range(6)]
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)
    res = asyncio.run(burst())
    refused = [r for r in res if isinstance(r, RequestError)]
    assert len(refused) == 2 and all(r.status == 503 for r in refused)


def _native_chunks(chunks: list[str]) -> list[list[int]]:
    """The token ids of each NDJSON chunk that carries tokens."""
    ids = [[t for c in json.loads(chunk)["choices"] for t in c["token_ids"]] for chunk in chunks]
    return [i for i in ids if i]


def _stream_by_token(service, n: int, fail: bool = False) -> tuple[list[str], str]:
    """Stream one request whose engine output grows by one token per step (or fails after n)."""
    from paged.outputs import CompletionOutput, RequestOutput
    from paged.sampling_params import SamplingParams
    from paged_handler.service import Prepared

    async def outputs(p):
        for k in range(1, n + 1):
            ids = list(range(10, 10 + k))
            done = k == n and not fail
            yield RequestOutput("r", None, [5], [CompletionOutput(0, "".join(f"t{t} " for t in ids), ids,
                                                                   finish_reason="length" if done else None)], done, None)
        if fail:
            raise RequestError("no token is allowed by this request's parameters")

    service._outputs = outputs
    prepared = Prepared("r", [5], SamplingParams(max_tokens=n), True, NativeFormat(ResponseContext("r", "llm")))
    chunks: list[str] = []
    answer = asyncio.run(service._stream(prepared, lambda c, t: chunks.append(c)))
    return chunks, answer.body


def test_a_stream_interval_sends_fewer_chunks_and_loses_no_token(stack):
    service, _ = stack
    spaced = LLMService(service.engine, service.tokenizers, dict(service.settings, stream_interval=4), "llm")
    every, _ = _stream_by_token(LLMService(service.engine, service.tokenizers, service.settings, "llm"), 23)
    held, closing = _stream_by_token(spaced, 23)
    assert [len(ids) for ids in _native_chunks(every)] == [1] * 23
    # the first token at once, then every 4 new tokens, the rest with the finished output
    assert [len(ids) for ids in _native_chunks(held)] == [1, 4, 4, 4, 4, 4, 2]
    assert [t for ids in _native_chunks(held) for t in ids] == list(range(10, 33))
    assert json.loads(closing)["choices"][0]["finish_reason"] == "length"


def test_tokens_held_by_the_stream_interval_go_out_before_an_error_chunk(stack):
    service, _ = stack
    spaced = LLMService(service.engine, service.tokenizers, dict(service.settings, stream_interval=8), "llm")
    chunks, closing = _stream_by_token(spaced, 5, fail=True)
    assert [len(ids) for ids in _native_chunks(chunks)] == [1, 4]
    assert json.loads(closing)["error"]["code"] == 400
