"""The engine's side of tensor parallelism: start N ranks with torchrun, drive them step by step.

``TensorParallelExecutor`` is the engine's model runner when ``tensor_parallel_size > 1``: it has
``ModelRunner``'s contract (``execute(plan)`` and ``execute_model_input(model_input)`` return fp32
logits ``[sampling rows, vocab]`` on the CPU). The engine builds each step's ``ModelInput`` once;
the executor pickles it once and writes it to every rank's connection; each rank runs it on its
own ``ModelRunner`` (its weight shards, its KV heads) and puts its vocabulary slice of the logits
into a shared buffer (ranks on other hosts send it over their connection); the executor returns
the assembled logits. No collective involves the engine process.

Failure model (a ``WorkerGroupError`` in every case, raised within seconds):
* a rank process exits or is killed: its connection closes, which the engine sees at once;
* a rank stops making progress (stopped, livelocked, its host gone): while a step runs every rank
  sends a heartbeat every ``heartbeat_period_s``; none for ``heartbeat_timeout_s`` means hung;
* a rank's step raises: it sends the traceback, which becomes the error's message;
* the torchrun agent exits.
A rank that exits between steps is found by ``check_health()``, which the engine calls before it
schedules a step. The KV cache lived on the ranks, so after the error every sequence that held KV blocks is lost:
the engine fails those requests, resets its block manager and calls ``restart()``, which starts a
fresh group (the weights load again). A group that spans several nodes cannot be restarted from
here (the other nodes' torchrun agents belong to their operators): ``restart()`` raises and the
engine gives up (``EngineDeadError``), so its supervisor (TorchServe) restarts it.

The processes form the chain engine -> torchrun agent (``paged.parallel.launch``, its own
session) -> ranks; each arms a parent-death signal, so SIGKILL of the engine takes the group down.
"""
from __future__ import annotations

import os
import pickle
import select
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from paged.config import EngineConfig
from paged.model_runner import ModelInput, build_model_input
from paged.models.llama import ModelArgs
from paged.parallel import shm_allreduce
from paged.parallel.channel import ChannelClosed, Connection, Listener
from paged.parallel.context import default_threads_per_rank
from paged.parallel.errors import WorkerGroupError
from paged.parallel.launch import PARENT_PID_ENV
from paged.parallel.logits_buffer import LogitsBuffer
from paged.parallel.partition import ShardLayout, layout_for
from paged.parallel.protocol import (Done, Heartbeat, Hello, RankFailed, Ready, ShardLogits, Stop, WorkerInit)
from paged.parallel.shared_segment import SharedSegment
from paged.parallel.worker import ADDRESS_ENV, AUTHKEY_ENV
from paged.scheduler import SchedulerOutput
from paged.step_timer import StepTimer

__all__ = ["TensorParallelExecutor", "WorkerGroupError", "WorkerGroupSpec", "remote_node_command"]

_POLL_S = 0.25  # how often a wait re-checks the agent, heartbeats and deadlines


