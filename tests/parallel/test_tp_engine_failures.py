"""A rank lost under the engine: every request that held KV fails with a clear error within
seconds, the pool is whole again, and a restarted group serves the waiting and the next requests.
A rank lost while the engine idles is replaced before the next request runs. A group that cannot
restart makes the engine give up (EngineDeadError) so its owner restarts it.
"""
import os
import select
import signal
import time

import pytest

from paged import LLMEngine, SamplingParams
from paged.errors import EngineDeadError, RequestFailedError
from tp_helpers import engine_config, wait_gone

PROMPT = "def fibonacci(n):"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
# Bounds on "within seconds": generous for a loaded 2-core machine, far below any hang.
FAILURE_BOUND_S = 30.0
MAX_STEPS = 200


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    # max_num_seqs=2: a third request waits (holding no KV) while two run.
    engine = LLMEngine(engine_config(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=2))
    yield engine
    engine.close()


def rank_pids(engine: LLMEngine) -> list[int]:
    return [r["pid"] for r in engine.performance_info()["tensor_parallel"]["ranks"]]


def run_until_finished(engine: LLMEngine, request_ids: set[str]) -> dict:
    outputs = {}
    for _ in range(MAX_STEPS):
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        if request_ids <= set(outputs):
            return outputs
    pytest.fail(f"requests {request_ids - set(outputs)} did not finish in {MAX_STEPS} steps")


def generate_alone(engine: LLMEngine, request_id: str) -> list[int]:
    engine.add_request(request_id, PROMPT, GREEDY)
    out = run_until_finished(engine, {request_id})[request_id]
    assert out.error is None, out.error
    return out.outputs[0].token_ids


def start_two_long_requests_and_lose_a_rank(engine: LLMEngine, tag: str) -> tuple[dict, float]:
    """Two long requests run, a third waits; rank 1 is killed. The outputs of the step that
    noticed, and the seconds from the kill until the running requests had their error."""
    engine.add_request(f"{tag}-a", PROMPT, LONG)
    engine.add_request(f"{tag}-b", "import os", LONG)
    engine.add_request(f"{tag}-waits", PROMPT, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.kv_stats()["num_running"] == 2 and engine.kv_stats()["num_waiting"] == 1
    killed = time.monotonic()
    os.kill(rank_pids(engine)[1], signal.SIGKILL)
    failed = {}
    while len(failed) < 2 and time.monotonic() - killed < FAILURE_BOUND_S:
        failed.update((o.request_id, o) for o in engine.step() if o.finished)
    return failed, time.monotonic() - killed


def test_lost_rank_fails_running_requests_clearly_and_a_new_group_serves_the_rest(engine):
    reference = generate_alone(engine, "reference")
    old_pids = rank_pids(engine)
    failed, seconds = start_two_long_requests_and_lose_a_rank(engine, "first")
    assert sorted(failed) == ["first-a", "first-b"], f"no error within {FAILURE_BOUND_S} s"
    print(f"running requests failed {seconds:.2f} s after the kill: {failed['first-a'].error}")
    for out in failed.values():
        assert isinstance(out.error, RequestFailedError)
        assert "tensor-parallel worker group failed" in str(out.error) and "KV cache was lost" in str(out.error)
        assert len(out.outputs[0].token_ids) < LONG.max_tokens
    bm = engine.scheduler.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks

    waited = run_until_finished(engine, {"first-waits"})["first-waits"]
    assert waited.error is None and waited.outputs[0].token_ids == reference
    assert generate_alone(engine, "after") == reference
    assert set(rank_pids(engine)).isdisjoint(old_pids)
    assert wait_gone(old_pids, 20) == []


def test_rank_lost_between_steps_is_replaced_before_the_next_request_runs(engine):
    reference = generate_alone(engine, "idle-reference")
    faults, pids = engine.num_step_faults, rank_pids(engine)
    os.kill(pids[0], signal.SIGKILL)
    assert wait_gone(pids[:1], 20) == []
    # A killed process shows as a zombie before its last thread has closed its sockets: wait
    # until the engine's end of the channel can see the loss (what "between steps" means).
    connections = [rank.conn.fileno() for rank in engine.executor.ranks]
    deadline = time.monotonic() + 20
    while not select.select(connections, [], [], 0.05)[0] and time.monotonic() < deadline:
        pass
    assert generate_alone(engine, "after-idle-loss") == reference  # served, not failed
    assert engine.num_step_faults == faults + 1 and set(rank_pids(engine)).isdisjoint(pids)


def test_group_that_cannot_restart_makes_the_engine_give_up(engine, monkeypatch):
    failed, _ = start_two_long_requests_and_lose_a_rank(engine, "second")
    assert len(failed) == 2

    def refuse():
        raise RuntimeError("no devices left")
    monkeypatch.setattr(engine.executor, "restart", refuse)
    with pytest.raises(EngineDeadError, match="could not be restarted.*no devices left"):
        engine.step()
    monkeypatch.undo()  # an offline caller may retry: the next step restarts the group
    waited = run_until_finished(engine, {"second-waits"})["second-waits"]
    assert waited.error is None and len(waited.outputs[0].token_ids) == GREEDY.max_tokens
