"""AsyncLLMEngine against a fake engine: delivery, errors, aborts, admission, death, shutdown."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from paged.async_engine import AsyncLLMEngine
from paged.config import EngineConfig
import threading
import time

from paged.errors import EngineDeadError, EngineOverloadedError, RequestFailedError
from paged.sampling_params import SamplingParams
from ts_fake_engine import FAIL_REQUEST_TOKEN, KILL_ENGINE_TOKEN, FakeEngine


def make(max_pending_adds=None, on_dead=None, restart_budget=(0, 3600.0), **kw):
    holder = {}
    max_waiting = kw.pop("max_waiting_requests", 1024)

    def factory(cfg):
        holder["engine"] = FakeEngine(cfg, **kw)
        return holder["engine"]

    eng = AsyncLLMEngine(EngineConfig(model="fake", max_waiting_requests=max_waiting), engine_factory=factory,
                         warmup=False, idle_wait_s=0.05, max_pending_adds=max_pending_adds,
                         on_dead=on_dead, restart_budget=restart_budget).start(timeout=120)
    return eng, holder


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def block_engine_thread(eng) -> threading.Event:
    """Hold the engine thread inside a Call until the returned event is set."""
    release = threading.Event()
    entered = threading.Event()

    def hold(_engine):
        entered.set()
        release.wait(30)
    eng.call(hold)
    assert entered.wait(30)
    return release


async def collect(eng, rid, prompt, **params):
    outs = []
    async for out in eng.generate(rid, prompt, SamplingParams(temperature=0.0, **params)):
        outs.append(out)
    return outs


def test_many_concurrent_requests_complete():
    eng, holder = make()
    try:
        async def main():
            return await asyncio.gather(*[collect(eng, f"r{i}", [i + 1, 2, 3], max_tokens=5 + i % 7)
                                          for i in range(40)])
        results = asyncio.run(main())
        for i, outs in enumerate(results):
            last = outs[-1]
            assert last.finished and last.outputs[0].finish_reason == "length"
            assert len(last.outputs[0].token_ids) == 5 + i % 7
            # cumulative snapshots only grow by appending
            texts = [o.outputs[0].text for o in outs]
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert eng.num_inflight() == 0
        assert not holder["engine"].reqs
    finally:
        eng.shutdown()


def test_add_errors_surface_and_others_continue():
    eng, _ = make(max_waiting_requests=1000)
    try:
        async def main():
            good = asyncio.create_task(collect(eng, "good", [1, 2], max_tokens=20))
            with pytest.raises(ValueError, match="vocabulary"):
                await collect(eng, "bad", [1, 999], max_tokens=2)
            with pytest.raises(ValueError, match="max_model_len"):
                await collect(eng, "long", [1] * 60, max_tokens=20)
            return await good
        outs = asyncio.run(main())
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 20
    finally:
        eng.shutdown()


def test_overload_surfaces():
    eng, _ = make(max_waiting_requests=2, step_sleep_s=0.01)
    try:
        async def main():
            tasks = [asyncio.create_task(collect(eng, f"r{i}", [1], max_tokens=30)) for i in range(5)]
            res = await asyncio.gather(*tasks, return_exceptions=True)
            return res
        res = asyncio.run(main())
        assert sum(isinstance(r, EngineOverloadedError) for r in res) == 3
        assert sum(isinstance(r, list) for r in res) == 2
    finally:
        eng.shutdown()


def test_consumer_leaving_early_aborts():
    eng, holder = make(step_sleep_s=0.005)
    try:
        async def main():
            agen = eng.generate("early", [1, 2], SamplingParams(max_tokens=50, temperature=0.0))
            async for out in agen:
                if len(out.outputs[0].token_ids) >= 3:
                    break
            await agen.aclose()
            task = asyncio.create_task(collect(eng, "cancelled", [3], max_tokens=50))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)
        asyncio.run(main())
        assert set(holder["engine"].aborted) == {"early", "cancelled"}
        assert not holder["engine"].reqs and eng.num_inflight() == 0
    finally:
        eng.shutdown()


def test_step_exception_fails_everyone_no_hang():
    eng, _ = make(fail_after_steps=3)
    try:
        async def main():
            tasks = [asyncio.create_task(collect(eng, f"r{i}", [1], max_tokens=30)) for i in range(4)]
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        res = asyncio.run(main())
        assert all(isinstance(r, EngineDeadError) for r in res), res
        assert eng.dead_error is not None

        async def after():
            await collect(eng, "late", [1], max_tokens=2)
        with pytest.raises(EngineDeadError):
            asyncio.run(after())
    finally:
        eng.shutdown()


def test_call_and_stats_run_on_engine_thread():
    import threading
    eng, _ = make()
    try:
        tid = eng.call(lambda e: threading.get_ident()).result(5)
        assert tid == eng.engine_thread_id != threading.get_ident()
        stats = asyncio.run(eng.kv_stats())
        assert stats["num_blocks"] == 10
    finally:
        eng.shutdown()


def test_shutdown_fails_inflight():
    eng, _ = make(step_sleep_s=0.01)

    async def main():
        task = asyncio.create_task(collect(eng, "x", [1], max_tokens=60))
        await asyncio.sleep(0.1)
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        return await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    res = asyncio.run(main())
    assert isinstance(res[0], EngineDeadError)


def test_load_error_raised_by_start():
    def factory(cfg):
        raise ValueError("no such checkpoint")
    with pytest.raises(ValueError, match="no such checkpoint"):
        AsyncLLMEngine(EngineConfig(model="x"), engine_factory=factory).start(timeout=10)


PROBE = textwrap.dedent("""
    import asyncio, sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
    import torch
    from paged.async_engine import AsyncLLMEngine
    from paged.thread_probe import gemm_probe
    from paged.config import EngineConfig
    from ts_fake_engine import FakeEngine
    if sys.argv[1] == "main_first":
        torch.randn(64, 64) @ torch.randn(64, 64)   # the asyncio thread touches torch first
    eng = AsyncLLMEngine(EngineConfig(model="fake"), engine_factory=lambda c: FakeEngine(c), warmup=False).start(30)
    best = min(eng.call(lambda e: gemm_probe()["gemm_8x512x1408_us"]).result(60) for _ in range(3))
    print(best)
    eng.shutdown()
