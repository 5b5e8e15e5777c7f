"""End to end through a real TorchServe: native, OpenAI, gRPC routes, bad input, metrics, describe."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ts_client import error_of, post, stream_native, wait_no_frontend_jobs, wait_pool_whole

GREEDY = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Foo(object):\n    def __init__(self"]


@pytest.mark.smoke
def test_native_matches_offline(torchserve, offline_llm):
    ref = offline_llm(PROMPTS, **GREEDY)
    for prompt, exp in zip(PROMPTS, ref):
        r = post(torchserve, dict(GREEDY, prompt=prompt))
        assert r.status_code == 200, r.text
        out = r.json()
        ch = out["choices"][0]
        assert ch["text"] == exp["text"][0] and ch["token_ids"] == exp["token_ids"][0]
        assert ch["finish_reason"] == "length"
        assert out["usage"]["prompt_tokens"] == len(exp["prompt_token_ids"])
        assert out["usage"]["completion_tokens"] == GREEDY["max_tokens"]

        s = stream_native(torchserve, dict(GREEDY, prompt=prompt))
        assert s["text"][0] == exp["text"][0] and s["ids"][0] == exp["token_ids"][0]
        assert s["finish"] == {0: "length"} and s["chunks"] >= 2
        assert s["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    # token-id prompts work too
    ids = ref[0]["prompt_token_ids"]
    r = post(torchserve, dict(GREEDY, prompt=ids))
    assert r.json()["choices"][0]["token_ids"] == ref[0]["token_ids"][0]


def test_32_concurrent_streams_match_offline_and_free_the_pool(torchserve, offline_llm):
    prompts = [f"def function_{i}(x, y):\n    return x {'+-*/%'[i % 5]} y" + " # " * (i % 4) for i in range(32)]
    params = {"max_tokens": 20, "temperature": 0.0, "ignore_eos": True}
    ref = offline_llm(prompts, **params)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: stream_native(torchserve, dict(params, prompt=p)), prompts))
    mismatches = [i for i, (got, exp) in enumerate(zip(results, ref)) if got["ids"][0] != exp["token_ids"][0]]
    assert not mismatches, f"{len(mismatches)} of 32 differ from offline, e.g. #{mismatches[0]}"
    assert all(got["text"][0] == exp["text"][0] for got, exp in zip(results, ref))
    assert all(got["finish"] == {0: "length"} for got in results)
    d = wait_pool_whole(torchserve)
    assert d["engine_running"] and d["engine_config"]["num_kv_blocks"] == 96


async def _post_raw(port: int, body: bytes) -> tuple[int, dict]:
    """One HTTP/1.1 POST on its own connection: (status, JSON body), read by its framing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /predictions/llm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        status = int((await reader.readline()).split(b" ", 2)[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            payload = b""
            while size := int((await reader.readline()).split(b";")[0], 16):
                payload += (await reader.readexactly(size + 2))[:-2]
        else:
            payload = await reader.readexactly(int(headers["content-length"]))
        return status, json.loads(payload)
    finally:
        writer.close()


def test_a_burst_beyond_torchserves_default_job_queue_reaches_the_engine(torchserve):
    """300 requests at once (TorchServe's default job queue holds 100; the model config raises
    it): each one is answered by the engine, a 200 or the engine's own JSON 503 when more arrive
    than it admits, never the frontend's queue-full 503; the pool is whole afterwards."""
    port = int(torchserve.base.rsplit(":", 1)[1])
    bodies = [json.dumps({"prompt": f"x = {i}", "max_tokens": 2, "temperature": 0.0, "ignore_eos": True}).encode()
              for i in range(300)]

    async def burst():
        return await asyncio.gather(*[_post_raw(port, body) for body in bodies])

    answers = asyncio.run(burst())
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 64     # the inbox alone admits max_waiting_requests (64) at once
    for status, body in answers:
        if status == 503:
            assert body.get("error", {}).get("type") == "overloaded", body
        else:
            assert len(body["choices"][0]["token_ids"]) == 2
    wait_pool_whole(torchserve)
    assert wait_no_frontend_jobs(torchserve) == 0


@pytest.mark.smoke
def test_openai_client(torchserve, offline_llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{torchserve.base}/predictions/llm/1.0/v1", api_key="unused", max_retries=0,
                           timeout=300)
    ref = offline_llm([PROMPTS[0]], max_tokens=16, temperature=0.0)[0]
    models = client.models.list()
    assert [m.id for m in models.data] == ["llm"]

    c = client.completions.create(model="llm", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert c.choices[0].text == ref["text"][0] and c.choices[0].finish_reason == ref["finish_reason"][0]
    assert c.usage.completion_tokens == len(ref["token_ids"][0])

    pieces, finish = [], None
    for chunk in client.completions.create(model="llm", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                           stream=True):
        for ch in chunk.choices:
            pieces.append(ch.text)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == ref["text"][0] and finish == ref["finish_reason"][0]

    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A sorting function"}]
    chat = client.chat.completions.create(model="llm", messages=msgs, max_tokens=12, temperature=0)
    text = chat.choices[0].message.content
    assert isinstance(text, str) and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1 and chat.choices[0].finish_reason in ("stop", "length")

    pieces, roles, usage = [], [], None
    for chunk in client.chat.completions.create(model="llm", messages=msgs, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            pieces.append(ch.delta.content or "")
    assert "".join(pieces) == text and roles == ["assistant"]
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="llm", prompt="x", max_tokens=-3)
    assert ei.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)

    # logprobs when asked: the completions object of parallel lists, chat's content entries
    c = client.completions.create(model="llm", prompt=PROMPTS[0], max_tokens=16, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert all(len(top) <= 3 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the chosen one is the top
    assert "".join(lp.tokens) == ref["text"][0]
    chat = client.chat.completions.create(model="llm", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)


def test_raw_sse_framing(torchserve):
    r = post(torchserve, {"model": "llm", "prompt": "x = ", "max_tokens": 4, "temperature": 0, "stream": True},
             path="v1/completions", stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") or e.startswith(":") for e in events)


def test_grpc_predictions_answer_in_one_message(torchserve, offline_llm, tmp_path_factory):
    grpc = pytest.importorskip("grpc")
    from paged_tools.grpc_stubs import load_stubs

    pb, pb_grpc = load_stubs(tmp_path_factory.mktemp("grpc_stubs"))
    ref = offline_llm([PROMPTS[1]], **GREEDY)[0]
    pid = torchserve.worker_pid()
    with grpc.insecure_channel(f"127.0.0.1:{torchserve.grpc}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        req = pb.PredictionsRequest(model_name="llm", input={"data": json.dumps(dict(GREEDY, prompt=PROMPTS[1])).encode()})
        (only,) = [json.loads(r.prediction) for r in stub.StreamPredictions(req, timeout=300)]
        assert only["choices"][0]["text"] == ref["text"][0] and only["choices"][0]["token_ids"] == ref["token_ids"][0]
        unary = json.loads(stub.Predictions(req, timeout=300).prediction)
        assert unary["choices"][0]["token_ids"] == ref["token_ids"][0]
        # streaming is refused on both calls: a second message on a Predictions call would make
        # the frontend drop the worker (TorchServe 0.12 cannot tell the two calls apart)
        streamed = pb.PredictionsRequest(model_name="llm", input={
            "data": json.dumps(dict(GREEDY, prompt=PROMPTS[1], stream=True)).encode()})
        for call in (stub.Predictions, lambda r, timeout: next(iter(stub.StreamPredictions(r, timeout=timeout)))):
            err = json.loads(call(streamed, timeout=60).prediction)["error"]
            assert err["code"] == 400 and err["param"] == "stream"
        # bad input: the same JSON error (TorchServe 0.12's gRPC frontend drops per-request status codes)
        bad = pb.PredictionsRequest(model_name="llm", input={"data": b'{"prompt": "x", "top_p": 7}'})
        (err,) = [json.loads(r.prediction) for r in stub.StreamPredictions(bad, timeout=60)]
        assert err["error"]["code"] == 400 and err["error"]["param"] == "top_p"
        err = json.loads(stub.Predictions(bad, timeout=60).prediction)
        assert err["error"]["code"] == 400
    assert torchserve.worker_pid() == pid


def _bad_requests():
    big_ids = list(range(10, 3010))          # 3000 tokens > max_model_len 2048
    pool_ids = list(range(10, 1610))         # 1600 tokens < 2048 but > 96 blocks x 16 slots
    return {
        "not json": b"{not json",
        "not utf-8": b'{"prompt": "\xff\xfe\xfa"}',
        "json array": b"[1, 2, 3]",
        "json string": b'"prompt"',
        "missing prompt": {"max_tokens": 4},
        "empty prompt": {"prompt": ""},
        "empty id list": {"prompt": []},
        "prompt wrong type": {"prompt": 42},
        "max_tokens wrong type": {"prompt": "x", "max_tokens": "4"},
        "stream wrong type": {"prompt": "x", "stream": "yes"},
        "unknown field": {"prompt": "x", "max_tokenz": 4},
        "negative max_tokens": {"prompt": "x", "max_tokens": -5},
        "huge max_tokens": {"prompt": "x", "max_tokens": 10**12},
        "max_tokens beyond context": {"prompt": "x", "max_tokens": 5000},
        "negative temperature": {"prompt": "x", "temperature": -1},
        "top_p zero": {"prompt": "x", "top_p": 0},
        "top_p above one": {"prompt": "x", "top_p": 1.01},
        "n zero": {"prompt": "x", "n": 0},
        "n huge": {"prompt": "x", "n": 100000},
        "beam_width zero": {"prompt": "x", "beam_width": 0},
        "beam_width huge": {"prompt": "x", "beam_width": 100000},
        "token id beyond vocab": {"prompt": [1, 2, 16000]},
        "negative token id": {"prompt": [1, -2]},
        "ids longer than model": {"prompt": big_ids},
        "ids longer than pool": {"prompt": pool_ids, "max_tokens": 4},
        "text far longer than model": {"prompt": "word " * 100_000},
        "text longer than model": {"prompt": "alpha beta gamma delta " * 1200},
        "several MB body": json.dumps({"prompt": "a" * (4 << 20)}).encode(),
        "chat no messages": ("v1/chat/completions", {"model": "llm", "messages": []}),
        "chat bad role": ("v1/chat/completions", {"model": "llm", "messages": [{"role": "x", "content": "y"}]}),
        "completion bad n": ("v1/completions", {"model": "llm", "prompt": "x", "n": -1}),
        "lone surrogate": b'{"prompt": "\\ud800 x"}',
        "deep nesting": b'{"prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "stop id beyond vocab": {"prompt": "x", "stop_token_ids": [16000]},
        "tiny repetition penalty": {"prompt": "x", "repetition_penalty": 1e-300, "temperature": 1.0},
        "stream_options without stream": ("v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
    }


def test_bad_input_while_a_good_stream_runs(torchserve, offline_llm):
    long_params = {"max_tokens": 160, "temperature": 0.0, "ignore_eos": True}
    ref = offline_llm([PROMPTS[2]], **long_params)[0]
    pid_before = torchserve.worker_pid()
    result = {}
    first_chunk = threading.Event()

    def good():
        r = post(torchserve, dict(long_params, prompt=PROMPTS[2], stream=True), stream=True)
        text, finish = "", None
        for line in r.iter_lines():
            if line:
                first_chunk.set()
                obj = json.loads(line)
                result.setdefault("objs", []).append(obj)
                text += obj["choices"][0]["text"] if obj.get("choices") else ""
                finish = (obj.get("choices") or [{}])[0].get("finish_reason") or finish
        result.update(status=r.status_code, text=text, finish=finish)

    t = threading.Thread(target=good)
    t.start()
    assert first_chunk.wait(120), "good stream did not start"
    failures = {}

    def send(item):
        name, body = item
        path = ""
        if isinstance(body, tuple):
            path, body = body
        r = post(torchserve, body, path=path, timeout=120)
        try:
            ok = r.status_code == 400 and error_of(r)
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            failures[name] = (r.status_code, r.text[:300])
        return name

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(send, _bad_requests().items()))
    t.join(300)
    assert not failures, failures
    assert result.get("status") == 200 and result["finish"] == "length"
    assert result["text"] == ref["text"][0]
    assert torchserve.worker_pid() == pid_before, "the worker restarted"
    wait_pool_whole(torchserve)
    assert wait_no_frontend_jobs(torchserve) == 0, "error answers left jobs in the frontend"


def test_unknown_route_and_describe(torchserve):
    r = post(torchserve, {"prompt": "x"}, path="v1/embeddings")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    d = torchserve.describe()
    for key in ("engine_config", "kv_stats", "handler_settings", "engine_thread_probe", "max_model_len"):
        assert key in d
    assert d["engine_config"]["block_size"] == 16
    for key in ("num_blocks", "free_blocks", "num_running", "num_waiting", "num_swapped", "prefix_hit_rate"):
        assert key in d["kv_stats"]


def test_metrics_endpoint_shows_engine_metrics(torchserve):
    for p in PROMPTS[:2]:  # some traffic, with a repeated prefix for the prefix cache
        assert post(torchserve, dict(GREEDY, prompt=p * 6)).status_code == 200
        assert post(torchserve, dict(GREEDY, prompt=p * 6)).status_code == 200
    wanted = ["PagedKVCacheUsagePercent", "PagedNumRequestsRunning", "PagedNumRequestsWaiting",
              "PagedNumRequestsSwapped", "PagedPrefixCacheHitRatePercent", "PagedPromptTokensTotal",
              "PagedGenerationTokensTotal", "PagedTimeToFirstTokenMs", "PagedTimePerOutputTokenMs",
              "PagedResidentKVBytes", "PagedPeakResidentKVBytes"]
    text = ""
    t0 = time.time()
    while time.time() - t0 < 30:
        text = requests.get(torchserve.metrics_url, timeout=10).text
        samples = {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
        if all(w in samples for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in samples]
    assert not missing, f"missing {missing}"
    gen = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
           if line.startswith("PagedGenerationTokensTotal{") and 'ModelName="llm"' in line]
    assert gen and gen[0] >= 4 * GREEDY["max_tokens"]
