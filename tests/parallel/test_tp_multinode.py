"""Two "nodes" of one rank each, joined by torchrun's c10d rendezvous on loopback: the engine
starts node 0, this test starts node 1 with the command the spec prints for other nodes."""
import os
import subprocess
import uuid

import torch

from paged.parallel.executor import TensorParallelExecutor, WorkerGroupSpec
from tp_helpers import free_port, reference_runner, subprocess_env, wait_gone
from tp_plans import PlanBuilder

NUM_BLOCKS, BLOCK_SIZE = 16, 16


def test_two_node_rendezvous_on_loopback_gives_the_unsharded_logits(tiny_llama_dir):
    spec = WorkerGroupSpec(model=str(tiny_llama_dir), world_size=2, num_blocks=NUM_BLOCKS, num_cpu_blocks=0,
                           block_size=BLOCK_SIZE, max_logits_rows=4, threads_per_rank=1, nnodes=2,
                           rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id=f"tp-test-{uuid.uuid4().hex[:8]}",
                           engine_address=f"tcp:127.0.0.1:{free_port()}", authkey=os.urandom(32),
                           logits_via_shared_memory=False)  # as on a real second host: logits over TCP
    env, argv = spec.remote_node_command()
    other_node = subprocess.Popen(argv, env={**subprocess_env(), **env})
    executor = None
    try:
        executor = TensorParallelExecutor(spec)
        ranks = executor.describe()
        assert [r["logits_via"] for r in ranks] == ["channel", "channel"]
        reference = reference_runner(tiny_llama_dir, NUM_BLOCKS, 0, BLOCK_SIZE)
        builder = PlanBuilder(BLOCK_SIZE, NUM_BLOCKS)
        builder.add([1, 300, 301, 302, 7])
        builder.add([1, 5] * 10)
        plan = builder.prefill_all()
        for _ in range(3):
            got, want = executor.execute(plan), reference.execute(plan)
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
            builder.append_sampled(want.argmax(-1).tolist())
            plan = builder.step({0: 1, 1: 1})
        pids = [r["pid"] for r in ranks]
        executor.shutdown()
        assert other_node.wait(timeout=60) == 0
        assert wait_gone(pids, 20) == []
    finally:
        if executor is not None:
            executor.shutdown()
        if other_node.poll() is None:
            other_node.kill()
