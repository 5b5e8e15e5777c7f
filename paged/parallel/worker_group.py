"""The processes of a tensor-parallel group, from the engine's side: start them, watch them, stop them.

``WorkerGroup.start`` listens for the ranks, creates the shared segments they map (the logits
buffer, and the all-reduce arena for CPU ranks on one host), starts the torchrun agent
(``paged.parallel.launch``, its own session) with the ranks' environment, and runs the handshake
(``Hello`` from every rank, ``WorkerInit`` to each, ``Ready`` back). The processes form the chain
engine -> torchrun agent -> ranks; each arms a parent-death signal, so SIGKILL of the engine
takes the group down.

Liveness (a ``WorkerGroupError`` in every case, raised within seconds):
* a rank process exits or is killed: its connection closes, which the engine sees at once;
* a rank stops making progress (stopped, livelocked, its host gone): while a step runs every rank
  sends a heartbeat every ``heartbeat_period_s``; none for ``heartbeat_timeout_s`` means hung;
* a rank's step raises: it sends the traceback, which becomes the error's message;
* the torchrun agent exits.
``collect`` watches all of these while a step runs; ``check`` finds a rank that exited between
steps. After a failure the group is killed and every later call raises the same error until
``start`` runs again.
"""
from __future__ import annotations

import os
import pickle
import secrets
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from paged.parallel import shm_allreduce
from paged.parallel.channel import ChannelClosed, Connection, Listener
from paged.parallel.errors import WorkerGroupError
from paged.parallel.launch_spec import WorkerGroupSpec
from paged.parallel.logits_buffer import LogitsBuffer
from paged.parallel.protocol import Heartbeat, Hello, RankFailed, Ready, Stop, WorkerInit
from paged.parallel.shared_segment import SharedSegment

_POLL_S = 0.25  # how often a wait re-checks the agent, heartbeats and deadlines


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

    def where(self) -> str:
        return f"tensor-parallel rank {self.rank} (pid {self.pid} on {self.host})"


