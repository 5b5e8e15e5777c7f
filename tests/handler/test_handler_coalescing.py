"""Through a real TorchServe: the chunks of concurrent streams travel coalesced (one backend
message per engine step, handler/paged_handler/backend_writer.py), and each client still gets exactly
its own tokens, complete and in order."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from ts_client import post, stream_native, wait_no_frontend_jobs, wait_pool_whole


def _stream_sse_completion(ts, prompt: str, max_tokens: int) -> dict:
    r = post(ts, {"model": "llm", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                  "ignore_eos": True}, path="v1/completions", stream=True)
    assert r.status_code == 200, r.text
    events = [e for e in r.content.decode("utf-8").split("\n\n") if e.strip()]  # SSE is UTF-8 (requests would guess Latin-1)
    assert events[-1] == "data: [DONE]", events[-3:]
    text, finish = "", None
    for event in events[:-1]:
        obj = json.loads(event[len("data: "):])
        assert "error" not in obj, obj
        for c in obj["choices"]:
            text += c["text"]
            finish = c["finish_reason"] or finish
    return {"text": text, "finish": finish}


def test_concurrent_streams_each_get_exactly_their_own_tokens_in_order(torchserve, offline_llm):
    # different lengths, so streams end in different steps while others go on; two routes
    prompts = [f"def handler_{i}(request):\n    " + "x = 1\n    " * (i % 3) for i in range(12)]
    lengths = [8 + 5 * (i % 4) for i in range(12)]
    refs: list = [None] * len(prompts)
    for n in sorted(set(lengths)):  # one offline batch per length
        idx = [i for i, m in enumerate(lengths) if m == n]
        for i, ref in zip(idx, offline_llm([prompts[i] for i in idx], max_tokens=n, temperature=0.0, ignore_eos=True)):
            refs[i] = ref
    before = torchserve.describe()["worker"]["backend"]

    def run(i: int) -> dict:
        if i % 3 == 2:
            return _stream_sse_completion(torchserve, prompts[i], lengths[i])
        return stream_native(torchserve, {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0.0,
                                          "ignore_eos": True})

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(run, range(len(prompts))))
    after = torchserve.describe()["worker"]["backend"]

    for i, (got, ref) in enumerate(zip(results, refs)):
        if i % 3 == 2:
            assert got["text"] == ref["text"][0] and got["finish"] == "length", i
        else:
            assert got["ids"][0] == ref["token_ids"][0] and got["text"][0] == ref["text"][0], i
            assert got["finish"] == {0: "length"} and got["usage"]["completion_tokens"] == lengths[i], i
    # streams that advanced in the same step shared backend messages
    predictions = after["stream_predictions"] - before["stream_predictions"]
    messages = after["stream_messages"] - before["stream_messages"]
    assert predictions >= sum(lengths) // 2 and messages < predictions
    wait_pool_whole(torchserve)
    assert wait_no_frontend_jobs(torchserve) == 0
