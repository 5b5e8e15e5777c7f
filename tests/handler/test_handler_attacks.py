"""Hostile requests against the real TorchServe (issue 8's table and the review's findings).

Each attack is followed by a normal greedy request that must get the offline engine's answer from
the same worker process: no attack may kill, restart or degrade the worker.
"""
from __future__ import annotations

import json

import pytest
import requests

from paged.sampling_params import MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from ts_client import error_of, post, wait_no_frontend_jobs, wait_pool_whole

REFERENCE = {"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
VOCAB = 16000


@pytest.fixture(scope="module")
def unharmed(torchserve, offline_llm):
    """Checks, after an attack, that the same worker still gives the reference answer."""
    expected = offline_llm([REFERENCE["prompt"]], max_tokens=16, temperature=0.0, ignore_eos=True)[0]["token_ids"][0]
    pid = torchserve.worker_pid()

    def check():
        r = post(torchserve, REFERENCE)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        assert torchserve.worker_pid() == pid, "the worker was restarted"
    return check


def refused(response, param, status=400) -> dict:
    assert response.status_code == status, response.text[:300]
    err = error_of(response)
    assert err["param"] == param, err
    return err


# ---- the table of issue 8 ----------------------------------------------------------------------
def test_a_repetition_penalty_that_overflows_logits_is_refused(torchserve, unharmed):
    refused(post(torchserve, {"prompt": "x", "repetition_penalty": 1e-300, "temperature": 1.0}), "repetition_penalty")
    unharmed()


def test_stop_token_ids_listing_the_whole_vocabulary_are_refused(torchserve, unharmed):
    body = {"prompt": "x", "stop_token_ids": list(range(VOCAB)), "min_tokens": 4, "max_tokens": 8}
    refused(post(torchserve, body), "stop_token_ids")
    # the most a request may list, with min_tokens, is served normally
    allowed = dict(body, stop_token_ids=list(range(3, 3 + MAX_STOP_TOKEN_IDS)), temperature=1.0, seed=1)
    r = post(torchserve, allowed)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) >= 4
    unharmed()


@pytest.mark.parametrize("body, path, param", [
    (b'{"prompt": "\\ud800"}', "", "prompt"),
    (b'{"prompt": "a\\udfffb", "stream": true}', "", "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud83d"]}', "", "stop"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "v1/chat/completions", "messages"),
], ids=["prompt", "streamed prompt", "stop", "chat message"])
def test_a_lone_surrogate_is_a_400_naming_the_field_without_internals(torchserve, unharmed, body, path, param):
    err = refused(post(torchserve, body, path=path), param)
    assert "Traceback" not in err["message"] and "Error(" not in err["message"]
    unharmed()


def test_many_samples_with_logprobs_are_bounded_before_any_work(torchserve, unharmed):
    refused(post(torchserve, {"prompt": "x", "n": 64, "logprobs": 20, "max_tokens": 480}), "n")
    # within the caps, an answer that could outgrow the frontend's response limit is refused up front
    err = refused(post(torchserve, {"prompt": "x", "n": MAX_N, "logprobs": 20, "max_tokens": 2000}), "max_tokens")
    assert "stream" in err["message"]
    unharmed()


def test_many_long_stop_strings_are_refused_and_the_most_allowed_are_served(torchserve, unharmed):
    refused(post(torchserve, {"prompt": "x", "stop": [f"s{i}" for i in range(50_000)], "n": 16}), "stop")
    refused(post(torchserve, {"prompt": "x", "stop": ["y" * (MAX_STOP_STRING_CHARS + 1)]}), "stop")
    most = [f"{i:03d}" + "z" * (MAX_STOP_STRING_CHARS - 3) for i in range(MAX_STOP_STRINGS)]
    r = post(torchserve, {"prompt": "def f(x):", "stop": most, "n": 4, "max_tokens": 24, "temperature": 1.0,
                          "seed": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    unharmed()


def test_a_describe_header_on_an_inference_request_gets_no_describe_data(torchserve, unharmed):
    for headers in ({"describe": "True"}, {"describe": "True", "url_path": ""}):
        r = post(torchserve, {"prompt": "x", "max_tokens": 2, "temperature": 0}, headers=headers)
        assert r.status_code == 200 and "engine_config" not in r.text and r.json()["object"] == "completion"
    # routes without url_path, and a request with no parameters at all (an empty form post)
    for url in (f"{torchserve.base}/llm/predict", f"{torchserve.base}/invocations?model_name=llm",
                f"{torchserve.base}/models/llm/invoke"):
        r = requests.post(url, data=b"", timeout=60, headers={
            "describe": "True", "Content-Type": "application/x-www-form-urlencoded"})
        assert "engine_config" not in r.text and "kv_stats" not in r.text, (url, r.status_code, r.text[:200])
    # the management API still describes
    assert "engine_config" in torchserve.describe()
    unharmed()


# ---- the review's findings ---------------------------------------------------------------------
@pytest.mark.parametrize("body, headers", [
    (b'{"prompt": "\xc3\x28"}', {}),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
    (json.dumps({"prompt": "x", "stop": [[[[[[[[[[[[[[[[["s"]]]]]]]]]]]]]]]]]}).encode(), {}),
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}),
    (b"prompt=x&max_tokens=4", {"Content-Type": "application/x-www-form-urlencoded"}),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", {}),
], ids=["invalid utf-8", "deep nesting", "nested stop", "text/plain", "form", "5000-digit number"])
def test_malformed_bodies_are_400_json(torchserve, unharmed, body, headers):
    r = post(torchserve, body, headers=headers)
    assert r.status_code == 400 and error_of(r)
    unharmed()


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 2, VOCAB]}, "prompt"),
    ({"prompt": "x", "stop_token_ids": [VOCAB + 5]}, "stop_token_ids"),
])
def test_token_ids_outside_the_vocabulary_name_their_field(torchserve, unharmed, body, param):
    refused(post(torchserve, body), param)
    unharmed()


def test_grpc_predictions_asked_to_stream_does_not_cost_the_worker(torchserve, unharmed, tmp_path_factory):
    grpc = pytest.importorskip("grpc")
    from paged_tools.grpc_stubs import load_stubs

    pb, pb_grpc = load_stubs(tmp_path_factory.mktemp("grpc_stubs"))
    with grpc.insecure_channel(f"127.0.0.1:{torchserve.grpc}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        req = pb.PredictionsRequest(model_name="llm", input={
            "data": json.dumps({"prompt": "x", "max_tokens": 8, "stream": True}).encode()})
        assert json.loads(stub.Predictions(req, timeout=60).prediction)["error"]["param"] == "stream"
    unharmed()


def test_openai_gaps(torchserve, unharmed):
    refused(post(torchserve, {"model": "gpt-4", "prompt": "x"}, path="v1/completions"), "model", status=404)
    refused(post(torchserve, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
                 path="v1/chat/completions"), "model", status=404)
    refused(post(torchserve, {"prompt": "x", "stream_options": {"include_usage": True}}, path="v1/completions"),
            "stream_options")
    unharmed()


def test_every_answer_ended_its_frontend_job(torchserve, unharmed):
    """Error answers end their job like successful ones: none is left in the frontend's map."""
    for body in ({"prompt": "x", "top_p": 9}, {"prompt": [VOCAB]}, b"{bad"):
        assert post(torchserve, body).status_code == 400
    assert post(torchserve, {"prompt": "x"}, path="v1/nothing").status_code == 404
    unharmed()
    torchserve.describe()
    wait_pool_whole(torchserve)
    assert wait_no_frontend_jobs(torchserve) == 0
