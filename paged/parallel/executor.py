"""The engine's side of tensor parallelism: the ``Executor`` (paged/executor.py) over N ranks.

``TensorParallelExecutor.execute(plan)`` returns fp32 logits ``[sampling rows, vocab]`` on the
CPU, as the in-process ``ModelRunner`` does. The engine builds each step's ``ModelInput`` once;
the executor pickles it once and writes it to every rank's connection; each rank runs it on its
own ``ModelRunner`` (its weight shards, its KV heads) and puts its vocabulary slice of the logits
into a shared buffer (ranks on other hosts send it over their connection); the executor returns
the assembled logits. No collective involves the engine process.

The processes and their liveness are ``paged/parallel/worker_group.py``'s; what they are started
with, ``paged/parallel/launch_spec.py``'s. When the group fails (``WorkerGroupError``, an
``ExecutorFailedError``) the KV cache on the ranks is gone: the engine fails the requests that
held KV, resets its block manager and calls ``restart()``, which starts a fresh group (the
weights load again). A group that spans several nodes cannot be restarted from here (the other
nodes' torchrun agents belong to their operators): ``can_restart`` is False, and the engine gives
up (``EngineDeadError``) so its supervisor (TorchServe) restarts it.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass

import torch

from paged.model_runner import ModelInput, build_model_input
from paged.models.llama import ModelArgs
from paged.parallel.errors import WorkerGroupError
from paged.parallel.launch_spec import WorkerGroupSpec
from paged.parallel.partition import ShardLayout, layout_for
from paged.parallel.protocol import Done, ShardLogits
from paged.parallel.worker_group import RankInfo, WorkerGroup
from paged.scheduler_output import SchedulerOutput
from paged.step_timer import StepTimer

__all__ = ["ExecutorStats", "TensorParallelExecutor", "WorkerGroupError"]


@dataclass
class ExecutorStats:
    """Where the steps' time went, summed over steps (for the benchmark)."""
    steps: int = 0
    total_s: float = 0.0       # engine: execute() from entry until every rank answered
    broadcast_s: float = 0.0   # engine: pickling the plan and writing it to every rank (part of total)
    gather_s: float = 0.0      # engine: copying the logits out of the buffer / off the sockets
    rank_step_s: float = 0.0   # ranks: the slowest rank's step (plan received to answer sent)
    collective_s: float = 0.0  # ranks: time in all-reduces, averaged over the ranks
    collective_calls: int = 0  # ranks: all-reduces per rank
    collective_bytes: int = 0  # ranks: bytes all-reduced per rank

    @property
    def channel_s(self) -> float:
        """Engine time no rank accounts for: pickling and writing the plan, its delivery and
        unpickling, wake-ups, and the answers' trip back."""
        return self.total_s - self.rank_step_s