@dataclass
class WorkerGroupSpec:
    """What to start: the engine's configuration (model, dtype, device, ``tensor_parallel_size``,
    the multi-node settings and the heartbeat timeout), every rank's pool sizes, and launch knobs.

    ``num_blocks`` / ``num_cpu_blocks`` are the same on every rank: a block id names the same
    block in every rank's pool, each holding only that rank's KV heads."""

    config: EngineConfig
    num_blocks: int
    num_cpu_blocks: int
    max_logits_rows: int | None = None   # rows the shared logits buffer holds; None: config.max_num_seqs
                                         # (one per running sequence); a step with more uses the channel
    threads_per_rank: int | None = None  # None: cores / ranks on this host
    heartbeat_period_s: float = 0.5
    start_timeout_s: float = 600.0       # loading the shards; a big checkpoint takes minutes
    logits_via_shared_memory: bool = True
    shared_memory_all_reduce: bool = True  # CPU ranks on one x86-64 host; otherwise gloo / NCCL
    rdzv_id: str = "paged-tp"            # names the rendezvous of a multi-node group
    # The key every rank proves it knows. None: from PAGED_TP_AUTHKEY (hex, the same on every node)
    # for a group over several nodes, a random one for a single node.
    authkey: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"a worker group needs tensor_parallel_size >= 2, got {self.world_size}")
        if self.max_logits_rows is None:
            self.max_logits_rows = self.config.max_num_seqs
        if self.authkey is None and self.nnodes > 1:
            key = os.environ.get(AUTHKEY_ENV, "")
            try:
                self.authkey = bytes.fromhex(key) or None
            except ValueError:
                raise ValueError(f"{AUTHKEY_ENV} must be a hex string") from None
            if self.authkey is None:
                raise ValueError(f"a group over several nodes needs its shared key in {AUTHKEY_ENV} (hex, the same "
                                 f"on every node), e.g. from: python -c 'import os; print(os.urandom(32).hex())'")
        if self.heartbeat_timeout_s <= self.heartbeat_period_s:
            raise ValueError("the heartbeat timeout must exceed heartbeat_period_s")

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def world_size(self) -> int:
        return self.config.tensor_parallel_size

    @property
    def nnodes(self) -> int:
        return self.config.tensor_parallel_nnodes

    @property
    def rdzv_endpoint(self) -> str | None:
        return self.config.tensor_parallel_rdzv_endpoint

    @property
    def engine_address(self) -> str | None:
        return self.config.tensor_parallel_engine_address

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.config.tensor_parallel_heartbeat_timeout_s

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes

    def torchrun_args(self) -> list[str]:
        common = [f"--nproc-per-node={self.nproc_per_node}", "--max-restarts=0", "--monitor-interval=0.5"]
        if self.nnodes == 1:
            return ["--standalone", "--nnodes=1", *common]
        return [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={self.rdzv_id}", *common]

    def launch_argv(self) -> list[str]:
        return [sys.executable, "-m", "paged.parallel.launch", *self.torchrun_args(), "-m", "paged.parallel.worker"]

    def resolved_threads_per_rank(self) -> int:
        return self.threads_per_rank or default_threads_per_rank(self.nproc_per_node)

    def remote_node_command(self) -> tuple[dict[str, str], list[str]]:
        """The environment variables and argv that join another node's ranks to this group (run
        them on that node, before or after the engine starts; the rendezvous waits for all)."""
        if self.nnodes == 1:
            raise ValueError("a single-node group has no other nodes")
        env = {ADDRESS_ENV: self.engine_address, AUTHKEY_ENV: self.authkey.hex()}
        return env, self.launch_argv()


def remote_node_command(config: EngineConfig) -> tuple[dict[str, str], list[str]]:
    """``WorkerGroupSpec.remote_node_command`` for an engine's configuration (the key from
    PAGED_TP_AUTHKEY): what every node but the engine's runs to join the group."""
    return WorkerGroupSpec(config, num_blocks=1, num_cpu_blocks=0).remote_node_command()


@dataclass
class RankInfo:
    rank: int
    local_rank: int
    host: str
    pid: int
    conn: Connection = field(repr=False)
    num_kv_heads: int = 0
    logits_in_shared_memory: bool = False
    all_reduce: str = ""
    load_seconds: float = 0.0
    performance: dict = field(default_factory=dict)


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
    """The ``Executor`` contract (paged/executor.py) over a torchrun-launched group of
    ``spec.world_size`` ranks."""

    def __init__(self, spec: WorkerGroupSpec, timer: StepTimer | None = None):
        self.spec = spec
        self.timer = timer or StepTimer(enabled=False)
        args = ModelArgs.from_checkpoint(spec.model)
        # Validate the split here, before any process starts (ValueError names the numbers).
        self.layouts: list[ShardLayout] = [layout_for(args, spec.world_size, r) for r in range(spec.world_size)]
        self.vocab_size = args.vocab_size
        self.stats = ExecutorStats()
        self.ranks: list[RankInfo] = []
        self.agent: subprocess.Popen | None = None
        self._listener: Listener | None = None
        self._buffer: LogitsBuffer | None = None
        self._arena: SharedSegment | None = None
        self._staging: torch.Tensor | None = None
        self._failure: WorkerGroupError | None = None
        self._start()

    # ---- lifecycle --------------------------------------------------------------------------------
    def _start(self) -> None:
        spec = self.spec
        key = spec.authkey or os.urandom(32)
        if spec.nnodes == 1:  # an abstract socket: no file to leave behind if the engine is killed
            address = f"unix:@paged-tp-{os.getpid()}-{secrets.token_hex(8)}"
        else:
            address = spec.engine_address
        self._listener = Listener(address, key)
        padded_vocab = self.layouts[0].padded_vocab_size
        if spec.logits_via_shared_memory:
            self._buffer = LogitsBuffer.create(spec.max_logits_rows, padded_vocab)
            self._staging = self._buffer.logits
        else:
            self._staging = torch.empty(spec.max_logits_rows, padded_vocab)
        if (spec.shared_memory_all_reduce and spec.config.device == "cpu" and spec.nnodes == 1
                and shm_allreduce.supported()):
            self._arena = SharedSegment.create(shm_allreduce.arena_bytes(spec.world_size), "paged-tp-allreduce")
        # The ranks import the engine's own copy of the package (a source checkout may be on the
        # engine's path only through its working directory); an installed copy needs nothing, and
        # putting site-packages ahead of the standard library could shadow it.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.basename(package_root) in ("site-packages", "dist-packages"):
            package_root = None
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, ADDRESS_ENV: self._listener.address, AUTHKEY_ENV: key.hex(), "PYTHONPATH": python_path,
               PARENT_PID_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(spec.resolved_threads_per_rank())}
        argv = spec.launch_argv()
        # Its own session, so shutdown can signal the agent and every rank at once.
        self.agent = subprocess.Popen(argv, env=env, start_new_session=True)
        self._failure = None
        try:
            self._handshake()
        except BaseException as exc:
            error = exc if isinstance(exc, WorkerGroupError) else \
                WorkerGroupError(f"tensor-parallel group failed to start: {exc!r}")
            self._fail(error)
            raise error from (None if error is exc else exc)
        finally:
            if self._buffer is not None:
                self._buffer.segment.release_fd()
            if self._arena is not None:  # the ranks hold their mappings; the engine needs none
                self._arena.release_fd()
                self._arena = None

    def _handshake(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.start_timeout_s
        hellos: dict[int, tuple[Hello, Connection]] = {}
        while len(hellos) < spec.world_size:
            self._check_agent()
            if time.monotonic() > deadline:
                raise WorkerGroupError(f"only {len(hellos)} of {spec.world_size} ranks connected within "
                                       f"{spec.start_timeout_s:.0f} s")
            try:
                conn = self._listener.accept(timeout=_POLL_S)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                continue  # a peer without the key (or one that hung up mid-handshake) is not a rank
            # A frame that stalls half-way must not stall the engine: every read has a bound.
            conn.settimeout(spec.heartbeat_timeout_s)
            hello = conn.recv()
            if not isinstance(hello, Hello) or hello.world_size != spec.world_size or hello.rank in hellos:
                conn.close()
                raise WorkerGroupError(f"unexpected first message from a rank: {hello!r}")
            hellos[hello.rank] = (hello, conn)
        self.ranks = [RankInfo(h.rank, h.local_rank, h.host, h.pid, conn)
                      for h, conn in (hellos[r] for r in range(spec.world_size))]
        init = WorkerInit(config=spec.config, num_blocks=spec.num_blocks, num_cpu_blocks=spec.num_cpu_blocks,
                          threads_per_rank=spec.threads_per_rank, heartbeat_period_s=spec.heartbeat_period_s,
                          max_logits_rows=spec.max_logits_rows,
                          logits_segment=self._buffer.segment.info if self._buffer is not None else None,
                          all_reduce_segment=self._arena.info if self._arena is not None else None)
        for info in self.ranks:
            info.conn.send(init)

        def on_ready(info: RankInfo, message: object) -> bool:
            if not isinstance(message, Ready):
                raise WorkerGroupError(f"rank {info.rank} answered {message!r} instead of Ready", info.rank)
            info.num_kv_heads = message.num_kv_heads
            info.logits_in_shared_memory = message.logits_in_shared_memory
            info.all_reduce = message.all_reduce
            info.load_seconds = message.load_seconds
            info.performance = message.performance
            return True

        self._collect(on_ready, deadline=deadline, use_heartbeats=False)

    def _check_agent(self) -> None:
        code = self.agent.poll() if self.agent is not None else None
        if code is not None:
            raise WorkerGroupError(f"the torchrun agent of the tensor-parallel group exited with code {code}")

    @property
    def can_restart(self) -> bool:
        """A group over several nodes cannot be restarted from here (their agents are not ours)."""
        return self.spec.nnodes == 1

    def check_health(self) -> None:
        """Raise WorkerGroupError if the group failed since the last step (a rank or the agent
        exited while the engine idled), so the engine can restart it before it schedules work.
        One select() without waiting; a heartbeat sent just after a step's answer is consumed."""
        if self._failure is not None:
            raise self._failure
        by_fd = {info.conn.fileno(): info for info in self.ranks}
        try:
            # Read until nothing is pending: a rank killed right after a late heartbeat shows its
            # end of stream only behind that heartbeat.
            readable, _, _ = select.select(list(by_fd), [], [], 0)
            while readable:
                for fd in readable:
                    info = by_fd[fd]
                    try:
                        message = info.conn.recv()
                    except (ChannelClosed, OSError) as exc:
                        raise WorkerGroupError(f"tensor-parallel rank {info.rank} (pid {info.pid} on "
                                               f"{info.host}) exited between steps: {exc}", info.rank) from None
                    if not isinstance(message, Heartbeat):
                        raise WorkerGroupError(f"rank {info.rank} sent {message!r} between steps", info.rank)
                readable, _, _ = select.select(readable, [], [], 0)
            self._check_agent()
        except WorkerGroupError as exc:
            raise self._fail(exc) from None

    def restart(self) -> None:
        """Tear the group down (whatever state it is in) and start a fresh one with empty KV pools."""
        if self.spec.nnodes > 1:
            self.shutdown()
            raise WorkerGroupError("a multi-node group cannot be restarted from the engine; restart the engine "
                                   "and the other nodes' torchrun")
        self.shutdown()
        self._start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every rank and the agent; idempotent. Ranks get ``timeout`` seconds to exit on
        their own; whatever is left of the local group then gets SIGKILL."""
        deadline = time.monotonic() + timeout
        for info in self.ranks:
            try:
                info.conn.send(Stop())
            except OSError:
                pass
        for info in self.ranks:  # EOF on a connection: that rank has exited
            try:
                info.conn.settimeout(max(0.0, deadline - time.monotonic()))
                while info.conn.recv() is not None:
                    pass
            except (OSError, EOFError, pickle.UnpicklingError):
                pass
            info.conn.close()
        self.ranks = []
        # A single-node agent holds nothing once its ranks are gone (killing it saves its seconds of
        # teardown); the agent of a multi-node group takes part in the other nodes' shutdown.
        if self.spec.nnodes > 1 and self.agent is not None and self.agent.poll() is None:
            try:
                self.agent.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        self._failure = self._failure or WorkerGroupError("the tensor-parallel group was shut down")

    def _kill_group(self) -> None:
        """SIGKILL the agent's session (agent and local ranks) and release every resource."""
        for info in self.ranks:
            info.conn.close()
        self.ranks = []
        if self.agent is not None:
            if self.agent.poll() is None:
                try:
                    os.killpg(self.agent.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.agent.wait()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._buffer = None
        self._staging = None

    def _fail(self, error: WorkerGroupError) -> WorkerGroupError:
        self._failure = error
        self._kill_group()
        return error

    def describe(self) -> list[dict]:
        """One entry per rank: where it runs and what it holds (for the describe API and logs)."""
        return [{"rank": r.rank, "local_rank": r.local_rank, "host": r.host, "pid": r.pid,
                 "kv_heads": r.num_kv_heads,
                 "logits_via": "shared memory" if r.logits_in_shared_memory else "channel",
                 "all_reduce": r.all_reduce,
                 "load_seconds": round(r.load_seconds, 3)} for r in self.ranks]

    @property
    def agent_pid(self) -> int | None:
        return self.agent.pid if self.agent is not None else None

    def performance_info(self) -> dict:
        """The ranks' fast paths (rank 0's: every rank runs the same code on the same shapes) and
        the group: its size, nodes, state, the torchrun agent's pid and every rank with its pid."""
        info = dict(self.ranks[0].performance) if self.ranks else {}
        info["tensor_parallel"] = {
            "size": self.spec.world_size, "nnodes": self.spec.nnodes,
            "state": "running" if self._failure is None else f"down: {self._failure.summary}",
            "agent_pid": self.agent_pid if self.ranks else None, "ranks": self.describe()}
        return info

    # ---- the step ---------------------------------------------------------------------------------
    def _collect(self, handle, deadline: float | None, use_heartbeats: bool) -> None:
        """Read messages until ``handle(rank_info, message)`` returned True once for every rank.

        Raises WorkerGroupError on EOF, RankFailed, a missing heartbeat, the agent's exit or the
        deadline."""
        spec = self.spec
        by_fd = {info.conn.fileno(): info for info in self.ranks}
        pending = {info.rank for info in self.ranks}
        now = time.monotonic()
        last_seen = dict.fromkeys(pending, now)
        while pending:
            now = time.monotonic()
            if use_heartbeats:
                silent = [r for r in pending if now - last_seen[r] > spec.heartbeat_timeout_s]
                if silent:
                    info = self.ranks[silent[0]]
                    raise WorkerGroupError(f"tensor-parallel rank {info.rank} (pid {info.pid} on {info.host}) sent "
                                           f"no heartbeat for {spec.heartbeat_timeout_s:.1f} s: hung or stopped",
                                           info.rank)
            if deadline is not None and now > deadline:
                raise WorkerGroupError(f"ranks {sorted(pending)} did not answer in time")
            readable, _, _ = select.select(list(by_fd), [], [], _POLL_S)
            if not readable:
                self._check_agent()
                continue
            for fd in readable:
                info = by_fd[fd]
                try:
                    message = info.conn.recv()
                except (ChannelClosed, OSError) as exc:
                    raise WorkerGroupError(f"tensor-parallel rank {info.rank} (pid {info.pid} on {info.host}) "
                                           f"exited: {exc}", info.rank) from None
                last_seen[info.rank] = time.monotonic()
                if isinstance(message, Heartbeat):
                    continue
                if isinstance(message, RankFailed):
                    raise WorkerGroupError(f"tensor-parallel rank {message.rank} failed:\n{message.error}",
                                           message.rank)
                if info.rank in pending and handle(info, message):
                    pending.discard(info.rank)

    def execute(self, plan: SchedulerOutput) -> torch.Tensor:
        """Run the plan on every rank; fp32 logits [num sampling sequences, vocab] in plan order."""
        with self.timer.phase("prepare"):
            model_input = build_model_input(plan, self.spec.config.block_size)
        return self.execute_model_input(model_input)

    def execute_model_input(self, model_input: ModelInput) -> torch.Tensor:
        """Run one step on every rank; fp32 logits ``[len(model_input.logits_indices), vocab]`` (CPU)."""
        if self._failure is not None:
            raise self._failure
        with self.timer.phase("forward_other"):
            return self._execute(model_input)

    def _execute(self, model_input: ModelInput) -> torch.Tensor:
        rows = len(model_input.logits_indices)
        started = time.perf_counter()
        payload = pickle.dumps(model_input, protocol=pickle.HIGHEST_PROTOCOL)
        for info in self.ranks:
            try:
                info.conn.send_bytes(payload)
            except OSError as exc:
                raise self._fail(WorkerGroupError(f"tensor-parallel rank {info.rank} (pid {info.pid} on {info.host}) "
                                                  f"is gone: {exc}", info.rank)) from None
        sent = time.perf_counter()
        staging = self._staging
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

        try:
            self._collect(on_answer, deadline=None, use_heartbeats=True)
        except WorkerGroupError as exc:
            raise self._fail(exc) from None
        answered = time.perf_counter()
        logits = staging[:rows, :self.vocab_size].clone()
        done = time.perf_counter()
        self.stats.steps += 1
        self.stats.total_s += answered - started - gather_s
        self.stats.broadcast_s += sent - started
        self.stats.gather_s += gather_s + done - answered
        self.stats.rank_step_s += max(t.step_s for t in timings)
        self.stats.collective_s += sum(t.collective_s for t in timings) / len(timings)
        self.stats.collective_calls += timings[0].collective_calls
        self.stats.collective_bytes += timings[0].collective_bytes
        return logits

    def __del__(self):
        # Normally the engine calls shutdown(); this covers an engine dropped without it.
        if getattr(self, "agent", None) is not None and self.agent.poll() is None:
            try:
                os.killpg(self.agent.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