class WorkerGroup:
    """``spec.world_size`` ranks under one torchrun agent; ``padded_vocab_size`` sizes the logits
    staging (the shared buffer, or a local tensor when logits come over the channel)."""

    def __init__(self, spec: WorkerGroupSpec, padded_vocab_size: int):
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size
        self.ranks: list[RankInfo] = []
        self.agent: subprocess.Popen | None = None
        self.staging: torch.Tensor | None = None   # [max_logits_rows, padded vocab] the ranks' shards land in
        self.failure: WorkerGroupError | None = None
        self._listener: Listener | None = None
        self._buffer: LogitsBuffer | None = None
        self._arena: SharedSegment | None = None

    # ---- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        spec = self.spec
        key = spec.authkey or os.urandom(32)
        if spec.nnodes == 1:  # an abstract socket: no file to leave behind if the engine is killed
            address = f"unix:@paged-tp-{os.getpid()}-{secrets.token_hex(8)}"
        else:
            address = spec.engine_address
        self._listener = Listener(address, key)
        if spec.logits_via_shared_memory:
            self._buffer = LogitsBuffer.create(spec.max_logits_rows, self.padded_vocab_size)
            self.staging = self._buffer.logits
        else:
            self.staging = torch.empty(spec.max_logits_rows, self.padded_vocab_size)
        if (spec.shared_memory_all_reduce and spec.config.device == "cpu" and spec.nnodes == 1
                and shm_allreduce.supported()):
            self._arena = SharedSegment.create(shm_allreduce.arena_bytes(spec.world_size), "paged-tp-allreduce")
        # Its own session, so shutdown can signal the agent and every rank at once.
        self.agent = subprocess.Popen(spec.launch_argv(), env=spec.rank_environment(self._listener.address, key),
                                      start_new_session=True)
        self.failure = None
        try:
            self._handshake()
        except BaseException as exc:
            error = exc if isinstance(exc, WorkerGroupError) else \
                WorkerGroupError(f"tensor-parallel group failed to start: {exc!r}")
            self.fail(error)
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

    # ---- liveness ---------------------------------------------------------------------------------
    def _check_agent(self) -> None:
        code = self.agent.poll() if self.agent is not None else None
        if code is not None:
            raise WorkerGroupError(f"the torchrun agent of the tensor-parallel group exited with code {code}")

    def _receive(self, info: RankInfo, when: str = "") -> object:
        """The rank's next message; WorkerGroupError if its connection closed or its step failed."""
        try:
            message = info.conn.recv()
        except (ChannelClosed, OSError) as exc:
            raise WorkerGroupError(f"{info.where()} exited{when}: {exc}", info.rank) from None
        if isinstance(message, RankFailed):
            raise WorkerGroupError(f"tensor-parallel rank {message.rank} failed:\n{message.error}", message.rank)
        return message

    def check(self) -> None:
        """Raise WorkerGroupError if the group failed since the last step (a rank or the agent
        exited while the engine idled). One select() without waiting; a heartbeat sent just
        after a step's answer is consumed."""
        if self.failure is not None:
            raise self.failure
        by_fd = {info.conn.fileno(): info for info in self.ranks}
        try:
            # Read until nothing is pending: a rank killed right after a late heartbeat shows its
            # end of stream only behind that heartbeat.
            readable, _, _ = select.select(list(by_fd), [], [], 0)
            while readable:
                for fd in readable:
                    info = by_fd[fd]
                    message = self._receive(info, " between steps")
                    if not isinstance(message, Heartbeat):
                        raise WorkerGroupError(f"rank {info.rank} sent {message!r} between steps", info.rank)
                readable, _, _ = select.select(readable, [], [], 0)
            self._check_agent()
        except WorkerGroupError as exc:
            raise self.fail(exc) from None

    def collect(self, handle: Callable[[RankInfo, object], bool], deadline: float | None,
                use_heartbeats: bool) -> None:
        """Read messages until ``handle(rank_info, message)`` returned True once for every rank.

        Raises WorkerGroupError (the group is then killed) on EOF, RankFailed, a missing
        heartbeat, the agent's exit or the deadline."""
        try:
            self._collect(handle, deadline, use_heartbeats)
        except WorkerGroupError as exc:
            raise self.fail(exc) from None

    def _collect(self, handle, deadline: float | None, use_heartbeats: bool) -> None:
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
                    raise WorkerGroupError(f"{info.where()} sent no heartbeat for {spec.heartbeat_timeout_s:.1f} s: "
                                           f"hung or stopped", info.rank)
            if deadline is not None and now > deadline:
                raise WorkerGroupError(f"ranks {sorted(pending)} did not answer in time")
            readable, _, _ = select.select(list(by_fd), [], [], _POLL_S)
            if not readable:
                self._check_agent()
                continue
            for fd in readable:
                info = by_fd[fd]
                message = self._receive(info)
                last_seen[info.rank] = time.monotonic()
                if isinstance(message, Heartbeat):
                    continue
                if info.rank in pending and handle(info, message):
                    pending.discard(info.rank)

    def broadcast(self, payload: bytes) -> None:
        """One frame to every rank; WorkerGroupError (the group is killed) if one is gone."""
        for info in self.ranks:
            try:
                info.conn.send_bytes(payload)
            except OSError as exc:
                raise self.fail(WorkerGroupError(f"{info.where()} is gone: {exc}", info.rank)) from None

    # ---- stop ---------------------------------------------------------------------------------------
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
        self._kill()
        self.failure = self.failure or WorkerGroupError("the tensor-parallel group was shut down")

    def _kill(self) -> None:
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
        self.staging = None

    def fail(self, error: WorkerGroupError) -> WorkerGroupError:
        """The group is lost: remember why (every later call raises it) and kill what is left."""
        self.failure = error
        self._kill()
        return error

    def kill_on_drop(self) -> None:
        """For an owner dropped without ``shutdown``: SIGKILL the agent's session, nothing else."""
        if self.agent is not None and self.agent.poll() is None:
            try:
                os.killpg(self.agent.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
