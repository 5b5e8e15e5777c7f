"""Every decoder layer of a step in one call to the compiled CPU library (``decoder_layers``).

``BoundDecoderLayer`` runs a layer as ~9 Python calls into compiled kernels (GEMMs, norms, RoPE,
the KV write, attention). Each costs a few microseconds of wrappers, checks and dispatch besides its
kernel: on the 30-layer default model at 4 rows that is ~1.3 ms of a ~7.4 ms decode step. Where a
row range runs every GEMM on the packed kernel, the dense ops eagerly and attention on the compiled
kernel, the model instead hands the whole stack to ``torch.ops.paged_cpu.decoder_layers``
(kernels/paged_kernels/csrc/decoder_cpu.cpp), which calls the same ops in the same order from C++:
the same bits, without the Python between them.

``DecoderStack.bind`` says for a row range whether that holds (and why not, where it does not);
the model falls back to its bound layers otherwise, and whenever a step's tensors fall outside the
contract (``DecoderStack.takes``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from paged.models.forward_ops import EAGER_OPS
from paged_kernels import cpu_extension
from paged_kernels.linear import Linear
from paged_kernels.torch_impl import MAX_COMPILED_HEAD_DIM

# GEMMs of a layer in the order the op takes their weights, out_features and int8 scales.
GEMMS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def unfused_reason(model, rows: int, ops) -> str | None:
    """Why steps of ``rows`` tokens cannot run as one ``decoder_layers`` call, or None when they can.
    ``ops``: the dense ops the model binds for these rows (``forward_ops.DenseOps``)."""
    if ops is not EAGER_OPS:
        return "the dense ops are compiled or timed for these rows"
    args = model.args
    if args.head_dim % 2 or args.head_dim > MAX_COMPILED_HEAD_DIM:
        return f"head_dim {args.head_dim} is outside the compiled kernels' range"
    norm_dtype = model.norm.weight.dtype
    if norm_dtype not in (torch.float32, torch.bfloat16) or model.norm.weight.device.type != "cpu":
        return f"the packed kernel does not run {norm_dtype} on {model.norm.weight.device}"
    for layer in model.layers:
        if layer.self_attn.num_heads != args.num_heads or layer.self_attn.num_kv_heads != args.num_kv_heads:
            return "the attention heads are sharded (tensor parallel)"
        for name in GEMMS:
            linear = layer.get_submodule(name)
            if type(linear) is not Linear or linear.plan is None or linear.packed is None:
                return f"{name} is not a packed Linear"
            if linear.plan.path_for(rows) != "packed":
                return f"the GEMM plan gives {rows} rows the {linear.plan.path_for(rows)} path"
            if linear.packed.silu_and_mul != (name == "mlp.gate_up_proj"):
                return f"{name} is not packed as the layer runs it"
    # Last: on a GPU host the checks above answer without building the CPU library.
    library = cpu_extension.load()
    if library is None or not hasattr(library, "decoder_layers"):
        return "the compiled CPU kernels are unavailable"
    return None


@dataclass(frozen=True)
class DecoderStack:
    """The arguments of ``decoder_layers`` that do not change from step to step: the weights as
    the packed kernel reads them, gathered at bind time. That is safe because the model binds
    lazily and starts over whenever its weights change place: ``choose_linear_backend`` applies
    a plan, moves the weights to huge pages and drops the bound layers in one go."""
    run: Callable[..., torch.Tensor]
    input_norms: list
    post_attention_norms: list
    final_norm: torch.Tensor
    eps: float
    qkv: list
    qkv_bias: list
    o_proj: list
    gate_up: list
    down: list
    scales: list
    out_features: list
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype

    @classmethod
    def bind(cls, model, rows: int, ops) -> "DecoderStack | None":
        """The stack for steps of ``rows`` tokens, or None where ``unfused_reason`` gives one."""
        if unfused_reason(model, rows, ops) is not None:
            return None
        layers, args = list(model.layers), model.args
        packed = [[layer.get_submodule(name).packed for name in GEMMS] for layer in layers]
        has_bias = packed[0][0].bias is not None
        has_scales = packed[0][0].scales is not None
        return cls(
            run=cpu_extension.load().decoder_layers.default,
            input_norms=[layer.input_layernorm.weight for layer in layers],
            post_attention_norms=[layer.post_attention_layernorm.weight for layer in layers],
            final_norm=model.norm.weight,
            eps=model.norm.eps,
            qkv=[gemms[0].data for gemms in packed],
            qkv_bias=[gemms[0].bias for gemms in packed] if has_bias else [],
            o_proj=[gemms[1].data for gemms in packed],
            gate_up=[gemms[2].data for gemms in packed],
            down=[gemms[3].data for gemms in packed],
            scales=[weight.scales for gemms in packed for weight in gemms] if has_scales else [],
            out_features=[weight.out_features for weight in packed[0]],
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            scale=layers[0].self_attn.scale,
            dtype=model.norm.weight.dtype,
        )

    def takes(self, residual: torch.Tensor, kv_caches, meta) -> bool:
        """Whether this step's tensors are the contract's: the activations in the weights' dtype,
        caches of that dtype, attention on the compiled kernels (not Triton, not plain torch)."""
        backend = meta.backend
        if backend is not None and backend.name != "compiled":
            return False
        return residual.dtype == self.dtype and kv_caches[0][0].dtype == self.dtype

    def __call__(self, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches,
                 meta) -> torch.Tensor:
        """Hidden states after the final norm, as ``LlamaForCausalLM.forward`` computes them."""
        return self.run(residual, cos, sin, self.input_norms, self.post_attention_norms, self.final_norm, self.eps,
                        self.qkv, self.qkv_bias, self.o_proj, self.gate_up, self.down, self.scales,
                        self.out_features, [cache[0] for cache in kv_caches], [cache[1] for cache in kv_caches],
                        meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.seq_slots,
                        self.num_heads, self.num_kv_heads, self.head_dim, self.scale)


def describe_stack(model) -> str:
    """Which step sizes run the decoder layers as one call, for reports: e.g. 'one call for rows
    1-128; per layer (the GEMM plan gives 129 rows the onednn path) for rows 129-'."""
    limits = set(model.dense_plan.limits)
    if model.linear_plan is not None:
        limits |= set(model.linear_plan.limits)
    ranges: list[list] = []  # [first row, last row, what runs]
    low = 1
    for high in sorted(limits):
        reason = unfused_reason(model, low, model.dense_plan.ops_for(low)) if model.fuse_layers else "turned off"
        what = "one call" if reason is None else f"per layer ({reason})"
        if ranges and ranges[-1][2] == what:
            ranges[-1][1] = high
        else:
            ranges.append([low, high, what])
        low = high + 1
    if len(ranges) == 1:
        return ranges[0][2]
    return "; ".join(f"{what} for rows {first}-{'' if last == math.inf else last}" for first, last, what in ranges)
