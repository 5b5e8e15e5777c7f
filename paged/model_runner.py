"""Runs the model on one step's plan: applies its block moves, builds the flat batch, returns logits.

``ModelRunner`` is the in-process implementation of the engine's ``Executor`` (paged/executor.py);
a tensor-parallel rank runs one over its weight shards.

The step's scheduled tokens (each sequence's next ``num_new_tokens`` uncomputed tokens) become
one flat batch: input ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc. Only
sequences whose last token runs this step produce logits. ``ModelInput`` is that batch as plain
lists, so the same input can be shipped to other processes (tensor-parallel ranks).

With ``kv_memory: virtual`` the runner writes and reads the KV manager's ``VirtualKVCache`` through
its per-layer views (the manager commits and returns its pages between steps). A sequence's table
is then its one slot, a block of ``max_model_len`` tokens, so the same flat batch holds the
contiguous layout's slot mapping (``slot * max_model_len + position``) and the attention reads
each slot in place (``AttentionMetadata.seq_slots``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from paged.backends import resolve_backends
from paged.config import EngineConfig
from paged.dtype_choice import choose_dtype
from paged.models.decoder_stack import describe_stack
from paged.models.llama import AttentionMetadata, LlamaForCausalLM, ModelArgs
from paged.models.logits_buffers import LogitsBuffers
from paged.scheduler_output import SchedulerOutput
from paged.step_timer import StepTimer
from paged.virtual_kv import VirtualKVCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInput:
    """One step's flat batch and block moves, as plain data (picklable, no tensors)."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]
    query_start_loc: list[int]
    block_tables: np.ndarray           # int32 [num_seqs, blocks of the longest sequence], 0-padded
    logits_indices: list[int]          # rows of the flat batch whose logits are sampled
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    prefix_offload: list[tuple[int, int]] = field(default_factory=list)
    prefix_load: list[tuple[int, int]] = field(default_factory=list)


def build_model_input(plan: SchedulerOutput, block_size: int) -> ModelInput:
    """The flat batch of a plan: each scheduled sequence's new tokens are its last positions."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    seq_lens: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    max_blocks = 0
    for item, table in zip(plan.scheduled, plan.block_tables):
        seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        end = start + count
        if count == 1:
            input_ids.append(seq.token_ids[start])
            positions.append(start)
            slot_mapping.append(table[start // block_size] * block_size + start % block_size)
        else:
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        seq_lens.append(end)
        query_start_loc.append(query_start_loc[-1] + count)
        if item.samples:
            logits_indices.append(query_start_loc[-1] - 1)
        max_blocks = max(max_blocks, (end + block_size - 1) // block_size)
    # numpy rows: ~3x cheaper than torch.tensor on nested lists, and one buffer to pickle
    tables = np.zeros((len(plan.block_tables), max_blocks), dtype=np.int32)
    for row, table in enumerate(plan.block_tables):
        width = min(len(table), max_blocks)
        tables[row, :width] = table if width == len(table) else table[:width]
    return ModelInput(input_ids, positions, slot_mapping, seq_lens, query_start_loc, tables, logits_indices,
                      plan.swap_out, plan.swap_in, plan.copies, plan.prefix_offload, plan.prefix_load)


class KVCache:
    """Device pool and CPU swap pool, one tensor each: [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, num_cpu_blocks: int,
                 block_size: int, dtype: torch.dtype, device: str):
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.device_cache = torch.zeros(shape, dtype=dtype, device=device)
        cpu_shape = (num_layers, 2, num_cpu_blocks, block_size, num_kv_heads, head_dim)
        self.cpu_cache = torch.zeros(cpu_shape, dtype=dtype, device="cpu")

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer[0], layer[1]) for layer in self.device_cache]

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src_ids = torch.tensor([p[0] for p in pairs], device=src.device)
        dst_ids = torch.tensor([p[1] for p in pairs], device=dst.device)
        dst[:, :, dst_ids] = src[:, :, src_ids].to(dst.device)

    def apply(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]],
              copies: list[tuple[int, int]], prefix_offload: list[tuple[int, int]] = (),
              prefix_load: list[tuple[int, int]] = ()) -> None:
        """Block moves of a plan, in the order the plan requires (see ``SchedulerOutput``):
        everything that reads a device block before anything that writes one."""
        self._copy(self.cpu_cache, self.device_cache, swap_out)
        self._copy(self.cpu_cache, self.device_cache, prefix_offload)
        self._copy(self.device_cache, self.cpu_cache, swap_in)
        self._copy(self.device_cache, self.cpu_cache, prefix_load)
        self._copy(self.device_cache, self.device_cache, copies)


