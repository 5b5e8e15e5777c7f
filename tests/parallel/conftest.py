"""Fixtures for the tensor-parallel tests: an odd-vocabulary checkpoint and a torchrun helper."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ODD_VOCAB_SIZE = 16001  # the tokenizer's 16000 tokens plus one row no text maps to


@pytest.fixture(scope="session")
def tiny_odd_vocab_dir(tmp_path_factory, make_model, tiny_llama_dir) -> Path:
    """The tiny-llama3 shapes (8 heads, 4 KV heads, 2 layers, llama3 RoPE) with a vocabulary of
    16001 rows, which 2 ranks cannot split evenly. The extra LM head row is zero, so its logit (0)
    never wins a greedy step and every generated id stays inside the tokenizer."""
    import torch

    out = tmp_path_factory.mktemp("tiny-odd-vocab")
    config = make_model.model_config("tiny-llama3")
    config["vocab_size"] = ODD_VOCAB_SIZE
    model = make_model._build_model(config, "tiny-llama3")
    with torch.no_grad():
        model.get_output_embeddings().weight[ODD_VOCAB_SIZE - 1].zero_()
    make_model._save_weights(model, out / "model.safetensors", tied=False)
    for name in make_model.TOKENIZER_FILES:
        shutil.copyfile(tiny_llama_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": make_model.BOS_ID, "eos_token_id": make_model.EOS_ID, "pad_token_id": make_model.PAD_ID}))
    (out / "config.json").write_text(json.dumps(config))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """The environment for child Pythons: this worktree's packages first, one thread each."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local gloo ranks; fails the test with the output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"torchrun {script.name} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done
