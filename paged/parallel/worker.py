"""A tensor-parallel rank: ``python -m paged.parallel.worker``, started by torchrun.

The rank connects to its engine (``PAGED_TP_ADDRESS``, key ``PAGED_TP_AUTHKEY``), joins the
process group torchrun set up (gloo on CPU, NCCL on CUDA), loads its weight shards and builds the
engine's own ``ModelRunner`` around them (so its KV pools hold only its KV heads), then loops:
receive a ``ModelInput``, run it (``ModelRunner.execute_model_input``), put its logits shard where
the engine collects it. All torch work happens on the main thread, which is the first to touch torch
in this process (small GEMMs run 2-3x slower on any other thread once the main thread has used
the OpenMP pool). The one other thread only sends heartbeats while a step runs, so the engine can
tell a slow step from a hung or stopped rank.

The rank exits when the engine's connection closes (the engine stopped or died), when its parent
(the torchrun agent) dies, or after reporting a failed step.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys
import threading
import time
import traceback

from paged.parallel.channel import ChannelClosed, Connection, connect
from paged.parallel.lifecycle import die_with_parent
from paged.parallel.protocol import (Done, Heartbeat, Hello, RankFailed, Ready, ShardLogits, StepTiming, Stop,
                                     WorkerInit)

ADDRESS_ENV = "PAGED_TP_ADDRESS"
AUTHKEY_ENV = "PAGED_TP_AUTHKEY"
CONNECT_TIMEOUT_S = 60.0
# A collective waits this long for a peer before raising: far beyond any step's imbalance, short
# enough that a rank whose peer vanished without a trace does not linger for gloo's 30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


class _Heartbeat(threading.Thread):
    """Sends a Heartbeat every period while ``busy``; exits the process if the engine is gone."""

    def __init__(self, conn: Connection, rank: int, period: float):
        super().__init__(name="tp-heartbeat", daemon=True)
        self.conn, self.rank, self.period = conn, rank, period
        self.busy = threading.Event()

    def run(self) -> None:
        while True:
            self.busy.wait()
            time.sleep(self.period)
            if not self.busy.is_set():
                continue
            try:
                self.conn.send(Heartbeat(self.rank))
            except OSError:
                os._exit(1)  # the engine is gone; the main thread may be stuck in a collective


def _shared_memory_all_reduce(init: WorkerInit, rank: int, world_size: int):
    """The shared-memory all-reduce when every rank mapped the engine's arena, else None.

    The ranks decide together (one all-reduce over the group): a rank that used shared memory
    while a peer used gloo would wait forever."""
    import torch
    import torch.distributed as dist

    from paged.parallel.shared_segment import SharedSegment
    from paged.parallel.shm_allreduce import ShmAllReduce

    if init.all_reduce_segment is None:
        return None
    segment = SharedSegment.attach(init.all_reduce_segment)
    everyone = torch.tensor([int(segment is not None)])
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
    if not everyone.item():
        return None
    return ShmAllReduce(segment.payload, rank, world_size, COLLECTIVE_TIMEOUT.total_seconds())


def serve(conn: Connection, init: WorkerInit, rank: int, local_rank: int, world_size: int,
          local_world_size: int) -> None:
    """Load this rank's shard and run steps until the engine says stop or goes away."""
    import torch
    import torch.distributed as dist

    from paged.dtype_choice import choose_dtype
    from paged.model_runner import DTYPES, ModelRunner
    from paged.parallel.context import CollectiveClock, ParallelContext, default_backend, default_threads_per_rank
    from paged.parallel.logits_buffer import LogitsBuffer
    from paged.parallel.sharded_model import build_sharded_model

    started = time.perf_counter()
    torch.set_num_threads(init.threads_per_rank or default_threads_per_rank(local_world_size))
    # the engine sends a resolved dtype; a group started without one (bench/tp.py) resolves "auto" here
    config = dataclasses.replace(init.config, dtype=choose_dtype(init.config.dtype, init.config.device).dtype)
    torch.manual_seed(config.seed)
    if config.device.startswith("cuda"):
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
        torch.cuda.set_device(config.device)
    backend = default_backend(config.device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    local_all_reduce = _shared_memory_all_reduce(init, rank, world_size)
    ctx = ParallelContext.from_default_group(local_all_reduce)
    model, layout = build_sharded_model(config.model, ctx, DTYPES[config.dtype], config.device)
    model.prepare_for_inference(DTYPES[config.dtype], config.device, compile=config.compile,
                                linear_backend=config.linear_backend, quantization=config.quantization)
    # model.args holds this rank's head and MLP sizes: the runner's KV pools get only its KV heads.
    runner = ModelRunner(config, model.args, init.num_blocks, init.num_cpu_blocks, model=model)
    shared = None
    if init.logits_segment is not None:
        shared = LogitsBuffer.attach(init.logits_segment, init.max_logits_rows, layout.padded_vocab_size)
    conn.send(Ready(rank, shared is not None, "shared memory" if local_all_reduce else backend,
                    layout.num_kv_heads, time.perf_counter() - started, runner.performance_info()))

    heartbeat = _Heartbeat(conn, rank, init.heartbeat_period_s)
    heartbeat.start()
    while True:
        try:
            model_input = conn.recv()
        except ChannelClosed:
            return
        if isinstance(model_input, Stop):
            return
        heartbeat.busy.set()
        step_started = time.perf_counter()
        CollectiveClock.take()
        # Every rank runs the forward even when no row wants logits: the all-reduces need all.
        # An exception reaches main(), which reports it and exits.
        logits = runner.execute_model_input(model_input)
        rows = logits.shape[0]
        if shared is not None and rows <= init.max_logits_rows:
            if rows:
                shared.write_shard(logits, layout.vocab_start)
            heartbeat.busy.clear()
            conn.send(Done(rank, StepTiming(time.perf_counter() - step_started, *CollectiveClock.take())))
        else:
            data = logits.contiguous()
            heartbeat.busy.clear()
            timing = StepTiming(time.perf_counter() - step_started, *CollectiveClock.take())
            conn.send(ShardLogits(rank, rows, data.shape[1], timing))
            conn.send_bytes(data.numpy().tobytes())


def main() -> None:
    die_with_parent()  # the torchrun agent; it dies with the engine in turn (paged.parallel.launch)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    conn = connect(os.environ[ADDRESS_ENV], bytes.fromhex(os.environ[AUTHKEY_ENV]), CONNECT_TIMEOUT_S)
    conn.send(Hello(rank, local_rank, world_size, local_world_size, socket.gethostname(), os.getpid()))
    try:
        init = conn.recv()
    except ChannelClosed:
        return
    if not isinstance(init, WorkerInit):
        raise RuntimeError(f"expected WorkerInit from the engine, got {type(init).__name__}")
    try:
        serve(conn, init, rank, local_rank, world_size, local_world_size)
    except ChannelClosed:
        return
    except Exception:
        try:
            conn.send(RankFailed(rank, traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        conn.close()


if __name__ == "__main__":
    main()
    # Nothing to tear down: skipping the interpreter's (and the process group's) slow teardown lets
    # the group stop in well under a second instead of seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
