"""Engine faults as TorchServe clients see them, with the fake engine (tests/handler/ts_fake_engine.py)
behind the real adapter, registered next to the real model on the session server.

A request the engine fails alone gets its own error status. An engine that cannot go on fails the
requests in flight and is rebuilt inside the same worker; once its rebuild budget is spent, the
worker exits and TorchServe starts a fresh one.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from ts_client import build_fake_model, error_of, wait_engine_ready, wait_no_frontend_jobs
from ts_fake_engine import FAIL_REQUEST_TOKEN, KILL_ENGINE_TOKEN


def register(ts, name: str) -> str:
    r = requests.post(f"{ts.mgmt_url}/models", params={"url": name, "initial_workers": 1, "synchronous": "true"},
                      timeout=600)
    assert r.status_code == 200, r.text
    return f"{ts.base}/predictions/{name}"


@pytest.fixture(scope="module")
def fake(torchserve, ts_model_dir):
    build_fake_model(torchserve.store, "fake", ts_model_dir)
    yield register(torchserve, "fake")
    requests.delete(f"{torchserve.mgmt_url}/models/fake/1.0", timeout=300)


def stream_lines(url, body) -> tuple[int, list[dict]]:
    r = requests.post(url, json=dict(body, stream=True), stream=True, timeout=120)
    return r.status_code, [json.loads(line) for line in r.iter_lines() if line]


def kill_engine_under_load(url) -> None:
    """Three streams in flight, then a request that makes step() raise: all of them end with an
    engine_dead error, and no internal text reaches a client."""
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_lines, url, {"prompt": [5, i], "max_tokens": 50}) for i in range(3)]
        time.sleep(0.5)
        killer = requests.post(url, json={"prompt": [5, KILL_ENGINE_TOKEN], "max_tokens": 5}, timeout=60)
        results = [s.result() for s in streams]
    assert killer.status_code == 500 and error_of(killer)["type"] == "engine_dead"
    assert "Error(" not in killer.text, "internal text reached the client"
    for status, lines in results:
        assert status == 200 and lines[-1]["error"]["type"] == "engine_dead"


def test_a_request_the_engine_fails_is_answered_alone(torchserve, fake):
    pid = torchserve.worker_pid("fake")
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(stream_lines, fake, {"prompt": [5, 6], "max_tokens": 30})
        time.sleep(0.3)
        bad = requests.post(fake, json={"prompt": [5, FAIL_REQUEST_TOKEN], "max_tokens": 30}, timeout=60)
        status, lines = good.result()
    assert bad.status_code == 400 and "allowed" in error_of(bad)["message"]
    assert status == 200 and lines[-1]["choices"][0]["finish_reason"] == "length"
    streamed = requests.post(fake, json={"prompt": [5, FAIL_REQUEST_TOKEN], "max_tokens": 30, "stream": True},
                             timeout=60)
    events = [json.loads(line) for line in streamed.text.splitlines() if line]
    assert events[0]["choices"] and events[-1]["error"]["code"] == 400  # chunks, then the error as last line
    assert torchserve.worker_pid("fake") == pid


def test_an_engine_that_cannot_go_on_is_rebuilt_in_the_same_worker(torchserve, fake):
    pid = torchserve.worker_pid("fake")
    kill_engine_under_load(fake)
    r = requests.post(fake, json={"prompt": [5, 6], "max_tokens": 4}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    d = torchserve.describe("fake")
    assert d["engine_restarts"] == 1 and "cannot go on" in d["engine_error"] and d["engine_running"]
    assert torchserve.worker_pid("fake") == pid
    assert wait_no_frontend_jobs(torchserve) == 0


def test_beyond_its_rebuild_budget_the_worker_exits_and_a_fresh_one_serves(torchserve, ts_model_dir):
    build_fake_model(torchserve.store, "fake-exit", ts_model_dir, engine_restarts_per_hour=0)
    url = register(torchserve, "fake-exit")
    try:
        old_pid = torchserve.worker_pid("fake-exit")
        kill_engine_under_load(url)
        psutil.Process(old_pid).wait(60)  # exits instead of answering 500 for ever
        new_pid, deadline = None, time.time() + 300
        while new_pid is None and time.time() < deadline:
            workers = requests.get(f"{torchserve.mgmt_url}/models/fake-exit", timeout=30).json()[0]["workers"]
            pid = workers[0]["pid"] if workers else None
            if pid not in (None, -1, old_pid) and psutil.pid_exists(pid):
                new_pid = pid
            time.sleep(1)
        assert new_pid is not None, "TorchServe started no new worker"
        wait_engine_ready(torchserve, new_pid)
        r = requests.post(url, json={"prompt": [5, 6], "max_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text
        d = torchserve.describe("fake-exit")
        assert d.get("engine_error") is None and d["engine_restarts"] == 0  # (the frontend drops null fields)
    finally:
        requests.delete(f"{torchserve.mgmt_url}/models/fake-exit/1.0", timeout=300)
