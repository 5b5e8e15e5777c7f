"""One step on one rank: the plan the engine broadcasts and the rank's runner that applies it.

``StepPlan`` is everything a rank needs for a step, as flat Python lists (cheap to pickle, the
same on every rank): the flat batch, the block tables (identical on all ranks: the same block id
indexes every rank's own pool, which holds only that rank's KV heads), the rows whose logits are
wanted, and the block swaps and copy-on-write copies to apply to the KV pools first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paged.model_runner import KVCache
from paged.models.llama import AttentionMetadata, LlamaForCausalLM


@dataclass
class StepPlan:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]             # per sequence: KV length including this step's tokens
    query_start_loc: list[int]      # num_seqs + 1 cumulative query lengths
    block_tables: list[list[int]]   # per sequence, unpadded
    logits_indices: list[int]       # flat-batch rows that produce logits, in sampling order
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, cpu block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)   # (cpu block, device block)
    copies: list[tuple[int, int]] = field(default_factory=list)    # (src block, dst block)

    @property
    def num_logits_rows(self) -> int:
        return len(self.logits_indices)


class ShardRunner:
    """A rank's model shard and KV pool; ``execute`` runs one plan and returns this rank's logits."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, block_size: int, device: str,
                 attention_backend: str | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.layer_caches = kv_cache.layer_caches()
        self.block_size = block_size
        self.device = device
        self.attention_backend = attention_backend

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Apply the plan's swaps and copies, run the forward; fp32 logits of this rank's vocabulary
        shard for ``plan.logits_indices`` (``[rows, vocab_per_rank]``, on the rank's device).

        Every rank runs the forward even when no row wants logits: the collectives inside need all.
        """
        self.kv_cache.swap_out(plan.swap_out)
        self.kv_cache.swap_in(plan.swap_in)
        self.kv_cache.copy_blocks(plan.copies)
        dev = self.device
        width = max(len(table) for table in plan.block_tables)
        tables = [table + [0] * (width - len(table)) for table in plan.block_tables]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(plan.slot_mapping, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(plan.seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(plan.query_start_loc, dtype=torch.int32, device=dev),
            backend=self.attention_backend,
        )
        input_ids = torch.tensor(plan.input_ids, dtype=torch.long, device=dev)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, positions, self.layer_caches, meta)
        rows = torch.tensor(plan.logits_indices, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[rows])
