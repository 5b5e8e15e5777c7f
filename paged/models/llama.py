"""The Llama family (Llama 2/3, Mistral, Qwen2) as plain PyTorch over a paged KV cache.

Weights come from an HF checkpoint directory (config.json + *.safetensors; no pickle, no remote
code). The forward pass takes one flat batch: the scheduled tokens of every sequence back to back,
with the attention metadata that the kernels contract needs. The arithmetic follows the HF
reference op for op (RMSNorm in fp32, rotate-half RoPE). Two speed paths, each chosen at load by
measuring it on this host, change only the order of additions: GEMMs through our packed kernel or
oneDNN with prepacked weights (``paged_kernels.linear``) and torch.compile'd dense regions
(``forward_ops``). So greedy outputs equal HF's except where its two best logits tie to within the
last bits. ``quantization="int8"`` (weight-only) is the one option that changes the arithmetic.

Past ~350 lines on purpose: the model, its config parsing and its checkpoint loading are one
family's definition, read together against HF's.
"""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from paged_kernels.linear import BACKENDS as LINEAR_BACKENDS
from paged_kernels.linear import Linear, LinearPlan, bind_linear, path_unavailable_reason, probe_linear_plan
from paged.models.decoder_stack import DecoderStack
from paged.models.forward_ops import EAGER_PLAN, DenseOps, TimedOps, compile_dense_ops, rms_norm
from paged.models.logits_buffers import LogitsBuffers
from paged.models.weight_memory import HugePageWeights, move_to_huge_pages

if TYPE_CHECKING:
    from paged.backends import AttentionBackend

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# A config.json without ``architectures`` (some conversions leave it out) is read by its model_type.
MODEL_TYPE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM"}
# GEMM probe results by (shapes and calls, dtype, thread, threads): a process that loads a model
# again (tests, a reload) reuses the first measurement, so its models run the same GEMM paths.
_LINEAR_PROBES: dict = {}


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> "ModelArgs":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json in {model_dir!s}: not an HF checkpoint directory")
        cfg = json.loads(path.read_text())
        archs = cfg.get("architectures") or []
        if archs:
            arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        else:
            arch = MODEL_TYPE_ARCHITECTURES.get(cfg.get("model_type"))
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta / rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = cfg["num_attention_heads"]
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "MistralForCausalLM") else None
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def rope_inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        blend = (original / wavelength - low) / (high - low)
        smoothed = (1 - blend) * scaled / factor + blend * scaled
        in_between = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(in_between, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass
class AttentionMetadata:
    """The flat batch's view of the paged cache (see paged_kernels.paged_attention), or, with
    ``seq_slots`` set, of a contiguous one (paged_kernels.contiguous_attention: sequence i in slot
    ``seq_slots[i]``; ``block_tables`` then holds the same slots as one-entry tables)."""
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    backend: "AttentionBackend | None" = None   # the engine's, resolved at load; None: by device
    workspace: dict = field(default_factory=dict)  # per-step scratch the kernels share across layers
    seq_slots: torch.Tensor | None = None       # int32 [num_seqs]: kv_memory virtual


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = args.num_heads * args.head_dim
        kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * kv_size, bias=args.attention_bias)
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=False)
        self.scale = args.head_dim ** -0.5

    def bind(self, rows: int, ops: DenseOps) -> "BoundAttention":
        return BoundAttention(ops.gemm(bind_linear(self.qkv_proj, rows)), ops.rotary, ops.attention,
                              ops.gemm(bind_linear(self.o_proj, rows)), self.num_heads, self.num_kv_heads,
                              self.head_dim, self.scale)


