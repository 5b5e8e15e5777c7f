"""Client helpers for the tests that talk to the session TorchServe (see conftest.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from paged_tools.ts_launcher import build_model_folder

# engine settings for the test server: a small pool so preemption and the pool limit are reachable
TEST_HANDLER = {
    "block_size": 16,
    "num_kv_blocks": 96,          # 1536 token slots < max_model_len 2048
    "max_num_seqs": 32,
    "max_num_batched_tokens": 1024,
    "enable_prefix_caching": True,
    "dtype": "float32",
    "preemption_mode": "recompute",
    "max_waiting_requests": 64,
    "request_timeout": 120,
    "max_request_bytes": 1 << 20,
    "max_response_bytes": 16 << 20,  # the launcher's max_response_size
}


HERE = Path(__file__).resolve().parent


def build_fake_model(store: Path, name: str, ts_model_dir: Path, **handler) -> Path:
    """A model folder serving the fake engine (tests/handler/ts_fake_engine.py) through the real
    adapter: it loads in seconds, and prompt token ids switch on engine faults."""
    return build_model_folder(store, name, ts_model_dir, dict(TEST_HANDLER, request_timeout=60, **handler),
                              handler_file=HERE / "ts_fake_entry.py", extra_files=[HERE / "ts_fake_engine.py"])


def wait_engine_ready(ts, pid: int, timeout: float = 300) -> None:
    """Wait for the worker ``pid`` to log that its engine is ready.

    After an automatic worker restart the management API's status is no load signal, and a
    request sent before the new worker has loaded makes TorchServe 0.12 fail that restart
    (docs/serving.md), so tests wait for the worker's own log line.
    """
    t0 = time.time()
    log = ts.logs / "model_log.log"
    while time.time() - t0 < timeout:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        if any("paged engine ready" in line and f"(pid {pid}," in line for line in lines):
            return
        time.sleep(1)
    raise TimeoutError(f"worker {pid} did not load its engine within {timeout} s")


def post(ts, body, path="", stream=False, timeout=300, headers=None, **kw):
    """POST to the llm model (native route, or an OpenAI path such as v1/completions)."""
    url = f"{ts.base}/predictions/llm" + (f"/1.0/{path}" if path else "")
    headers = dict(headers or {})
    if isinstance(body, (bytes, str)):
        headers.setdefault("Content-Type", "application/json")
        return requests.post(url, data=body, headers=headers, stream=stream, timeout=timeout, **kw)
    return requests.post(url, json=body, headers=headers, stream=stream, timeout=timeout, **kw)


def wait_pool_whole(ts, model="llm", timeout=20):
    """describe, once no request is in flight and every KV block is free again."""
    d = None
    t0 = time.time()
    while time.time() - t0 < timeout:
        d = ts.describe(model)
        kv = d["kv_stats"]
        if d["inflight_requests"] == 0 and kv["free_blocks"] == kv["num_blocks"] and kv.get("num_running", 0) == 0 \
                and kv.get("num_waiting", 0) == 0:
            return d
        time.sleep(0.5)
    raise AssertionError(f"KV pool not whole again: {d}")


def wait_no_frontend_jobs(ts, timeout=20) -> int:
    """The frontend's count of request jobs, once it reaches 0 (or the last count after timeout)."""
    t0 = time.time()
    jobs = ts.frontend_jobs()
    while jobs and time.time() - t0 < timeout:
        time.sleep(1)
        jobs = ts.frontend_jobs()
    return jobs


def stream_native(ts, body) -> dict:
    """Read an NDJSON stream; returns the joined text / ids per choice, finish reasons, usage."""
    r = post(ts, dict(body, stream=True), stream=True)
    assert r.status_code == 200, r.text
    assert r.headers.get("content-type", "").startswith("application/x-ndjson")
    text, ids, finish, usage, n_chunks = {}, {}, {}, None, 0
    for line in r.iter_lines():
        if not line:
            continue
        obj = json.loads(line)
        assert "error" not in obj, obj
        n_chunks += 1
        for c in obj["choices"]:
            text[c["index"]] = text.get(c["index"], "") + c["text"]
            ids.setdefault(c["index"], []).extend(c["token_ids"])
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
        usage = obj.get("usage") or usage
    return {"text": text, "ids": ids, "finish": finish, "usage": usage, "chunks": n_chunks}


def error_of(response) -> dict:
    """The error object of a JSON error answer (fails the test on anything else)."""
    err = response.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and "param" in err
    return err
