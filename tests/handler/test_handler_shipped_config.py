"""The shipped config.properties, tested as shipped: only its addresses, ports and model store are
replaced (free loopback ports, a private store). The model is the fake engine behind the real
adapter, so the server starts in seconds; what is tested here is the frontend's configuration.
"""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import requests
import yaml

from paged_tools.ts_launcher import ROOT, TorchServe, free_ports, parse_properties
from ts_client import build_fake_model, error_of

SHIPPED = parse_properties((ROOT / "config.properties").read_text())
MODEL_CONFIG = yaml.safe_load((ROOT / "model-config.yaml").read_text())


def start_shipped(workdir, ts_model_dir) -> TorchServe:
    ts = TorchServe(workdir, free_ports(5), properties=SHIPPED)
    ts.store.mkdir(parents=True)
    build_fake_model(ts.store, "llm", ts_model_dir)
    ts.start("llm=llm")
    ts.wait_ready("llm", timeout=300)
    return ts


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, ts_model_dir):
    ts = start_shipped(tmp_path_factory.mktemp("shipped"), ts_model_dir)
    try:
        yield ts
    finally:
        ts.stop()


def bearer(ts, kind: str) -> dict:
    return {"Authorization": f"Bearer {ts.keys()[kind]}"}


def refused_for_token(r) -> bool:
    """TorchServe 0.12 answers a missing or wrong key with 400 InvalidKeyException."""
    return r.status_code == 400 and r.json().get("type") == "InvalidKeyException"


def test_the_frontend_limits_match_the_handler_limits():
    handler = MODEL_CONFIG["handler"]
    assert int(SHIPPED["max_request_size"]) == handler["max_request_bytes"]
    assert int(SHIPPED["max_response_size"]) == handler["max_response_bytes"]


def test_inference_is_refused_without_the_key_and_served_with_it(shipped):
    url = f"{shipped.base}/predictions/llm"
    body = {"prompt": [5, 6], "max_tokens": 3}
    assert refused_for_token(requests.post(url, json=body, timeout=60))
    assert refused_for_token(requests.post(url, json=body, headers=bearer(shipped, "management"), timeout=60))
    r = requests.post(url, json=body, headers=bearer(shipped, "inference"), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_management_needs_its_key_and_model_registration_is_off(shipped):
    models = f"{shipped.mgmt_url}/models"
    assert refused_for_token(requests.get(f"{models}/llm", timeout=60))
    assert refused_for_token(requests.get(f"{models}/llm", headers=bearer(shipped, "inference"), timeout=60))
    assert "engine_config" in shipped.describe()  # describe works with the management key
    r = requests.post(models, params={"url": "llm", "initial_workers": 1}, headers=bearer(shipped, "management"),
                      timeout=60)
    assert r.status_code == 405
    r = requests.delete(f"{models}/llm/1.0", headers=bearer(shipped, "management"), timeout=60)
    assert r.status_code == 405


def test_a_body_above_the_limit_is_refused_by_the_frontend_and_costs_the_worker_nothing(shipped):
    url = f"{shipped.base}/predictions/llm"
    pid = shipped.worker_pid()
    limit = int(SHIPPED["max_request_size"])
    too_big = json.dumps({"prompt": "a" * limit}).encode()
    try:
        r = requests.post(url, data=too_big, timeout=60,
                          headers=dict(bearer(shipped, "inference"), **{"Content-Type": "application/json"}))
        assert r.status_code >= 400
    except requests.ConnectionError:
        pass  # the frontend resets the connection: it never buffers the body
    fits = json.dumps({"prompt": [5] * 100, "stop": ["x" * 200], "max_tokens": 2}).encode()
    r = requests.post(url, data=fits, headers=dict(bearer(shipped, "inference"), **{"Content-Type": "application/json"}),
                      timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"  # 100 ids + 2 > the fake's 64 tokens
    assert shipped.worker_pid() == pid


def test_the_worker_exits_when_the_frontend_is_killed(tmp_path, ts_model_dir):
    ts = start_shipped(tmp_path, ts_model_dir)
    try:
        worker = psutil.Process(ts.worker_pid())
        url = f"{ts.base}/predictions/llm"
        stream = requests.post(url, json={"prompt": [5, 6], "max_tokens": 60, "stream": True}, stream=True,
                               headers=bearer(ts, "inference"), timeout=60)
        assert stream.status_code == 200
        next(stream.iter_lines())  # a request is in flight: the engine thread is stepping
        os.kill(ts.java_pid, signal.SIGKILL)
        worker.wait(30)  # raises TimeoutExpired if the worker outlives its frontend
        assert not worker.is_running()
    finally:
        ts.stop()