@dataclass(frozen=True, slots=True)
class BoundAttention:
    qkv_proj: Callable
    rotary: Callable
    attention: Callable
    o_proj: Callable
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    def __call__(self, h, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Attention output after o_proj for the normalised hidden states ``h``."""
        q, k, v = self.rotary(self.qkv_proj(h), cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        out = self.attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(h.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.gate_up_proj.fuse_silu_and_mul = True  # the packed kernel writes SiLU(gate) * up
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def bind(self, rows: int, ops: DenseOps) -> "BoundMLP":
        """SiLU(gate) * up in the GEMM's epilogue where the GEMM path fuses it, else the GEMM, then ``ops.silu_mul``."""
        gate_up = self.gate_up_proj
        if isinstance(gate_up, Linear) and gate_up.fuses_silu_and_mul(rows):
            silu_gate_up = ops.gemm(gate_up.bind_silu_and_mul(rows))
        else:
            gemm, silu_mul = ops.gemm(bind_linear(gate_up, rows)), ops.silu_mul
            silu_gate_up = lambda h: silu_mul(gemm(h))  # noqa: E731
        return BoundMLP(silu_gate_up, ops.gemm(bind_linear(self.down_proj, rows)))


@dataclass(frozen=True, slots=True)
class BoundMLP:
    silu_gate_up: Callable
    down_proj: Callable

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.silu_gate_up(h))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def bind(self, rows: int, ops: DenseOps) -> "BoundDecoderLayer":
        """This layer's forward pass for steps of ``rows`` tokens (and every count in the same
        row range of the GEMM plan and of ``ops``), with its kernels chosen: see ``BoundDecoderLayer``."""
        return BoundDecoderLayer(self.input_layernorm.weight, self.post_attention_layernorm.weight,
                                 self.input_layernorm.eps, ops.add_norm, self.self_attn.bind(rows, ops),
                                 self.mlp.bind(rows, ops))


