"""Run under torchrun (gloo): every sharded layer against its unsharded twin, on random weights.

Every rank draws the same full weights from one seed, keeps its shard, runs the sharded layer and
compares with the full layer. Rank 0 writes ``{case: {"max_error": float, "ranks_agree": bool}}``
to the JSON path given as the only argument; test_tp_layers.py asserts on it.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from paged.models.llama import MLP, Attention, AttentionMetadata, ModelArgs
from paged.models.forward_ops import EAGER_OPS
from paged.parallel import shm_allreduce
from paged.parallel.context import ParallelContext
from paged.parallel.layers import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from paged.parallel.partition import layout_for, local_model_args
from paged.parallel.shared_segment import SharedSegment
from paged.parallel.shm_allreduce import ShmAllReduce

HIDDEN, HEAD_DIM, INTERMEDIATE, TOKENS = 64, 16, 96, 7


def model_args(num_heads: int, num_kv_heads: int, vocab: int = 101, bias: bool = False) -> ModelArgs:
    return ModelArgs(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=HIDDEN,
                     intermediate_size=INTERMEDIATE, num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=HEAD_DIM, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                     max_position_embeddings=64, tie_word_embeddings=False, attention_bias=bias,
                     sliding_window=None, bos_token_id=1, eos_token_ids=[2])


def randomize(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return module


def ranks_agree(x: torch.Tensor) -> bool:
    """True when every rank holds bit-identical ``x`` (ranks must never drift apart)."""
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def result(sharded: torch.Tensor, full: torch.Tensor) -> dict:
    return {"max_error": float((sharded - full).abs().max()), "ranks_agree": ranks_agree(sharded)}


def check_mlp(ctx: ParallelContext) -> dict:
    """Column-parallel gate/up and row-parallel down with its all-reduce."""
    args = model_args(8, 2)
    layout = layout_for(args, ctx.world_size, ctx.rank)
    full = randomize(MLP(args), seed=1)
    shard = MLP(local_model_args(args, layout))
    gate, up = full.gate_up_proj.weight.split(INTERMEDIATE)
    rows = layout.intermediate_rows()
    with torch.no_grad():
        shard.gate_up_proj.weight.copy_(torch.cat([gate[rows], up[rows]]))
        shard.down_proj.weight.copy_(full.down_proj.weight[:, rows])
    shard.down_proj = RowParallelLinear(shard.down_proj, ctx)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(2))
    return result(shard.bind(TOKENS, EAGER_OPS)(x), full.bind(TOKENS, EAGER_OPS)(x))


def check_attention(ctx: ParallelContext, num_heads: int, num_kv_heads: int, bias: bool) -> dict:
    """Column-parallel QKV, this rank's KV heads in its own paged cache, row-parallel o_proj."""
    args = model_args(num_heads, num_kv_heads, bias=bias)
    layout = layout_for(args, ctx.world_size, ctx.rank)
    full = randomize(Attention(args), seed=3)
    shard = Attention(local_model_args(args, layout))
    q_size, kv_size = num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM
    q, kv = layout.q_rows(), layout.kv_rows()
    with torch.no_grad():
        for part in ("weight", "bias") if bias else ("weight",):
            wq, wk, wv = getattr(full.qkv_proj, part).split([q_size, kv_size, kv_size])
            getattr(shard.qkv_proj, part).copy_(torch.cat([wq[q], wk[kv], wv[kv]]))
        shard.o_proj.weight.copy_(full.o_proj.weight[:, q])
    shard.o_proj = RowParallelLinear(shard.o_proj, ctx)

    block_size, num_blocks = 4, 4
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(TOKENS)
    angles = positions.float()[:, None] * (1.0 / 1e4 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    meta = AttentionMetadata(slot_mapping=torch.arange(TOKENS) + block_size,  # blocks 1 and 2
                             block_tables=torch.tensor([[1, 2]], dtype=torch.int32),
                             seq_lens=torch.tensor([TOKENS], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, TOKENS], dtype=torch.int32))

    def run(module, heads):
        shape = (num_blocks, block_size, heads, HEAD_DIM)
        cache = (torch.zeros(shape), torch.zeros(shape))
        return module.bind(TOKENS, EAGER_OPS)(x, cos, sin, cache, meta)

    return result(run(shard, layout.num_kv_heads), run(full, num_kv_heads))


