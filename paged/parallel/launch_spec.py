"""What a tensor-parallel worker group is started with: ``WorkerGroupSpec``.

The engine's configuration (model, dtype, device, ``tensor_parallel_size``, the multi-node
settings, the heartbeat timeout), every rank's pool sizes, and the launch knobs: torchrun's
arguments, the environment the ranks get, and the command another node runs to join the group
(``remote_node_command``). Pure data and arithmetic; nothing here starts a process.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from paged.config import EngineConfig
from paged.parallel.context import default_threads_per_rank
from paged.parallel.launch import PARENT_PID_ENV
from paged.parallel.worker import ADDRESS_ENV, AUTHKEY_ENV


@dataclass
class WorkerGroupSpec:
    """``num_blocks`` / ``num_cpu_blocks`` are the same on every rank: a block id names the same
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

    def rank_environment(self, address: str, key: bytes) -> dict[str, str]:
        """The environment of this host's torchrun agent and ranks: where the engine listens, the
        key, the engine's pid (its death ends them), their threads, and the import path.

        The ranks import the engine's own copy of the package (a source checkout may be on the
        engine's path only through its working directory); an installed copy needs nothing, and
        putting site-packages ahead of the standard library could shadow it."""
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.basename(package_root) in ("site-packages", "dist-packages"):
            package_root = None
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, ADDRESS_ENV: address, AUTHKEY_ENV: key.hex(), "PYTHONPATH": python_path,
                PARENT_PID_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(self.resolved_threads_per_rank())}

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
