"""Helpers the tensor-parallel tests import: free ports, child environments, torchrun runs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def engine_config(model_dir, **overrides):
    """An EngineConfig for a 2-rank group with one torch thread per rank (tests share 2 cores)."""
    from paged.config import EngineConfig

    return EngineConfig(**{"model": str(model_dir), "tensor_parallel_size": 2, "dtype": "float32", **overrides})


def reference_runner(model_dir, num_blocks: int, num_cpu_blocks: int = 0, block_size: int = 16):
    """The unsharded model behind the engine's own ModelRunner (``execute_model_input``)."""
    from paged.config import EngineConfig
    from paged.model_runner import ModelRunner
    from paged.models.llama import ModelArgs

    config = EngineConfig(model=str(model_dir), block_size=block_size, dtype="float32")
    return ModelRunner(config, ModelArgs.from_checkpoint(model_dir), num_blocks, num_cpu_blocks)


def pids_alive(pids) -> list[int]:
    """The pids among ``pids`` that still run (zombies count as gone)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; the ones still running after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while (alive := pids_alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
