"""Management API against the test server: register (synchronous), scale, unregister, no leftovers.

The second model is small on purpose (1 running sequence, 1 waiting slot, 1 s deadline), so the
same test also covers admission control (503) and the per-request deadline. Finishing the
900-token request inside the deadline would take ~110 GB/s of memory bandwidth (batch-1 decode of
the test model in fp32 streams ~123 MB of weights per token), far beyond what the 2-core hosts we
test on read (30-57 GB/s); a 3 s deadline was once beaten, at ~300 tokens/s.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from paged_tools.ts_launcher import _alive, build_model_folder

SMALL = {"block_size": 16, "num_kv_blocks": 64, "max_num_seqs": 1, "max_num_batched_tokens": 512,
         "max_waiting_requests": 1, "request_timeout": 1, "enable_prefix_caching": False, "dtype": "float32"}


def _workers(ts, name):
    r = requests.get(f"{ts.mgmt_url}/models/{name}", timeout=30)
    return r.json()[0]["workers"] if r.status_code == 200 else None


def _scale_to_zero(ts, name):
    """PUT min_worker=max_worker=0. TorchServe 0.12's frontend, in asyncCommunication mode, can
    answer it with a 500 (a NullPointerException in its AsyncBatchAggregator: "job" is null); seen
    once so far, in a full-suite run, right after a describe call. The worker took no part in it
    (the exception is thrown before anything is sent to it), so the call is made again, once."""
    url, params = f"{ts.mgmt_url}/models/{name}", {"min_worker": 0, "max_worker": 0, "synchronous": "true"}
    r = requests.put(url, params=params, timeout=300)
    if r.status_code == 500 and "NullPointerException" in r.text:
        time.sleep(1)
        r = requests.put(url, params=params, timeout=300)
    return r


def test_register_scale_unregister(torchserve, ts_model_dir):
    ts = torchserve
    build_model_folder(ts.store, "llm2", ts_model_dir, SMALL)
    before = set(ts.descendants())
    r = requests.post(f"{ts.mgmt_url}/models", params={"url": "llm2", "initial_workers": 1, "synchronous": "true"},
                      timeout=900)
    assert r.status_code == 200, r.text
    workers = _workers(ts, "llm2")
    assert len(workers) == 1 and workers[0]["status"] == "READY"
    pid = workers[0]["pid"]
    assert psutil.pid_exists(pid)

    # admission control (max_num_seqs 1, max_waiting_requests 1): while one request runs, a burst
    # finds at most one waiting place; the rest get 503 with a JSON error
    url = f"{ts.base}/predictions/llm2"

    def call(i, max_tokens=30):
        return requests.post(url, json={"prompt": [5, 6, 7, i + 10], "max_tokens": max_tokens, "temperature": 0,
                                        "ignore_eos": True}, timeout=300)
    with ThreadPoolExecutor(6) as pool:
        running = pool.submit(call, 0, 900)  # ends by its 1 s deadline
        for _ in range(600):
            if ts.describe("llm2")["kv_stats"]["num_running"] == 1:
                break
            time.sleep(0.05)
        burst = list(pool.map(call, range(1, 6)))
        assert running.result().status_code == 200
    codes = sorted(a.status_code for a in burst)
    assert 503 in codes and 1 <= codes.count(200) <= 2, codes
    assert all(a.json()["error"]["type"] == "overloaded" for a in burst if a.status_code == 503)

    # the per-request deadline ends a long request and frees its blocks
    r = requests.post(url, json={"prompt": [5, 6, 7], "max_tokens": 900, "temperature": 0, "ignore_eos": True},
                      timeout=300)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "timeout", r.text
    d = ts.describe("llm2")
    assert d["kv_stats"]["free_blocks"] == d["kv_stats"]["num_blocks"]

    # scale down to zero (the worker process goes away), then back up
    r = _scale_to_zero(ts, "llm2")
    assert r.status_code == 200, r.text
    _wait_gone([pid])
    r = requests.put(f"{ts.mgmt_url}/models/llm2", params={"min_worker": 1, "max_worker": 1, "synchronous": "true"},
                     timeout=900)
    assert r.status_code == 200, r.text
    workers = _workers(ts, "llm2")
    assert workers and workers[0]["status"] == "READY"
    pid2 = workers[0]["pid"]
    # every earlier answer (the 503s included) ended its frontend job, so nothing is replayed
    # to the new worker and it serves at once
    ok = requests.post(url, json={"prompt": "x", "max_tokens": 3, "temperature": 0}, timeout=300)
    assert ok.status_code == 200, (ok.status_code, ok.text, _workers(ts, "llm2"))

    r = requests.delete(f"{ts.mgmt_url}/models/llm2/1.0", timeout=300)
    assert r.status_code == 200, r.text
    assert _workers(ts, "llm2") is None
    _wait_gone([pid2])
    leftover = set(ts.descendants()) - before
    assert not [p for p in leftover if _alive(p)]
    # the main model is unaffected
    assert _workers(ts, "llm")[0]["status"] == "READY"


def _wait_gone(pids, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes still alive: {alive}")
