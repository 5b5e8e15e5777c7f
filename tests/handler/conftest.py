"""A real TorchServe, started once per session on free loopback ports and always stopped.

The server gets its own TMPDIR (TorchServe keeps its pid file there, so `torchserve --stop` can
only ever stop this one), its own cwd/log dir, and after `--stop` every process it had spawned
that is still alive is killed by pid.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tools.ts_launcher import ROOT, TorchServe, build_model_folder, free_ports  # noqa: F401

from ts_client import TEST_HANDLER

def model_source_dir(request) -> Path:
    try:
        return Path(request.getfixturevalue("tiny_llama_dir"))
    except pytest.FixtureLookupError:
        pass
    d = ROOT / "model-store" / "tiny-llama"
    if (d / "config.json").exists() and (d / "model.safetensors").exists():
        return d
    out = Path(tempfile.gettempdir()) / f"paged-tiny-llama-{os.getuid()}"
    if not (out / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def ts_model_dir(request) -> Path:
    return model_source_dir(request)


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, ts_model_dir):
    if shutil.which("java") is None:
        pytest.skip("java is needed for TorchServe")
    work = tmp_path_factory.mktemp("torchserve")
    ts = TorchServe(work, free_ports(5))
    (work / "store").mkdir()
    build_model_folder(ts.store, "llm", ts_model_dir, TEST_HANDLER)
    try:
        ts.start("llm=llm")
        ts.wait_ready("llm")
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def offline_llm(ts_model_dir):
    """The in-process engine with the same settings, for reference outputs.

    One persistent subprocess (the model loads once) answering JSON lines, so that this pytest
    process never runs torch itself and the references cost no repeated loads.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _OFFLINE, str(ts_model_dir), json.dumps(TEST_HANDLER)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    cache: dict = {}

    def generate(prompts, **params):
        key = json.dumps([prompts, params], sort_keys=True)
        if key not in cache:
            proc.stdin.write(json.dumps({"prompts": prompts, "params": params}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, "offline reference process died"
            cache[key] = json.loads(line)
        return cache[key]
    try:
        yield generate
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


_OFFLINE = r"""
import json, sys
from paged import LLM, SamplingParams
h = json.loads(sys.argv[2])
for key in ("request_timeout", "max_request_bytes", "max_response_bytes"):
    h.pop(key, None)
llm = LLM(sys.argv[1], **h)
for line in sys.stdin:
    args = json.loads(line)
    outs = llm.generate(args["prompts"], SamplingParams(**args["params"]), use_tqdm=False)
    print(json.dumps([{"text": [c.text for c in o.outputs], "token_ids": [list(c.token_ids) for c in o.outputs],
                       "finish_reason": [c.finish_reason for c in o.outputs],
                       "prompt_token_ids": list(o.prompt_token_ids)} for o in outs]), flush=True)
"""

