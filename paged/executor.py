"""The executor: what runs one step's plan on the model and hands back its logits.

One contract, two implementations: ``ModelRunner`` (paged/model_runner.py: the model in this
process) and ``TensorParallelExecutor`` (paged/parallel/executor.py: torchrun-launched ranks,
each running a ``ModelRunner`` over its shards). ``make_executor`` is the only place that looks
at ``tensor_parallel_size``; the engine talks to the protocol alone.

Failure model: ``execute`` may raise anything for a step that failed (the engine fails that
step's requests and serves on), or ``ExecutorFailedError`` when the executor lost its KV cache
(``check_health`` raises the same between steps). Then the engine fails every request that held
KV, empties its block pool and calls ``restart()``, which brings up a fresh executor with empty
pools, where ``can_restart`` says it can be done from this process.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from paged.config import EngineConfig
    from paged.kv_sizing import KVCacheLayout, VirtualKVLayout
    from paged.models.llama import ModelArgs
    from paged.scheduler_output import SchedulerOutput
    from paged.step_timer import StepTimer
    from paged.virtual_kv import VirtualKVCache


class Executor(Protocol):
    can_restart: bool   # False: a failure ends the engine (e.g. a group spanning several nodes)

    def execute(self, plan: "SchedulerOutput") -> "torch.Tensor":
        """Apply the plan's block moves and run it: logits [sampling rows, vocab] on the CPU, in
        plan order, valid until the next call (their memory may be reused). fp32, or the model's
        dtype where its LM head computes in it: an fp32 copy of those values is exact, so a
        consumer that computes in fp32 converts (``Decoder`` does), and an argmax needs no copy."""

    def check_health(self) -> None:
        """Between steps: raise ExecutorFailedError if the executor failed since the last step."""

    def restart(self) -> None:
        """Replace a failed executor with a fresh one with empty KV pools (raises if it cannot)."""

    def shutdown(self) -> None:
        """Stop whatever the executor runs (processes, connections); idempotent."""

    def performance_info(self) -> dict:
        """The kernels and paths it chose at load and runs (describe, benchmarks)."""


def make_executor(config: "EngineConfig", args: "ModelArgs", layout: "KVCacheLayout | VirtualKVLayout",
                  timer: "StepTimer", kv_memory: "VirtualKVCache | None" = None) -> Executor:
    """The model in this process, or the tensor-parallel ranks behind the same contract.
    ``kv_memory``: KV memory the scheduler's KV manager owns (kv_memory virtual, in process only);
    None: the executor allocates its KV pools from the layout."""
    if config.tensor_parallel_size == 1:
        from paged.model_runner import ModelRunner

        if kv_memory is not None:
            return ModelRunner(config, args, 0, 0, timer, kv_memory=kv_memory)
        return ModelRunner(config, args, layout.num_blocks, layout.num_cpu_blocks, timer)
    from paged.parallel.executor import TensorParallelExecutor
    from paged.parallel.launch_spec import WorkerGroupSpec

    return TensorParallelExecutor(WorkerGroupSpec(config, layout.num_blocks, layout.num_cpu_blocks), timer)
