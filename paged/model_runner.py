"""Runs the model on one scheduled step: builds the flat batch, owns the KV caches, samples.

The step's scheduled tokens (each sequence's next ``num_new_tokens`` uncomputed tokens) become
one flat batch: input ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc. Only
sequences whose every token is computed after the step produce logits.
"""
from __future__ import annotations

import torch

from paged.config import EngineConfig
from paged.models.llama import AttentionMetadata, LlamaForCausalLM, ModelArgs
from paged.sequence import ScheduledSeq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCache:
    """Device pool and CPU swap pool, one tensor each: [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, args: ModelArgs, num_blocks: int, num_cpu_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str):
        shape = (args.num_layers, 2, num_blocks, block_size, args.num_kv_heads, args.head_dim)
        self.device_cache = torch.zeros(shape, dtype=dtype, device=device)
        cpu_shape = (args.num_layers, 2, num_cpu_blocks, block_size, args.num_kv_heads, args.head_dim)
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

    def swap_out(self, pairs):
        self._copy(self.cpu_cache, self.device_cache, pairs)

    def swap_in(self, pairs):
        self._copy(self.device_cache, self.cpu_cache, pairs)

    def copy_blocks(self, pairs):
        self._copy(self.device_cache, self.device_cache, pairs)


class ModelRunner:
    def __init__(self, config: EngineConfig, args: ModelArgs, num_blocks: int, num_cpu_blocks: int):
        self.config = config
        self.args = args
        self.block_size = config.block_size
        self.device = config.device
        self.dtype = DTYPES[config.dtype]
        self.model = LlamaForCausalLM.from_pretrained(config.model, self.dtype, self.device)
        self.kv_cache = KVCache(args, num_blocks, num_cpu_blocks, config.block_size, self.dtype, self.device)
        self.layer_caches = self.kv_cache.layer_caches()

    def prepare(self, scheduled: list[ScheduledSeq], block_tables: list[list[int]]):
        """Flat tensors for one step. ``block_tables[i]`` is the table of ``scheduled[i]``."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        logits_indices: list[int] = []
        for item, table in zip(scheduled, block_tables):
            seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            end = start + count
            if count == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + count)
            if item.samples:
                logits_indices.append(query_start_loc[-1] - 1)
        max_blocks = max(-(-n // bs) for n in seq_lens)
        padded = [t[:max_blocks] + [0] * (max_blocks - min(len(t), max_blocks)) for t in block_tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            backend=self.config.attention_backend,
        )
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta,
                torch.tensor(logits_indices, dtype=torch.long, device=dev))

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], block_tables: list[list[int]]) -> torch.Tensor:
        """Run the step; returns fp32 logits [num_sampling_seqs, vocab] in ``scheduled`` order."""
        input_ids, positions, meta, logits_indices = self.prepare(scheduled, block_tables)
        hidden = self.model(input_ids, positions, self.layer_caches, meta)
        if logits_indices.numel() == 0:
            return torch.empty(0, self.args.vocab_size)
        return self.model.compute_logits(hidden[logits_indices]).to("cpu")
