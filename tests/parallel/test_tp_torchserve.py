"""Tensor parallel through a real TorchServe: the handler in asyncCommunication mode with
``tensor_parallel_size: 2`` in the handler section of model-config.yaml (no other setting; the
engine starts its own ranks). Answers, streamed or not, equal the offline engine's; describe lists
the ranks; after SIGKILL of the worker and after unregister no process of ours is left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import psutil
import pytest
import requests

# The one import of the test launcher (it may move; fix the path here).
from paged_tools.ts_launcher import build_model_folder, serving
from paged import LLM, SamplingParams
from tp_helpers import pids_alive, wait_gone
from tp_reference import HFReference, compare_greedy

SETTINGS = {"block_size": 16, "num_kv_blocks": 128, "max_num_seqs": 16, "max_num_batched_tokens": 512,
            "enable_prefix_caching": True, "dtype": "float32", "seed": 0}
HANDLER = dict(SETTINGS, tensor_parallel_size=2, request_timeout=120)
GREEDY = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Foo(object):\n    def __init__(self"]
EXIT_BOUND_S = 30.0
LOAD_BOUND_S = 600.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    if shutil.which("java") is None:
        pytest.skip("java is needed for TorchServe")
    with serving(tmp_path_factory.mktemp("torchserve-tp"), "llmtp", tiny_llama_dir, HANDLER) as ts:
        yield ts


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    """The single-device engine's answers to PROMPTS (text and tokens), and HF for ties."""
    outputs = LLM(str(tiny_llama_dir), **SETTINGS).generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    return [out.outputs[0] for out in outputs], HFReference(tiny_llama_dir)


def predict(ts, model: str, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(f"{ts.base}/predictions/{model}", json=dict(body, stream=stream), stream=stream, timeout=300)


def read_stream(response: requests.Response) -> tuple[str, list[int], int]:
    """(text, token ids, number of chunks) of a native NDJSON stream."""
    text, ids, chunks = "", [], 0
    for line in response.iter_lines():
        if line:
            choice = json.loads(line)["choices"][0]
            text, ids, chunks = text + choice["text"], ids + choice["token_ids"], chunks + 1
    return text, ids, chunks


def engines_ready(ts) -> int:
    """How many engines of this server logged that they are ready (workers' log)."""
    log = ts.logs / "model_log.log"
    return log.read_text(errors="replace").count("paged engine ready") if log.exists() else 0


def worker_group_pids(ts, model: str, engines_before: int = 0) -> tuple[int, list[int]]:
    """The worker's pid and its descendants (torchrun agent and ranks) once its engine is ready.

    After an automatic restart TorchServe 0.12 does not report an async-mode worker READY again,
    so readiness is read from the workers' log (more than ``engines_before`` ready lines)."""
    deadline = time.monotonic() + LOAD_BOUND_S
    while time.monotonic() < deadline:
        r = requests.get(f"{ts.mgmt_url}/models/{model}", timeout=30)
        workers = r.json()[0]["workers"] if r.status_code == 200 else []
        if workers and engines_ready(ts) > engines_before:
            pid = workers[0]["pid"]
            try:
                children = [p.pid for p in psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                children = []
            if len(children) >= 3:  # agent + 2 ranks
                return pid, children
        time.sleep(1)
    pytest.fail(f"no worker of {model} with a ready engine and its ranks within {LOAD_BOUND_S} s")


def test_answers_equal_the_offline_engine(server, offline):
    want, hf = offline
    got = []
    for prompt, expected in zip(PROMPTS, want):
        r = predict(server, "llmtp", dict(GREEDY, prompt=prompt))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        got.append(choice["token_ids"])
        if choice["token_ids"] == expected.token_ids:
            assert choice["text"] == expected.text
    compare_greedy(hf, PROMPTS, got, [w.token_ids for w in want])


def test_streamed_answers_equal_the_offline_engine(server, offline):
    want, hf = offline
    got = []
    for prompt, expected in zip(PROMPTS, want):
        r = predict(server, "llmtp", dict(GREEDY, prompt=prompt), stream=True)
        assert r.status_code == 200, r.text
        text, ids, chunks = read_stream(r)
        assert chunks >= 2
        got.append(ids)
        if ids == expected.token_ids:
            assert text == expected.text
    compare_greedy(hf, PROMPTS, got, [w.token_ids for w in want])


def test_describe_lists_the_ranks_and_their_pids(server):
    worker, children = worker_group_pids(server, "llmtp")
    group = server.describe("llmtp")["performance"]["tensor_parallel"]
    assert group["size"] == 2 and group["state"] == "running"
    assert {group["agent_pid"], *(r["pid"] for r in group["ranks"])} <= set(children)


def test_no_process_of_ours_outlives_sigkill_of_the_worker_or_unregister(server, tiny_llama_dir):
    """A model of its own (this test kills its worker and unregisters it)."""
    build_model_folder(server.store, "llmtp2", tiny_llama_dir, HANDLER)
    r = requests.post(f"{server.mgmt_url}/models", params={"url": "llmtp2", "initial_workers": 1,
                                                           "synchronous": "true"}, timeout=LOAD_BOUND_S)
    assert r.status_code == 200, r.text
    worker, group = worker_group_pids(server, "llmtp2")
    ready = engines_ready(server)
    os.kill(worker, signal.SIGKILL)  # what TorchServe itself does on unregister and scale-down
    assert wait_gone([worker, *group], EXIT_BOUND_S) == []

    new_worker, new_group = worker_group_pids(server, "llmtp2", ready)  # TorchServe starts a fresh worker
    assert new_worker != worker and pids_alive(new_group) == new_group
    r = requests.delete(f"{server.mgmt_url}/models/llmtp2/1.0", timeout=120)
    assert r.status_code == 200, r.text
    assert wait_gone([new_worker, *new_group], EXIT_BOUND_S) == []