@dataclass(frozen=True, slots=True)
class BoundDecoderLayer:
    """A decoder layer's forward pass as plain calls: the modules hold the parameters under the
    checkpoint's names; binding picks each GEMM's path and the dense ops once per row range, so a
    step makes no choice per call and no module call (on a 30-layer model at batch 1 those cost
    ~15% of the step, see docs/performance.md)."""
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    eps: float
    add_norm: Callable
    attention: BoundAttention
    mlp: BoundMLP

    def __call__(self, delta, residual, cos, sin, kv_cache, meta: AttentionMetadata):
        """Adds the previous layer's MLP output ``delta`` to the ``residual`` stream (None and
        the embeddings for the first layer); returns (this layer's MLP output, residual). An
        output is added by the next norm, so every add and norm run as one region."""
        if delta is None:
            h = rms_norm(residual, self.input_norm, self.eps)
        else:
            h, residual = self.add_norm(delta, residual, self.input_norm, self.eps)
        h, residual = self.add_norm(self.attention(h, cos, sin, kv_cache, meta), residual, self.post_attention_norm,
                                    self.eps)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """See the module docstring. After ``from_pretrained``: ``linear_backend`` (the GEMM path,
    e.g. "onednn"), ``linear_probe`` (the measured figures behind it), ``compile_status``, and
    ``step_timer`` (set it to a ``paged.step_timer.StepTimer`` to charge GEMMs and attention)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(args), persistent=False)
        self.dense_plan = EAGER_PLAN
        self.step_timer = None
        self.timed_ops: TimedOps | None = None
        self.linear_plan: LinearPlan | None = None
        self.bound: dict = {}  # (GEMM plan's row range, ops) -> the bound layers and stack (``bound_layers``)
        self._fuse_layers = True
        self.linear_backend = "torch"
        self.linear_probe: dict = {}
        self.weight_memory = HugePageWeights(reason="no plan applied yet")
        self.compile_status: dict = {"requested": False, "active": False}

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]

    @property
    def fuse_layers(self) -> bool:
        """Whether a step runs its decoder layers as one ``decoder_layers`` call where every GEMM of
        its row range is packed (paged/models/decoder_stack.py). Setting it binds the layers anew."""
        return self._fuse_layers

    @fuse_layers.setter
    def fuse_layers(self, fuse: bool) -> None:
        self._fuse_layers, self.bound = fuse, {}

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm for every token of the flat batch."""
        ops, layers, stack = self.bound_layers(input_ids.shape[0])
        residual = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, residual.dtype)
        if stack is not None and stack.takes(residual, kv_caches, meta):
            return stack(residual, cos, sin, kv_caches, meta)
        delta = None
        for layer, kv_cache in zip(layers, kv_caches):
            delta, residual = layer(delta, residual, cos, sin, kv_cache, meta)
        return ops.add_norm(delta, residual, self.norm.weight, self.norm.eps)[0]

    def bound_layers(self, rows: int) -> tuple[DenseOps, list[BoundDecoderLayer], DecoderStack | None]:
        """The ops, the bound layers and, where every GEMM of the row range is packed, the whole
        stack as one compiled call (``decoder_stack``), for a step of ``rows`` tokens. Bound once
        per row range of the GEMM plan and of the dense ops (or of the step timer's ops), then
        reused; choosing a GEMM plan or compiling the dense regions starts over."""
        timer = self.step_timer
        if timer is not None and timer.enabled:
            if self.timed_ops is None or self.timed_ops.timer is not timer:
                self.timed_ops = TimedOps(timer)
            ops = self.timed_ops
        else:
            ops = self.dense_plan.ops_for(rows)
        key = (0 if self.linear_plan is None else self.linear_plan.bucket(rows), ops)
        bound = self.bound.get(key)
        if bound is None:
            stack = DecoderStack.bind(self, rows, ops) if self.fuse_layers else None
            bound = self.bound[key] = ([layer.bind(rows, ops) for layer in self.layers], stack)
        return ops, *bound

    def compute_logits(self, hidden: torch.Tensor, buffers: LogitsBuffers | None = None,
                       fp32: bool = True) -> torch.Tensor:
        """Logits [rows, vocab] of the final hidden states [rows, hidden_size]: fp32, or with
        ``fp32=False`` the LM head's own output (the model's dtype; an fp32 copy of bf16 values
        is exact, so whoever needs fp32 converts them). With ``buffers`` they are written into
        memory reused from call to call (the LM head's own output too, where its path writes in
        place): valid until the next call with them."""
        timer = self.step_timer
        if timer is not None and timer.enabled:
            with timer.phase("gemm"):
                return self._logits(hidden, buffers, fp32)
        return self._logits(hidden, buffers, fp32)

    def _logits(self, hidden: torch.Tensor, buffers: LogitsBuffers | None, fp32: bool) -> torch.Tensor:
        head = self.lm_head  # a Linear, or a tensor-parallel rank's vocabulary shard
        rows = hidden.shape[0]
        head_out = None
        if buffers is not None and hasattr(head, "forward_into"):
            vocab = head.out_features
            head_out = buffers.rows(rows, vocab, hidden.dtype, hidden.device)
        if head_out is None:
            return head(hidden).float() if fp32 else head(hidden)
        head.forward_into(hidden, head_out)
        if head_out.dtype == torch.float32 or not fp32:
            return head_out
        return buffers.rows(rows, vocab, torch.float32, hidden.device).copy_(head_out)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype, device: str = "cpu", *,
                        compile: bool = False, linear_backend: str | None = None,
                        quantization: str | None = None) -> "LlamaForCausalLM":
        """Load an HF checkpoint. ``linear_backend``: "packed", "onednn", "torch" or None (measure
        them on this host, see ``paged_kernels.linear``); ``quantization``: None or "int8"
        (weight-only int8 linear layers). ``compile``: torch.compile the dense regions now and
        keep them where a probe finds them faster (see ``forward_ops``; a broken compiler falls
        back to eager with a warning). Off by default: on the 2-core AMD EPYC host it was measured
        on (bench/model_step.py), compiled regions everywhere cost 1.5-1.7 ms more per decode
        step at 1-8 tokens (dynamo's per-call overhead), and the probe keeps only compiled RoPE
        on steps of 362+ tokens, worth ~5% of a 2048-token prefill step: not worth seconds of
        compilation at load and a C++ toolchain at run time."""
        args = ModelArgs.from_checkpoint(model_dir)
        with torch.device("meta"):
            model = cls(args)
        # to_empty materializes in the default dtype and unties shared parameters: fix both.
        model.to_empty(device=device).to(dtype)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inverse_frequencies(args).to(device)  # RoPE angles stay fp32
        model.load_hf_weights(model_dir, dtype)
        return model.prepare_for_inference(dtype, device, compile=compile, linear_backend=linear_backend,
                                           quantization=quantization)

    def prepare_for_inference(self, dtype: torch.dtype, device: str, *, compile: bool = False,
                              linear_backend: str | None = None,
                              quantization: str | None = None) -> "LlamaForCausalLM":
        """After the weights are in (whole or a tensor-parallel shard): eval mode, the GEMM path
        for this host, and the compiled dense regions when asked for."""
        self.eval().requires_grad_(False)  # inference only; compiled regions guard on it
        self.choose_linear_backend(linear_backend, dtype, device, quantization)
        if compile:
            self.compile_dense()
        return self

    def compile_dense(self, always: bool = False) -> None:
        """Compile the dense regions and keep them where they measure faster (``always``: everywhere)."""
        args = self.args
        sizes = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_heads=args.num_heads,
                     num_kv_heads=args.num_kv_heads, head_dim=args.head_dim, eps=args.rms_norm_eps)
        self.dense_plan, self.compile_status = compile_dense_ops(sizes, self.norm.weight, always=always)
        self.bound = {}

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def choose_linear_backend(self, backend: str | None, dtype: torch.dtype, device: str,
                              quantization: str | None = None) -> None:
        """Give every Linear its plan: forced by ``backend``, or measured by the probe (None)."""
        if backend not in (None, *LINEAR_BACKENDS):
            raise ValueError(f"linear_backend must be None or one of {LINEAR_BACKENDS}, got {backend!r}")
        if quantization is not None and torch.device(device).type != "cpu":
            raise ValueError(f"quantization {quantization!r} runs on CPU only, not on {device}")
        if torch.device(device).type != "cpu":
            plan, self.linear_probe = LinearPlan.everywhere("torch", dtype), {"reason": f"device {device}"}
        elif backend is None:
            # Per distinct (shape, SiLU·up after it): calls per step; the probe times the fused
            # gate_up with its SiLU·up, as each path runs it in the model.
            calls: dict[tuple[int, int, bool], int] = {}
            weights: dict[tuple[int, int, bool], torch.Tensor] = {}
            for linear in self.linears():
                shape = (*linear.weight.shape, linear.fuse_silu_and_mul)
                calls[shape] = calls.get(shape, 0) + 1
                weights[shape] = linear.weight
            key = (tuple(calls.items()), dtype, quantization, threading.get_ident(), torch.get_num_threads())
            if key not in _LINEAR_PROBES:
                _LINEAR_PROBES[key] = probe_linear_plan([(weights[s], calls[s], s[2]) for s in weights], dtype,
                                                        quantization=quantization)
            plan, self.linear_probe = _LINEAR_PROBES[key].plan, dict(_LINEAR_PROBES[key].figures)
        else:
            reason = path_unavailable_reason(backend, dtype, quantization)
            if reason is not None:
                raise ValueError(f"linear_backend {backend!r} cannot run {dtype} here: {reason}")
            plan, self.linear_probe = LinearPlan.everywhere(backend, dtype, quantization), {"forced": backend}
        for linear in self.linears():
            linear.apply_plan(plan)
        self.linear_plan, self.bound = plan, {}
        self.linear_backend = plan.describe()
        self.linear_probe["plan"] = self.linear_backend
        if torch.device(device).type == "cpu":
            self.weight_memory = move_to_huge_pages(self.linears())
        else:
            self.weight_memory = HugePageWeights(reason=f"device {device}")

    def load_hf_weights(self, model_dir: str | Path, dtype: torch.dtype) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors weights in {model_dir!s} (pickle checkpoints are not loaded)")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():
                    tensors[name] = reader.get_tensor(name)
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(target: str, value: torch.Tensor) -> None:
            param = params[target]
            if param.shape != value.shape:
                raise ValueError(f"weight {target}: checkpoint shape {tuple(value.shape)} != {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value.to(dtype))
            loaded.add(target)

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"checkpoint {model_dir!s} lacks weight {name}")
            return tensors.pop(name)

        put("embed_tokens.weight", take("model.embed_tokens.weight"))
        put("norm.weight", take("model.norm.weight"))
        if not self.args.tie_word_embeddings:
            put("lm_head.weight", take("lm_head.weight"))
        tensors.pop("lm_head.weight", None)
        for i in range(self.args.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            put(dst + "input_layernorm.weight", take(src + "input_layernorm.weight"))
            put(dst + "post_attention_layernorm.weight", take(src + "post_attention_layernorm.weight"))
            put(dst + "self_attn.qkv_proj.weight", torch.cat(
                [take(src + f"self_attn.{p}_proj.weight") for p in "qkv"]))
            if self.args.attention_bias:
                put(dst + "self_attn.qkv_proj.bias", torch.cat(
                    [take(src + f"self_attn.{p}_proj.bias") for p in "qkv"]))
            put(dst + "self_attn.o_proj.weight", take(src + "self_attn.o_proj.weight"))
            put(dst + "mlp.gate_up_proj.weight", torch.cat(
                [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]))
            put(dst + "mlp.down_proj.weight", take(src + "mlp.down_proj.weight"))
        leftovers = [n for n in tensors if not n.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise ValueError(f"checkpoint has weights this model does not use: {leftovers[:5]}")
        missing = set(params) - loaded - ({"lm_head.weight"} if self.args.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"weights not loaded: {sorted(missing)[:5]}")