class ModelRunner:
    """The model and its KV pools; ``execute`` runs one plan (the ``Executor`` contract in process).

    ``model``: a model built elsewhere (a tensor-parallel rank passes its shard, with ``args``
    holding the rank's head and MLP sizes, so the KV pools hold only its KV heads); None loads
    ``config.model`` whole. The logits then cover the model's vocabulary (a rank's: its shard).
    ``kv_memory``: the virtual KV memory to run on (kv_memory virtual) instead of pools of its own.
    """

    can_restart = True  # nothing here outlives a failure: the model and pools live in this process

    def __init__(self, config: EngineConfig, args: ModelArgs, num_blocks: int, num_cpu_blocks: int,
                 timer: StepTimer | None = None, model: LlamaForCausalLM | None = None, *,
                 kv_memory: VirtualKVCache | None = None):
        self.config = config
        self.args = args
        self.block_size = config.block_size
        self.device = config.device
        # the engine passes a resolved dtype; a runner built alone resolves "auto" the same way
        self.dtype = DTYPES[choose_dtype(config.dtype, config.device).dtype]
        self.timer = timer or StepTimer(enabled=False)
        # Every kernel choice is made now (the compiled CPU kernels built or loaded), not in a request.
        self.backends = resolve_backends(config.attention_backend, self.device, args.head_dim, self.dtype,
                                         contiguous=kv_memory is not None)
        self.model = model if model is not None else \
            LlamaForCausalLM.from_pretrained(config.model, self.dtype, self.device, compile=config.compile,
                                             linear_backend=config.linear_backend,
                                             quantization=config.quantization)
        self.model.step_timer = self.timer
        self.model.fuse_layers = config.fuse_decoder_layers
        self.logits_buffers = LogitsBuffers(config.max_num_seqs)
        # The LM head writes into those buffers; where it may write in place instead of copying, measure.
        probe_into = getattr(self.model.lm_head, "probe_forward_into", None)
        self.lm_head_into = probe_into(config.max_num_seqs) if probe_into is not None else {}
        self.contiguous = kv_memory is not None
        if self.contiguous:
            self.kv_cache = None   # the KV manager's: no pools here, no block moves to apply
            self.block_size = kv_memory.max_model_len
            self.layer_caches = list(zip(kv_memory.key_caches, kv_memory.value_caches))
        else:
            self.kv_cache = KVCache(args.num_layers, args.num_kv_heads, args.head_dim, num_blocks, num_cpu_blocks,
                                    config.block_size, self.dtype, self.device)
            self.layer_caches = self.kv_cache.layer_caches()

    def performance_info(self) -> dict:
        """The fast paths this runner chose at load and runs (reported by describe and the benchmarks)."""
        model = self.model
        return {"linear_backend": model.linear_backend, "linear_probe": model.linear_probe,
                "weights_huge_pages": model.weight_memory.describe(), "lm_head_into": self.lm_head_into,
                "compile": model.compile_status, "decoder_stack": describe_stack(model), **self.backends.describe(),
                "threads": torch.get_num_threads()}

    def check_health(self) -> None:
        """In process there is nothing to lose between steps."""

    def restart(self) -> None:
        """Nothing to restart: a failed step leaves the model and its pools usable."""

    def shutdown(self) -> None:
        """Holds no process or connection: nothing to stop."""

    def execute(self, plan: SchedulerOutput) -> torch.Tensor:
        """Run the plan; returns logits [num sampling sequences, vocab] in plan order, in the LM
        head's dtype (the ``Executor`` contract), valid until the next call (``execute_model_input``
        reuses their memory, see paged/models/logits_buffers.py)."""
        with self.timer.phase("prepare"):
            model_input = build_model_input(plan, self.block_size)
        return self.execute_model_input(model_input, fp32=False)

    @torch.inference_mode()
    def execute_model_input(self, inp: ModelInput, fp32: bool = True) -> torch.Tensor:
        """The logits of ``inp.logits_indices``: fp32, or with ``fp32=False`` in the LM head's dtype."""
        with self.timer.phase("prepare"):
            if self.kv_cache is not None:
                self.kv_cache.apply(inp.swap_out, inp.swap_in, inp.copies, inp.prefix_offload, inp.prefix_load)
            dev = self.device
            input_ids = torch.tensor(inp.input_ids, dtype=torch.long, device=dev)
            positions = torch.tensor(inp.positions, dtype=torch.long, device=dev)
            block_tables = torch.from_numpy(inp.block_tables).to(dev)
            meta = AttentionMetadata(
                slot_mapping=torch.tensor(inp.slot_mapping, dtype=torch.long, device=dev),
                block_tables=block_tables,
                seq_lens=torch.tensor(inp.seq_lens, dtype=torch.int32, device=dev),
                query_start_loc=torch.tensor(inp.query_start_loc, dtype=torch.int32, device=dev),
                backend=self.backends.attention,
                seq_slots=block_tables[:, 0].contiguous() if self.contiguous else None,
            )
            logits_indices = torch.tensor(inp.logits_indices, dtype=torch.long, device=dev)
        with self.timer.phase("forward_other"):
            hidden = self.model(input_ids, positions, self.layer_caches, meta)
            if not inp.logits_indices:
                return torch.empty(0, self.args.vocab_size)
            if len(inp.logits_indices) != hidden.shape[0]:
                hidden = hidden[logits_indices]
            return self.model.compute_logits(hidden, self.logits_buffers, fp32=fp32).to("cpu")
