"""A real TorchServe, started once per session on free loopback ports and always stopped.

The server gets its own TMPDIR and TEMP, cwd and log dir (paged_tools/ts_launcher.py), and after `--stop`
every process it had spawned that is still alive is killed by pid. Client helpers and the test
server's engine settings live in ts_client.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from paged_tools.offline_reference import OfflineReference
from paged_tools.ts_launcher import ROOT, serving
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
    with serving(tmp_path_factory.mktemp("torchserve"), "llm", ts_model_dir, TEST_HANDLER) as ts:
        yield ts


@pytest.fixture(scope="session")
def offline_llm(ts_model_dir):
    """The offline engine with the test server's settings: ``offline_llm(prompts, **params)``."""
    engine_settings = {k: v for k, v in TEST_HANDLER.items()
                       if k not in ("request_timeout", "max_request_bytes", "max_response_bytes")}
    reference = OfflineReference(ts_model_dir, engine_settings)
    try:
        yield reference.generate
    finally:
        reference.close()
