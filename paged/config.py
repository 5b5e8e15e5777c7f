"""The one validated configuration that flows from the user (or the handler) down to every part."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_SETTINGS = ("auto", *SUPPORTED_DTYPES)
PREEMPTION_MODES = ("recompute", "swap", "auto")
KV_MEMORY_MODELS = ("paged", "virtual")
LINEAR_BACKENDS = (None, "packed", "onednn", "torch")
QUANTIZATIONS = (None, "int8")


def torch_device_type(device: str) -> str:
    """"cpu" for "cpu", "cuda" for "cuda:1" (torch.device's type, without importing torch here)."""
    return str(device).split(":", 1)[0]


@dataclass
class EngineConfig:
    """Everything the engine needs; validated on construction (ValueError names the field).

    Pool sizing: give ``num_kv_blocks`` or ``kv_cache_memory_bytes`` (not both); with neither, the
    pool takes 1 GiB (``paged.kv_sizing.DEFAULT_KV_CACHE_BYTES``). ``swap_space_bytes`` sizes the
    CPU pool that preemption by swap moves blocks to (0 disables swapping: recompute only).
    ``cpu_prefix_cache_bytes`` adds a CPU tier to the prefix cache: cached blocks evicted from the
    device pool are copied there and brought back on a hit (0: off; see docs/sharing.md).
    ``block_size="auto"`` picks the block size at start-up from the length profile at
    ``block_size_profile`` (saved by ``LLMEngine.save_length_profile``, or a bench workload file);
    without one it is 16.

    ``kv_memory``: "paged" (blocks in one preallocated pool, read through block tables) or
    "virtual" (each sequence slot contiguous in reserved address space, pages committed by the OS
    as tokens are written; docs/virtual_kv.md). "virtual" has no block table, so nothing that
    shares blocks: prefix caching (off by default with it), the CPU prefix tier, pinned prefixes,
    n/best_of > 1 and beam search; nor ``block_size: auto``, ``num_kv_blocks`` (give
    ``kv_cache_memory_bytes``), tensor parallel, or CUDA devices (they would need CUDA's virtual
    memory API, cuMemMap). ``kv_deferred_reclaim`` (default on) keeps a finished sequence's pages
    for the next one; ``kv_huge_pages`` (default off) backs the cache with 2 MiB transparent huge
    pages. Both apply to "virtual" only.
    """

    model: str  # an HF checkpoint directory, or a .gguf file (dequantized at load: paged/models/gguf_checkpoint.py)
    block_size: int | Literal["auto"] = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    swap_space_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool | None = None  # None: on for kv_memory "paged", off for "virtual"
    preemption_mode: Literal["recompute", "swap", "auto"] = "auto"
    tensor_parallel_size: int = 1
    # Tensor parallel across nodes (torchrun's c10d rendezvous; see docs/tensor_parallel.md). The
    # shared key of a multi-node group comes from the PAGED_TP_AUTHKEY environment variable.
    tensor_parallel_nnodes: int = 1
    tensor_parallel_rdzv_endpoint: str | None = None   # host:port every node reaches
    tensor_parallel_engine_address: str | None = None  # tcp:<host>:<port> of this engine, for the ranks
    tensor_parallel_heartbeat_timeout_s: float = 5.0   # a rank silent this long during a step is dead
    # "auto": bfloat16 on a CPU with native bf16 dot products (AVX512_BF16, AMX), else float32
    # (paged/dtype_choice.py; the engine resolves it at start and reports why).
    dtype: str = "auto"
    seed: int = 0
    attention_backend: str | None = None  # None: by device; "torch" or "triton" to force
    device: str = "cpu"
    max_waiting_requests: int = 1024
    request_timeout_s: float | None = None
    # Performance switches (see docs/performance.md). compile: torch.compile the dense part of
    # each layer at load and keep it where a probe finds it faster; a missing compiler falls back
    # to eager with a log line. Off by default: measured no faster on the 2-core CPU hosts here.
    compile: bool = False
    # "packed" (our compiled kernel on weights packed once), "onednn" (weights prepacked once),
    # "torch" (F.linear) or None: chosen per host and range of rows by a short measured probe at load.
    linear_backend: str | None = None
    # Every decoder layer of a step in one call into the compiled CPU library, where every GEMM of
    # the step's row range is packed (paged/models/decoder_stack.py). False: one Python call per
    # op (measured 1.6-2.4% faster served on 2 cores, 3-4% slower in process; docs/performance.md).
    fuse_decoder_layers: bool = True
    # "int8": weight-only int8 linear layers (per output channel, symmetric; activations stay in
    # dtype), half the bytes of bf16 per step. None: off.
    quantization: str | None = None
    cpu_prefix_cache_bytes: int = 0
    block_size_profile: str | None = None
    kv_memory: Literal["paged", "virtual"] = "paged"
    kv_deferred_reclaim: bool | None = None  # None: on (kv_memory "virtual" only)
    kv_huge_pages: bool | None = None        # None: off (kv_memory "virtual" only)

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"model must be a checkpoint directory or .gguf file path, got {self.model!r}")
        self.model = str(self.model)
        if self.model.lower().endswith(".gguf") and self.tensor_parallel_nnodes > 1:
            raise ValueError("model: a .gguf file is dequantized on this node only; with tensor_parallel_nnodes > 1 "
                             "give a checkpoint directory every node has (paged.models.gguf_checkpoint.convert_gguf)")
        if self.block_size != "auto":
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                    or not 0 < self.block_size <= 256:
                raise ValueError(f"block_size must be an integer in [1, 256] or 'auto', got {self.block_size!r}")
        if self.block_size_profile is not None:
            if not isinstance(self.block_size_profile, (str, os.PathLike)) or not str(self.block_size_profile):
                raise ValueError(f"block_size_profile must be a file path or None, got {self.block_size_profile!r}")
            self.block_size_profile = str(self.block_size_profile)
        positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        positive_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        if self.num_kv_blocks is not None and self.kv_cache_memory_bytes is not None:
            raise ValueError("give num_kv_blocks or kv_cache_memory_bytes, not both")
        if isinstance(self.swap_space_bytes, bool) or not isinstance(self.swap_space_bytes, int) \
                or self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be an integer >= 0, got {self.swap_space_bytes!r}")
        if isinstance(self.cpu_prefix_cache_bytes, bool) or not isinstance(self.cpu_prefix_cache_bytes, int) \
                or self.cpu_prefix_cache_bytes < 0:
            raise ValueError(f"cpu_prefix_cache_bytes must be an integer >= 0, got {self.cpu_prefix_cache_bytes!r}")
        positive_int("max_num_seqs", self.max_num_seqs)
        positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        positive_int("max_model_len", self.max_model_len, allow_none=True)
        positive_int("tensor_parallel_size", self.tensor_parallel_size)
        positive_int("max_waiting_requests", self.max_waiting_requests)
        positive_int("tensor_parallel_nnodes", self.tensor_parallel_nnodes)
        if self.tensor_parallel_size % self.tensor_parallel_nnodes:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} does not divide over "
                             f"tensor_parallel_nnodes {self.tensor_parallel_nnodes}")
        if self.tensor_parallel_nnodes > 1 and not (self.tensor_parallel_rdzv_endpoint
                                                    and self.tensor_parallel_engine_address):
            raise ValueError("tensor_parallel_nnodes > 1 needs tensor_parallel_rdzv_endpoint (host:port) and "
                             "tensor_parallel_engine_address (tcp:<host>:<port>)")
        for name in ("tensor_parallel_rdzv_endpoint", "tensor_parallel_engine_address"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.tensor_parallel_heartbeat_timeout_s, bool) or not isinstance(
                self.tensor_parallel_heartbeat_timeout_s, (int, float)) or not (
                math.isfinite(self.tensor_parallel_heartbeat_timeout_s)
                and self.tensor_parallel_heartbeat_timeout_s > 1.0):
            raise ValueError("tensor_parallel_heartbeat_timeout_s must be a number > 1 (seconds), got "
                             f"{self.tensor_parallel_heartbeat_timeout_s!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.dtype not in DTYPE_SETTINGS:
            raise ValueError(f"dtype must be one of {DTYPE_SETTINGS}, got {self.dtype!r}")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(f"attention_backend must be None, 'torch' or 'triton', got {self.attention_backend!r}")
        if self.request_timeout_s is not None and (
                isinstance(self.request_timeout_s, bool) or not isinstance(self.request_timeout_s, (int, float))
                or not math.isfinite(self.request_timeout_s) or self.request_timeout_s <= 0):
            raise ValueError(f"request_timeout_s must be a positive number or None, got {self.request_timeout_s!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.kv_memory not in KV_MEMORY_MODELS:
            raise ValueError(f"kv_memory must be one of {KV_MEMORY_MODELS}, got {self.kv_memory!r}")
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = self.kv_memory == "paged"
        for name in ("enable_prefix_caching", "compile", "fuse_decoder_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._check_kv_memory()
        if self.cpu_prefix_cache_bytes and not self.enable_prefix_caching:
            raise ValueError("cpu_prefix_cache_bytes > 0 needs enable_prefix_caching=True")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {LINEAR_BACKENDS}, got {self.linear_backend!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization is not None and self.linear_backend not in (None, "packed"):
            raise ValueError(f"quantization {self.quantization!r} runs on the packed kernel or the probe's choice: "
                             f"linear_backend must be None or 'packed', got {self.linear_backend!r}")

    def _check_kv_memory(self) -> None:
        """What each KV memory model takes (see the class docstring); ValueError names the field."""
        virtual_only = ("kv_deferred_reclaim", "kv_huge_pages")
        for name in virtual_only:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if self.kv_memory == "paged":
            for name in virtual_only:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies only to kv_memory 'virtual' (kv_memory is 'paged')")
            return
        no_sharing = "kv_memory 'virtual' has no block table to share blocks through"
        refused = (
            (self.enable_prefix_caching, "enable_prefix_caching",
             f"{no_sharing}: set enable_prefix_caching to false (its default with kv_memory 'virtual')"),
            (self.cpu_prefix_cache_bytes, "cpu_prefix_cache_bytes",
             f"{no_sharing}: the CPU prefix tier needs kv_memory 'paged' (set cpu_prefix_cache_bytes to 0)"),
            (self.block_size == "auto", "block_size",
             "block_size 'auto' chooses a paged block size; kv_memory 'virtual' has no blocks"),
            (self.num_kv_blocks is not None, "num_kv_blocks",
             "num_kv_blocks counts paged blocks; give kv_cache_memory_bytes with kv_memory 'virtual'"),
            (self.tensor_parallel_size > 1, "tensor_parallel_size",
             "kv_memory 'virtual' runs in one process: tensor_parallel_size must be 1"),
            (torch_device_type(self.device) != "cpu", "device",
             f"kv_memory 'virtual' commits pages through the operating system (CPU memory); device "
             f"{self.device!r} would need CUDA's virtual memory API (cuMemMap), which is not implemented"),
        )
        for bad, name, message in refused:
            if bad:
                raise ValueError(f"{name}: {message}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EngineConfig":
        """Build from a plain mapping (e.g. the handler section of model-config.yaml).

        Unknown keys are an error, so a typo in a config file fails the load loudly.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))
