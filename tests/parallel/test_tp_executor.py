"""A 2-rank group (torchrun, gloo) gives the unsharded model's logits, step after step.

One scenario per checkpoint drives the group and an unsharded reference with the same plans:
a chunked prefill, decodes, a swap-out and swap-in to other blocks, and a copy-on-write fork.
Checkpoints: tiny-llama (one KV head per rank), tiny-qwen2 (a single KV head replicated on both
ranks, q/k/v bias, tied embeddings), and a vocabulary of 16001 rows (padded to 16002).
"""
import pytest
import torch

from paged.parallel.executor import TensorParallelExecutor
from paged.parallel.launch_spec import WorkerGroupSpec
from tp_helpers import engine_config, reference_runner
from tp_plans import PlanBuilder

BLOCK_SIZE, NUM_BLOCKS, NUM_CPU_BLOCKS = 4, 64, 8
PROMPTS = [[1, 17, 230, 5, 88], [1] + list(range(300, 336)), [1, 9] * 9]
# fp32: the row-parallel sums add partial products in another order than one GEMM does
ATOL, RTOL = 2e-4, 1e-4


def run_scenario(executor, reference) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(group logits, reference logits) for every step; tokens follow the reference's argmax."""
    b = PlanBuilder(BLOCK_SIZE, NUM_BLOCKS)
    for prompt in PROMPTS:
        b.add(prompt)
    steps = []

    def run(plan):
        # a runner's logits are valid until its next call (it reuses their memory): keep copies
        pair = executor.execute_model_input(plan).clone(), reference.execute_model_input(plan).clone()
        steps.append(pair)
        b.append_sampled(pair[1].argmax(-1).tolist())

    run(b.step({0: 5, 1: 10, 2: 18}))           # prompt 1 is chunked
    run(b.step({1: 27, 0: 1, 2: 1}))
    run(b.step({0: 1, 1: 1, 2: 1}))
    swap_out = b.tables[2]
    plan = b.step({0: 1, 1: 1})                  # seq 2 is preempted by swapping
    plan.swap_out = [(block, cpu) for cpu, block in enumerate(swap_out)]
    run(plan)
    b.move(2, [b.take_block() for _ in swap_out])
    plan = b.step({2: 1, 0: 1})                  # ... and resumes in other device blocks
    plan.swap_in = [(cpu, block) for cpu, block in enumerate(b.tables[2])]
    run(plan)
    child, copy = b.fork(0)                      # a parallel sample: shares seq 0's KV ...
    b.tokens[child][-1] = 4242                   # ... but its next token differs
    plan = b.step({0: 1, child: 1})
    plan.copies = [copy]
    run(plan)
    return steps


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen2_dir", "tiny_odd_vocab_dir"])
def scenario(request):
    model_dir = str(request.getfixturevalue(request.param))
    spec = WorkerGroupSpec(engine_config(model_dir, block_size=BLOCK_SIZE), num_blocks=NUM_BLOCKS,
                           num_cpu_blocks=NUM_CPU_BLOCKS, max_logits_rows=8, threads_per_rank=1)
    executor = TensorParallelExecutor(spec)
    try:
        reference = reference_runner(model_dir, NUM_BLOCKS, NUM_CPU_BLOCKS, BLOCK_SIZE)
        yield executor, run_scenario(executor, reference)
    finally:
        executor.shutdown()


def test_logits_equal_the_unsharded_model_at_every_step(scenario):
    _, steps = scenario
    for index, (got, want) in enumerate(steps):
        assert got.shape == want.shape and got.dtype == torch.float32, f"step {index}"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {index}: {m}")


def test_greedy_tokens_equal_the_unsharded_model_unless_tied(scenario):
    _, steps = scenario
    for got, want in steps:
        top2 = want.topk(2, dim=-1).values
        tied = (top2[:, 0] - top2[:, 1]) < 1e-4
        assert torch.equal(got.argmax(-1)[~tied], want.argmax(-1)[~tied])


def test_each_rank_reports_its_kv_heads_and_shared_memory_logits(scenario):
    executor, _ = scenario
    ranks = executor.describe()
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["logits_via"] == "shared memory" and r["kv_heads"] >= 1 for r in ranks)
    assert len({r["pid"] for r in ranks}) == 2


def test_step_with_more_logits_rows_than_the_shared_buffer_uses_the_channel(scenario):
    executor, _ = scenario
    model_dir = executor.spec.model
    builder = PlanBuilder(BLOCK_SIZE, NUM_BLOCKS)
    for i in range(executor.spec.max_logits_rows + 2):
        builder.add([1, 40 + i, 7, 9 + i])
    plan = builder.prefill_all()
    reference = reference_runner(model_dir, NUM_BLOCKS, NUM_CPU_BLOCKS, BLOCK_SIZE)
    torch.testing.assert_close(executor.execute_model_input(plan), reference.execute_model_input(plan),
                               atol=ATOL, rtol=RTOL)
