"""The worker group's failure modes: every one ends in a clear WorkerGroupError within seconds and
leaves no process behind; the engine's ranks die with it however it ends. (A rank killed under the
engine, and the restart after it: test_tp_engine_failures.py.)"""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from paged import LLM
from paged.errors import EngineDeadError
from paged.parallel.errors import WorkerGroupError
from paged.parallel.executor import TensorParallelExecutor
from paged.parallel.launch_spec import WorkerGroupSpec
from tp_helpers import engine_config, pids_alive, subprocess_env, wait_gone
from tp_plans import PlanBuilder

ENGINE_PROGRAM = Path(__file__).with_name("tp_engine_program.py")
NUM_BLOCKS, BLOCK_SIZE = 16, 16
# Bounds on "within seconds": generous for a loaded 2-core machine, far below any hang.
FAILURE_BOUND_S = 30.0
EXIT_BOUND_S = 20.0


def make_spec(model_dir, heartbeat_timeout_s: float = 5.0, **overrides) -> WorkerGroupSpec:
    config = engine_config(model_dir, block_size=BLOCK_SIZE, tensor_parallel_heartbeat_timeout_s=heartbeat_timeout_s)
    values = dict(num_blocks=NUM_BLOCKS, num_cpu_blocks=0, max_logits_rows=4, threads_per_rank=1)
    return WorkerGroupSpec(config, **{**values, **overrides})


def prefill_plan():
    builder = PlanBuilder(BLOCK_SIZE, NUM_BLOCKS)
    builder.add([1, 50, 60, 70])
    return builder.prefill_all()


def execute_bounded(executor, plan):
    """executor.execute(plan) on a helper thread; (result or exception), or a failure if it hangs."""
    outcome = {}

    def target():
        try:
            outcome["value"] = executor.execute_model_input(plan)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(FAILURE_BOUND_S)
    if thread.is_alive():
        pytest.fail(f"execute() still blocked after {FAILURE_BOUND_S} s")
    return outcome


def group_pids(executor) -> list[int]:
    return [executor.agent_pid] + [r["pid"] for r in executor.describe()]


@pytest.fixture
def group(tiny_llama_dir):
    executor = TensorParallelExecutor(make_spec(tiny_llama_dir))
    yield executor
    executor.shutdown()


def test_stopped_rank_is_detected_by_its_missing_heartbeats(tiny_llama_dir):
    executor = TensorParallelExecutor(make_spec(tiny_llama_dir, heartbeat_period_s=0.2, heartbeat_timeout_s=2.0))
    try:
        pids = group_pids(executor)
        os.kill(pids[1], signal.SIGSTOP)
        outcome = execute_bounded(executor, prefill_plan())
        assert isinstance(outcome.get("error"), WorkerGroupError)
        assert "no heartbeat" in str(outcome["error"]) and outcome["error"].rank == 0
        assert wait_gone(pids, EXIT_BOUND_S) == []
    finally:
        executor.shutdown()


def test_step_that_raises_on_the_ranks_reports_their_traceback(group):
    plan = prefill_plan()
    plan.slot_mapping = [NUM_BLOCKS * BLOCK_SIZE + 5] * len(plan.slot_mapping)  # past the end of the pool
    outcome = execute_bounded(group, plan)
    assert isinstance(outcome.get("error"), WorkerGroupError)
    assert "failed" in str(outcome["error"]) and "Traceback" in str(outcome["error"])


def test_rank_that_fails_to_load_fails_the_start_with_its_traceback(tmp_path, tiny_llama_dir):
    for name in os.listdir(tiny_llama_dir):
        if name != "model.safetensors":
            (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WorkerGroupError, match="failed"):
        TensorParallelExecutor(make_spec(tmp_path))


def test_closing_the_engine_leaves_no_process(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tensor_parallel_size=2, num_kv_blocks=16, dtype="float32") as llm:
        info = llm.engine.performance_info()["tensor_parallel"]
        pids = [info["agent_pid"]] + [r["pid"] for r in info["ranks"]]
        assert pids_alive(pids) == pids
    assert wait_gone(pids, EXIT_BOUND_S) == []
    with pytest.raises(EngineDeadError, match="closed"):
        llm.engine.step()


def test_sigkill_of_the_engine_takes_the_whole_group_down(tiny_llama_dir):
    engine = subprocess.Popen([sys.executable, str(ENGINE_PROGRAM), str(tiny_llama_dir)], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        line = engine.stdout.readline()
        assert line, f"the engine program exited with {engine.wait()}"
        started = json.loads(line)
        pids = [started["agent"], *started["ranks"]]
        engine.kill()
        engine.wait()
        assert wait_gone(pids, EXIT_BOUND_S) == []
    finally:
        if engine.poll() is None:
            engine.kill()