class TensorParallelExecutor:
    """The ``Executor`` contract over a torchrun-launched group of ``spec.world_size`` ranks."""

    def __init__(self, spec: WorkerGroupSpec, timer: StepTimer | None = None):
        self.spec = spec
        self.timer = timer or StepTimer(enabled=False)
        args = ModelArgs.from_checkpoint(spec.model)
        # Validate the split here, before any process starts (ValueError names the numbers).
        self.layouts: list[ShardLayout] = [layout_for(args, spec.world_size, r) for r in range(spec.world_size)]
        self.vocab_size = args.vocab_size
        self.stats = ExecutorStats()
        self.group = WorkerGroup(spec, self.layouts[0].padded_vocab_size)
        self.group.start()

    # ---- the Executor contract --------------------------------------------------------------------
    @property
    def can_restart(self) -> bool:
        """A group over several nodes cannot be restarted from here (their agents are not ours)."""
        return self.spec.nnodes == 1

    def check_health(self) -> None:
        """Raise WorkerGroupError if a rank or the agent exited since the last step; the engine
        calls it before it schedules a step."""
        self.group.check()

    def restart(self) -> None:
        """Tear the group down (whatever state it is in) and start a fresh one with empty KV pools."""
        self.group.shutdown()
        if not self.can_restart:
            raise WorkerGroupError("a multi-node group cannot be restarted from the engine; restart the engine "
                                   "and the other nodes' torchrun")
        self.group.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every rank and the agent; idempotent."""
        self.group.shutdown(timeout)

    def performance_info(self) -> dict:
        """The ranks' fast paths (rank 0's: every rank runs the same code on the same shapes) and
        the group: its size, nodes, state, the torchrun agent's pid and every rank with its pid."""
        group = self.group
        info = dict(group.ranks[0].performance) if group.ranks else {}
        info["tensor_parallel"] = {
            "size": self.spec.world_size, "nnodes": self.spec.nnodes,
            "state": "running" if group.failure is None else f"down: {group.failure.summary}",
            "agent_pid": self.agent_pid if group.ranks else None, "ranks": self.describe()}
        return info

    # ---- the group, for describe and tests --------------------------------------------------------
    @property
    def ranks(self) -> list[RankInfo]:
        return self.group.ranks

    @property
    def agent_pid(self) -> int | None:
        return self.group.agent.pid if self.group.agent is not None else None

    def describe(self) -> list[dict]:
        """One entry per rank: where it runs and what it holds (for the describe API and logs)."""
        return [{"rank": r.rank, "local_rank": r.local_rank, "host": r.host, "pid": r.pid,
                 "kv_heads": r.num_kv_heads,
                 "logits_via": "shared memory" if r.logits_in_shared_memory else "channel",
                 "all_reduce": r.all_reduce,
                 "load_seconds": round(r.load_seconds, 3)} for r in self.group.ranks]

    # ---- the step ---------------------------------------------------------------------------------
    def execute(self, plan: SchedulerOutput) -> torch.Tensor:
        """Run the plan on every rank; fp32 logits [num sampling sequences, vocab] in plan order."""
        with self.timer.phase("prepare"):
            model_input = build_model_input(plan, self.spec.config.block_size)
        return self.execute_model_input(model_input)

    def execute_model_input(self, model_input: ModelInput) -> torch.Tensor:
        """Run one step on every rank; fp32 logits ``[len(model_input.logits_indices), vocab]`` (CPU)."""
        if self.group.failure is not None:
            raise self.group.failure
        with self.timer.phase("forward_other"):
            return self._execute(model_input)

    def _execute(self, model_input: ModelInput) -> torch.Tensor:
        group = self.group
        rows = len(model_input.logits_indices)
        started = time.perf_counter()
        group.broadcast(pickle.dumps(model_input, protocol=pickle.HIGHEST_PROTOCOL))
        sent = time.perf_counter()
        staging = group.staging
        if rows > staging.shape[0]:  # more rows than the shared buffer holds: every rank uses the channel
            staging = torch.empty(rows, staging.shape[1])
        gather_s = 0.0
        timings = []

        def on_answer(info: RankInfo, message: object) -> bool:
            nonlocal gather_s
            if isinstance(message, (Done, ShardLogits)):
                timings.append(message.timing)
            if isinstance(message, Done):
                return True
            if isinstance(message, ShardLogits):
                t = time.perf_counter()
                data = info.conn.recv_bytes()
                if message.rows:  # a step without sampling rows still sends its (empty) frame
                    shard = torch.frombuffer(data, dtype=torch.float32).view(message.rows, message.cols)
                    start = self.layouts[info.rank].vocab_start
                    staging[:message.rows, start:start + message.cols].copy_(shard)
                gather_s += time.perf_counter() - t
                return True
            raise WorkerGroupError(f"rank {info.rank} answered a step with {message!r}", info.rank)

        group.collect(on_answer, deadline=None, use_heartbeats=True)
        answered = time.perf_counter()
        logits = staging[:rows, :self.vocab_size]  # the Executor contract: valid until the next step
        done = time.perf_counter()
        stats = self.stats
        stats.steps += 1
        stats.total_s += answered - started - gather_s
        stats.broadcast_s += sent - started
        stats.gather_s += gather_s + done - answered
        stats.rank_step_s += max(t.step_s for t in timings)
        stats.collective_s += sum(t.collective_s for t in timings) / len(timings)
        stats.collective_calls += timings[0].collective_calls
        stats.collective_bytes += timings[0].collective_bytes
        return logits

    def __del__(self):
        # Normally the engine calls shutdown(); this covers an engine dropped without it.
        group = getattr(self, "group", None)
        if group is not None:
            group.kill_on_drop()