""")


@pytest.mark.slow  # a timing measurement: meaningless on a loaded machine, run it on purpose
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the OpenMP effect needs >= 2 cores")
def test_engine_thread_is_fast_torch_thread():
    """docs/serving.md, "One torch thread": a GEMM on the engine thread is slow once another thread ran torch first.

    Measures both cases in fresh processes; our layout (nothing on the asyncio thread) must be
    clearly faster than the broken one.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = PROBE.format(root=root, here=os.path.dirname(os.path.abspath(__file__)))

    def run(mode):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return float(r.stdout.strip().splitlines()[-1])
    good = min(run("engine_only") for _ in range(2))
    bad = min(run("main_first") for _ in range(2))
    print(f"engine thread GEMM: {good:.1f} us (only torch thread) vs {bad:.1f} us (main ran torch first)")
    assert good < bad * 0.8, (good, bad)


def test_deadline_backstop_aborts():
    eng, holder = make(step_sleep_s=0.02)
    try:
        async def main():
            outs = []
            with pytest.raises(TimeoutError):
                async for out in eng.generate("slow", [1], SamplingParams(max_tokens=60, temperature=0.0),
                                              deadline_s=0.2):
                    outs.append(out)
            await asyncio.sleep(0.2)
            return outs
        outs = asyncio.run(main())
        assert outs and not outs[-1].finished
        assert holder["engine"].aborted == ["slow"] and eng.num_inflight() == 0
    finally:
        eng.shutdown()


def test_prompts_reach_the_engine_as_given_token_ids():
    eng, holder = make()
    try:
        asyncio.run(collect(eng, "ids", [5, 6, 7], max_tokens=2))
        assert holder["engine"].added == [("ids", [5, 6, 7])]
    finally:
        eng.shutdown()