def check_embedding(ctx: ParallelContext) -> dict:
    """Vocabulary 101 over the ranks (padded), including the ids on both sides of a shard edge."""
    args = model_args(8, 2)
    layout = layout_for(args, ctx.world_size, ctx.rank)
    full = torch.randn(args.vocab_size, HIDDEN, generator=torch.Generator().manual_seed(5))
    shard = VocabParallelEmbedding(layout, HIDDEN, ctx)
    with torch.no_grad():
        shard.weight.zero_()
        shard.weight[:layout.num_real_vocab_rows] = full[layout.vocab_rows()]
    edge = layout.vocab_per_rank
    ids = torch.tensor([0, 1, edge - 1, edge, edge + 1, args.vocab_size - 1, 7, edge])
    return result(shard(ids), F.embedding(ids, full))


def check_lm_head(ctx: ParallelContext) -> dict:
    """Each rank scores its vocabulary shard; concatenated and cut to the vocabulary they are the
    full logits."""
    args = model_args(8, 2)
    layout = layout_for(args, ctx.world_size, ctx.rank)
    full = torch.randn(args.vocab_size, HIDDEN, generator=torch.Generator().manual_seed(6))
    shard = ParallelLMHead(layout, HIDDEN)
    with torch.no_grad():
        shard.weight.zero_()
        shard.weight[:layout.num_real_vocab_rows] = full[layout.vocab_rows()]
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(7))
    local = shard(hidden)
    shards = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(shards, local)
    logits = torch.cat(shards, dim=-1)[:, :args.vocab_size]
    return result(logits, F.linear(hidden, full))


def check_shared_memory_all_reduce(ctx: ParallelContext) -> dict:
    """The shared-memory all-reduce against gloo's on the same inputs: several calls in a row (both
    slots reused), a tensor larger than a slot (chunked) and bf16. With 2 ranks a sum has one
    order, so the results must be bit-identical."""
    segment = SharedSegment.create(shm_allreduce.arena_bytes(ctx.world_size), "test-arena") if ctx.rank == 0 else None
    info = [segment.info if segment is not None else None]
    dist.broadcast_object_list(info, src=0)
    segment = segment or SharedSegment.attach(info[0])
    fast = ShmAllReduce(segment.payload, ctx.rank, ctx.world_size, timeout_s=60)
    generator = torch.Generator().manual_seed(10 + ctx.rank)
    inputs = [torch.randn(7, 64, generator=generator) for _ in range(5)]
    inputs.append(torch.randn(shm_allreduce.SLOT_BYTES // 4 * 3 // 2 + 3, generator=generator))
    inputs.append(torch.randn(33, 64, generator=generator).to(torch.bfloat16))
    worst, agree = 0.0, True
    for x in inputs:
        expected = x.clone()
        dist.all_reduce(expected)
        got = fast(x.clone())
        worst = max(worst, float((got.float() - expected.float()).abs().max()))
        agree = agree and ranks_agree(got)
    return {"max_error": worst, "ranks_agree": agree}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    ctx = ParallelContext.from_default_group()
    results = {
        "mlp": check_mlp(ctx),
        "attention_kv_split": check_attention(ctx, num_heads=8, num_kv_heads=2 * ctx.world_size, bias=False),
        "attention_kv_replicated": check_attention(ctx, num_heads=4 * ctx.world_size, num_kv_heads=1, bias=False),
        "attention_bias": check_attention(ctx, num_heads=8, num_kv_heads=2, bias=True),
        "embedding_padded_vocab": check_embedding(ctx),
        "lm_head_padded_vocab": check_lm_head(ctx),
        "shared_memory_all_reduce": check_shared_memory_all_reduce(ctx),
    }
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
