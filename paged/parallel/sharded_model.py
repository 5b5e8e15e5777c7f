"""Build one rank's shard of a Llama-family model and load only its slices of the checkpoint.

The model class is the ordinary one (``paged.models.llama.LlamaForCausalLM``), built from
per-rank sizes (``partition.local_model_args``) so its QKV and gate/up linears are the column
shards; o_proj / down_proj become row-parallel and the embedding and LM head vocab-parallel
(``paged.parallel.layers``). Weights are read with ``safe_open(...).get_slice(name)[rows]``, so a
rank touches only the bytes of its own shards (plus the small replicated norms).

With ``ParallelContext.single()`` this builds and loads the unsharded model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open

from paged.models.llama import LlamaForCausalLM, ModelArgs, rope_inverse_frequencies
from paged.parallel.context import ParallelContext
from paged.parallel.layers import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from paged.parallel.partition import ShardLayout, layout_for, local_model_args


def shard_modules(model: LlamaForCausalLM, layout: ShardLayout, ctx: ParallelContext) -> None:
    """Swap in the vocab-parallel embedding / LM head and make o_proj, down_proj row-parallel."""
    hidden = model.args.hidden_size
    model.embed_tokens = VocabParallelEmbedding(layout, hidden, ctx)
    model.lm_head = ParallelLMHead(layout, hidden, model.embed_tokens if model.args.tie_word_embeddings else None)
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, ctx)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, ctx)


def build_sharded_model(model_dir: str | Path, ctx: ParallelContext, dtype: torch.dtype,
                        device: str = "cpu") -> tuple[LlamaForCausalLM, ShardLayout]:
    """This rank's model (weights loaded, eval mode) and its layout. ``model.args`` holds the
    per-rank head and MLP sizes; the vocabulary size there is the real (unpadded) one."""
    args = ModelArgs.from_checkpoint(model_dir)
    layout = layout_for(args, ctx.world_size, ctx.rank)
    with torch.device("meta"):
        model = LlamaForCausalLM(local_model_args(args, layout))
        shard_modules(model, layout, ctx)
    # to_empty materializes in the default dtype and unties shared parameters: fix both.
    model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(args).to(device)  # RoPE angles stay fp32
    load_sharded_weights(model, model_dir, layout)
    return model.eval(), layout


class _CheckpointSlices:
    """Reads slices of named tensors across the checkpoint's safetensors files, remembering which
    names were read so leftovers can be reported."""

    def __init__(self, files: list[Path], stack: contextlib.ExitStack):
        self.readers = {}
        for file in files:
            reader = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in reader.keys():
                self.readers[name] = reader
        self.read: set[str] = set()
        self.model_dir = files[0].parent

    def __contains__(self, name: str) -> bool:
        return name in self.readers

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if name not in self.readers:
            raise ValueError(f"checkpoint {self.model_dir!s} lacks weight {name}")
        self.read.add(name)
        tensor_slice = self.readers[name].get_slice(name)
        rows = rows or slice(None)
        return tensor_slice[rows] if cols is None else tensor_slice[rows, cols]


def _put(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"weight {what}: checkpoint slice shape {tuple(value.shape)} != {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def load_sharded_weights(model: LlamaForCausalLM, model_dir: str | Path, layout: ShardLayout) -> None:
    """Copy this rank's slices of every HF weight into ``model`` (built by ``build_sharded_model``)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir!s} (pickle checkpoints are not loaded)")
    args = model.args
    q, kv, inter, vocab = layout.q_rows(), layout.kv_rows(), layout.intermediate_rows(), layout.vocab_rows()
    with contextlib.ExitStack() as stack:
        ckpt = _CheckpointSlices(files, stack)

        def put_vocab(param: torch.Tensor, name: str) -> None:
            # The last rank's shard may run past the vocabulary: those padding rows stay zero.
            with torch.no_grad():
                param.zero_()
            _put(param[:layout.num_real_vocab_rows], ckpt.get(name, rows=vocab), name)

        put_vocab(model.embed_tokens.weight, "model.embed_tokens.weight")
        if not args.tie_word_embeddings:
            put_vocab(model.lm_head.weight, "lm_head.weight")
        elif "lm_head.weight" in ckpt:
            ckpt.read.add("lm_head.weight")  # a tied checkpoint may still store the copy: unused
        _put(model.norm.weight, ckpt.get("model.norm.weight"), "model.norm.weight")
        for i, layer in enumerate(model.layers):
            src = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            for norm in ("input_layernorm", "post_attention_layernorm"):
                _put(getattr(layer, norm).weight, ckpt.get(src + f"{norm}.weight"), src + norm)
            # The rank's fused QKV is [its q heads; its k heads; its v heads], bias likewise.
            for part in ("weight", "bias") if args.attention_bias else ("weight",):
                fused = torch.cat([ckpt.get(src + f"self_attn.q_proj.{part}", rows=q),
                                   ckpt.get(src + f"self_attn.k_proj.{part}", rows=kv),
                                   ckpt.get(src + f"self_attn.v_proj.{part}", rows=kv)])
                _put(getattr(attn.qkv_proj, part), fused, src + f"self_attn.qkv_proj.{part}")
            _put(attn.o_proj.weight, ckpt.get(src + "self_attn.o_proj.weight", cols=q), src + "self_attn.o_proj")
            gate_up = torch.cat([ckpt.get(src + "mlp.gate_proj.weight", rows=inter),
                                 ckpt.get(src + "mlp.up_proj.weight", rows=inter)])
            _put(mlp.gate_up_proj.weight, gate_up, src + "mlp.gate_up_proj")
            _put(mlp.down_proj.weight, ckpt.get(src + "mlp.down_proj.weight", cols=inter), src + "mlp.down_proj")
        leftovers = [n for n in ckpt.readers if n not in ckpt.read and not n.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ValueError(f"checkpoint has weights this model does not use: {leftovers[:5]}")