def test_a_full_inbox_refuses_at_once_and_the_engine_sees_nothing_of_it():
    eng, holder = make(max_pending_adds=3)
    try:
        release = block_engine_thread(eng)

        async def main():
            tasks = [asyncio.create_task(collect(eng, f"r{i}", [1, 2], max_tokens=3)) for i in range(5)]
            await asyncio.sleep(0.2)
            refused = [t for t in tasks if t.done()]
            assert len(refused) == 2 and all(isinstance(t.exception(), EngineOverloadedError) for t in refused)
            assert eng.num_inflight() == 3
            release.set()
            return await asyncio.gather(*tasks, return_exceptions=True)
        res = asyncio.run(main())
        assert sum(isinstance(r, list) for r in res) == 3
        assert len(holder["engine"].added) == 3
    finally:
        eng.shutdown()


def test_a_request_that_leaves_while_still_in_the_inbox_never_reaches_the_engine():
    eng, holder = make()
    try:
        release = block_engine_thread(eng)

        async def main():
            task = asyncio.create_task(collect(eng, "gone", [1, 2], max_tokens=3))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            return await collect(eng, "next", [3], max_tokens=2)
        outs = asyncio.run(main())
        assert outs[-1].finished
        assert [rid for rid, _ in holder["engine"].added] == ["next"]
        assert eng.num_inflight() == 0
    finally:
        eng.shutdown()


def test_a_request_the_engine_fails_raises_for_that_request_only():
    eng, holder = make(step_sleep_s=0.005)
    try:
        async def main():
            good = asyncio.create_task(collect(eng, "good", [1, 2], max_tokens=10))
            with pytest.raises(RequestFailedError) as info:
                await collect(eng, "bad", [1, FAIL_REQUEST_TOKEN], max_tokens=10)
            assert info.value.status == 400
            return await good
        outs = asyncio.run(main())
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 10
        assert eng.is_running and eng.num_inflight() == 0
    finally:
        eng.shutdown()


def test_engine_death_calls_on_dead_once_and_keeps_the_first_cause():
    causes = []
    eng, _ = make(on_dead=causes.append, step_sleep_s=0.005)
    try:
        async def main():
            others = [asyncio.create_task(collect(eng, f"r{i}", [1], max_tokens=50)) for i in range(3)]
            await asyncio.sleep(0.05)
            killer = asyncio.create_task(collect(eng, "kill", [KILL_ENGINE_TOKEN], max_tokens=5))
            return await asyncio.wait_for(asyncio.gather(*others, killer, return_exceptions=True), 30)
        res = asyncio.run(main())
        assert all(isinstance(r, EngineDeadError) for r in res), res
        wait_for(lambda: causes)  # called on the engine thread once the requests are failed
        assert len(causes) == 1 and "cannot go on" in str(causes[0])
    finally:
        eng.shutdown()
    assert "cannot go on" in str(eng.dead_error), "shutdown must not overwrite the first cause"


def test_an_engine_that_cannot_go_on_is_rebuilt_in_process_within_the_budget():
    causes = []
    eng, holder = make(on_dead=causes.append, restart_budget=(1, 3600.0), step_sleep_s=0.005)
    try:
        first = holder["engine"]

        async def kill_and_serve():
            other = asyncio.create_task(collect(eng, "inflight", [1], max_tokens=50))
            await asyncio.sleep(0.05)
            with pytest.raises(EngineDeadError):
                await collect(eng, "kill", [KILL_ENGINE_TOKEN], max_tokens=5)
            with pytest.raises(EngineDeadError):
                await other
            return await collect(eng, "after", [3, 4], max_tokens=4)
        outs = asyncio.run(kill_and_serve())
        assert outs[-1].finished and holder["engine"] is not first
        assert eng.restarts == 1 and eng.is_running and not causes
        assert "cannot go on" in str(eng.first_error)

        async def kill_again():
            with pytest.raises(EngineDeadError):
                await collect(eng, "kill2", [KILL_ENGINE_TOKEN], max_tokens=5)
        asyncio.run(kill_again())
        wait_for(lambda: causes)  # the budget is spent: the loop stops for good
        assert len(causes) == 1 and eng.dead_error is eng.first_error and not eng.is_running
    finally:
        eng.shutdown()
