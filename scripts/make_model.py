#!/usr/bin/env python3
"""Build small, deterministic Llama-family Hugging Face checkpoints.

They are the project's small test model (``make tiny-model`` writes ``model-store/tiny-llama``) and
the models the tests compare our engine against ``transformers``.  Everything is made on the
machine: no model hub, no network, no remote code, no pickle.

Usage::

    python scripts/make_model.py --out model-store/tiny-llama [--preset tiny-llama]
    python scripts/make_model.py --out /tmp/q --preset tiny-qwen2 --tokenizer-dir model-store/tiny-llama

or, from Python, ``build_checkpoint(out_dir, preset="tiny-llama", tokenizer_dir=None)``.

What a checkpoint directory holds
---------------------------------
``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.  It loads with
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``.

``config.json`` carries RoPE settings in both spellings: the classic ``rope_theta`` /
``rope_scaling`` keys (what most hub checkpoints and transformers 4.x use) and the
transformers-5 ``rope_parameters`` dict.  They always agree; a reader may use either.

Presets (see ``PRESETS``)
-------------------------
* ``tiny-llama``  LlamaForCausalLM, hidden 512, intermediate 1408, 8 layers, 8 heads,
  2 KV heads (head_dim 64), untied embeddings, rope_theta 1e4, ~39M parameters.
* ``tiny-qwen2``  Qwen2ForCausalLM (bias on q/k/v), tied embeddings, hidden 256,
  intermediate 704, 4 layers, 4 heads, 1 KV head (head_dim 64), rope_theta 1e6.
* ``tiny-llama3`` LlamaForCausalLM with llama3 RoPE scaling (factor 8, low/high freq factor
  1/4, original_max_position_embeddings 256), head_dim 32, hidden 256, 8 heads, 4 KV heads,
  2 layers, rope_theta 5e5.
* ``tiny-odd-vocab`` the tiny-llama3 shapes with 16001 vocabulary rows (one beyond the
  tokenizer, its LM-head row zero): a vocabulary two tensor-parallel ranks cannot split evenly.

* ``qwen2-0.5b`` the shapes of Qwen2-0.5B (hidden 896, intermediate 4864, 24 layers, 14 heads,
  2 KV heads, vocab 151936, tied), random weights: the benchmark's 0.5 B-class checkpoint.

All but tiny-odd-vocab and qwen2-0.5b share vocab 16000, max_position_embeddings 2048, rms_norm_eps 1e-5 and the tokenizer.

Tokenizer
---------
Byte-level BPE trained with the ``tokenizers`` library on the Python standard library's own
``.py`` sources (the running interpreter's ``stdlib`` dir, test directories skipped, files in
sorted order, capped at ``CORPUS_BYTES``).  The 256 byte symbols are all in the initial
alphabet, so any UTF-8 string round-trips.  Special tokens: ``<unk>`` = 0, ``<s>`` = 1 (bos),
``</s>`` = 2 (eos, also used as pad).  A TemplateProcessing post-processor prepends ``<s>`` on
``encode`` like Llama does.  ``clean_up_tokenization_spaces`` is off so ``decode`` never
edits text.  ``padding_side`` is ``left`` (what batched ``generate`` needs).  The merges depend on the interpreter's stdlib sources: the same Python
version gives the same tokenizer; use ``tokenizer_dir`` to reuse one tokenizer everywhere.

The chat template renders each message as ``<|role|>\\ncontent\\n`` after a leading
``{{ bos_token }}`` (as Llama templates do); ``add_generation_prompt`` appends
``<|assistant|>\\n``.  So text rendered with ``tokenize=False`` already starts with ``<s>`` and
should be tokenized with ``add_special_tokens=False`` (which is what
``apply_chat_template(tokenize=True)`` and vLLM's chat route do).

Weights, and why they are not the usual 0.02-std init
-----------------------------------------------------
The weights are random (``torch.Generator`` seeded per preset, CPU, float32), drawn in a
fixed parameter order after building the HF model from its config.  Default-style init
makes a poor *test* model: logits are nearly flat, attention is nearly uniform (so RoPE,
masking and KV-cache bugs barely change the output) and tiny float differences flip greedy
argmax ties.  The scales chosen here instead (``_init_weights``):

* q/k projections have a large std, so attention scores have std ~2 and attention is sharp
  and position-dependent: a wrong position, mask or cached block changes the output.
* the embedding, attention and MLP outputs are of comparable size in the residual stream, so
  the next token depends on context and not only on the last token.
* RMSNorm weights are ``1 + 0.1 * noise`` and the Qwen2 q/k/v biases are non-zero, so a
  loader or kernel that ignores them gives different outputs.
* the lm_head has a large std (the final hidden state is RMS-normalised, so logits have
  std ~ ``LM_HEAD_STD * sqrt(hidden)``, about 6 for tiny-llama), so the top-1/top-2 gap is
  large in absolute terms, and the eos row is scaled down so generations run to max_tokens.
* untied lm_head rows get a log-normal norm (``LM_HEAD_ROW_LOGSTD``).  Plain scaling cannot
  make argmax flips rarer: float error in the logits grows with the same scale.  A heavier
  tail of the logit distribution does: the top token stands further out relative to its
  neighbours (median gap / logit std 0.17 -> 0.41) at the cost of some variety (greedy
  outputs of 64 tokens still hold ~47-56 distinct tokens).  Not for tied embeddings: there
  a large row is also a large input embedding that predicts itself, and greedy output
  collapses into one repeated token.

Measured for tiny-llama (16 prompts x 64 greedy tokens, transformers float32): median gap
2.5, 1% quantile 0.048, min 2.3e-4; float32 vs float64 logits differ by at most 1.7e-4.
So a float32 engine that is correct matches transformers greedy token for token almost
always, yet not by construction: an equality test should, on the first differing token,
check that the reference's top-2 gap there is tiny rather than fail outright.  In bf16/fp16
the logit error (~1e-2 relative) is far above many gaps; compare there with a tolerance.

``measure`` (``--measure``) prints the greedy statistics used to pick these numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

VOCAB_SIZE = 16000
MAX_POSITIONS = 2048
CORPUS_BYTES = 3_000_000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = EOS_ID

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

PRESETS: dict[str, dict] = {
    "tiny-llama": dict(
        architecture="LlamaForCausalLM", model_type="llama", seed=1234,
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
    ),
    "tiny-qwen2": dict(
        architecture="Qwen2ForCausalLM", model_type="qwen2", seed=2345,
        hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64,
        rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True,
    ),
    "tiny-llama3": dict(
        architecture="LlamaForCausalLM", model_type="llama", seed=3456,
        hidden_size=256, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        },
        tie_word_embeddings=False,
    ),
}
# The shapes of Qwen2-0.5B (494 M parameters) with random weights: the 0.5 B-class checkpoint of the
# throughput benchmark (bench/throughput_matrix.py), not a test model. Rows past the tokenizer's
# 16000 are zero, as for tiny-odd-vocab: the GEMMs keep the real shape, greedy ids stay decodable.
PRESETS["qwen2-0.5b"] = dict(
    architecture="Qwen2ForCausalLM", model_type="qwen2", seed=5678,
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, head_dim=64,
    rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True, vocab_size=151936,
)
# The tiny-llama3 shapes with a vocabulary of 16001 rows (two tensor-parallel ranks cannot split
# it evenly). The extra row is not in the tokenizer; its LM-head row is zero, so its logit (0)
# never wins a greedy step and every generated id decodes.
PRESETS["tiny-odd-vocab"] = dict(PRESETS["tiny-llama3"], seed=4567, vocab_size=16001)

# Init scales (see the module docstring).  Stds of the linear maps are given as a gain over
# 1/sqrt(fan_in), so they mean the same thing for every hidden size.
EMBED_STD = 1.0          # token embedding entries
QK_GAIN = 1.6            # q/k output std for a unit-RMS input (before RoPE)
V_GAIN = 1.0
O_GAIN = 1.0
MLP_IN_GAIN = 1.0        # gate/up
MLP_OUT_GAIN = 1.0       # down
NORM_NOISE = 0.1         # RMSNorm weight = 1 + NORM_NOISE * N(0, 1)
BIAS_STD = 0.3           # Qwen2 q/k/v bias
LM_HEAD_STD = 0.25       # per entry; logits std ~ LM_HEAD_STD * sqrt(hidden) for unit-RMS input
LM_HEAD_ROW_LOGSTD = 0.3  # untied: each lm_head row scaled by exp(LM_HEAD_ROW_LOGSTD * N(0, 1))
EOS_ROW_SCALE = 0.25     # eos lm_head row multiplied by this


# --------------------------------------------------------------------------- tokenizer

def _corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in skip for part in rel.parts):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _corpus() -> list[str]:
    texts, total = [], 0
    for p in _corpus_files():
        data = p.read_bytes()
        if total + len(data) > CORPUS_BYTES:
            continue
        texts.append(data.decode("utf-8", errors="replace"))
        total += len(data)
    return texts


def train_tokenizer(out_dir: Path) -> None:
    """Train the byte-level BPE tokenizer and write the three tokenizer files to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    _write_tokenizer_configs(out_dir)


def _write_tokenizer_configs(out_dir: Path) -> None:
    added = {
        str(i): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


# --------------------------------------------------------------------------- model

def model_config(preset: str) -> dict:
    """The config.json contents for a preset."""
    p = copy.deepcopy(PRESETS[preset])
    rope_parameters = {"rope_type": "default", "rope_theta": p["rope_theta"]}
    if p["rope_scaling"]:
        rope_parameters = {**p["rope_scaling"], "rope_theta": p["rope_theta"]}
    cfg = {
        "architectures": [p["architecture"]],
        "model_type": p["model_type"],
        "vocab_size": p.get("vocab_size", VOCAB_SIZE),
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": p["rope_theta"],
        "rope_scaling": p["rope_scaling"],
        "rope_parameters": rope_parameters,
        "attention_dropout": 0.0,
        "tie_word_embeddings": p["tie_word_embeddings"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if p["model_type"] == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:  # qwen2: q/k/v bias is implied by the architecture
        cfg.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=p["num_hidden_layers"])
    return cfg


def _init_weights(model, preset: str) -> None:
    """Re-draw every parameter deterministically (see the module docstring for the scales)."""
    import torch

    p = PRESETS[preset]
    g = torch.Generator(device="cpu").manual_seed(p["seed"])
    hidden, inter = p["hidden_size"], p["intermediate_size"]

    def normal_(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)

    seen = set()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(param) in seen:  # tied lm_head
            continue
        seen.add(id(param))
        if name.endswith("embed_tokens.weight") and not p["tie_word_embeddings"]:
            normal_(param, EMBED_STD)
        elif name.endswith(("lm_head.weight", "embed_tokens.weight")):  # output matrix
            normal_(param, LM_HEAD_STD)
            if not p["tie_word_embeddings"]:
                # Tied, a large-norm row is also a large input embedding that then predicts
                # itself: greedy output collapses into repeating one token.  So untied only.
                with torch.no_grad():
                    rows = torch.randn(param.shape[0], 1, generator=g)
                    param.mul_(torch.exp(LM_HEAD_ROW_LOGSTD * rows))
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            with torch.no_grad():
                param.copy_(1.0 + NORM_NOISE * torch.randn(param.shape, generator=g))
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            # q.k / sqrt(head_dim) has std QK_GAIN**2 for unit-RMS inputs
            normal_(param, QK_GAIN / math.sqrt(hidden))
        elif name.endswith("v_proj.weight"):
            normal_(param, V_GAIN / math.sqrt(hidden))
        elif name.endswith("o_proj.weight"):
            normal_(param, O_GAIN / math.sqrt(param.shape[1]))
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            normal_(param, MLP_IN_GAIN / math.sqrt(hidden))
        elif name.endswith("down_proj.weight"):
            normal_(param, MLP_OUT_GAIN / math.sqrt(inter) * 2.0)
        elif name.endswith(".bias"):
            normal_(param, BIAS_STD)
        else:
            raise RuntimeError(f"no init rule for parameter {name}")
    # Keep eos possible but unlikely, so greedy generations usually run to max_tokens.
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS_ID].mul_(EOS_ROW_SCALE)
        model.get_output_embeddings().weight[VOCAB_SIZE:].zero_()  # rows beyond the tokenizer


def _build_model(cfg: dict, preset: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers edits the rope dicts it is given, so hand it a copy
    kwargs = copy.deepcopy({k: v for k, v in cfg.items() if k != "architectures"})
    hf_cfg = AutoConfig.for_model(**kwargs)
    hf_cfg.architectures = cfg["architectures"]
    torch.manual_seed(PRESETS[preset]["seed"])
    model = AutoModelForCausalLM.from_config(hf_cfg).float()
    _init_weights(model, preset)
    return model.eval()


def _save_weights(model, path: Path, tied: bool) -> int:
    from safetensors.torch import save_file

    state = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if "rotary_emb" in name:  # non-persistent buffers, never in checkpoints
            continue
        state[name] = t.detach().to("cpu").contiguous().clone()
    state = dict(sorted(state.items()))
    save_file(state, str(path), metadata={"format": "pt"})
    return sum(t.numel() for t in state.values())


# --------------------------------------------------------------------------- entry points

def build_checkpoint(out_dir, preset: str = "tiny-llama", tokenizer_dir=None) -> Path:
    """Write a complete HF checkpoint for `preset` to `out_dir` and return its path.

    If `tokenizer_dir` is given, its tokenizer files are copied instead of training a new
    tokenizer (training takes a few seconds; copying lets a test session train once).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        for f in TOKENIZER_FILES:
            if not (src / f).is_file():
                raise FileNotFoundError(f"{src / f} missing; tokenizer_dir must hold {TOKENIZER_FILES}")
            if (src / f).resolve() != (out / f).resolve():
                shutil.copyfile(src / f, out / f)
    else:
        train_tokenizer(out)

    cfg = model_config(preset)
    model = _build_model(cfg, preset)
    # Write to a temp name then rename, so a reader never sees a half-written file.
    tmp = out / "model.safetensors.tmp"
    n_params = _save_weights(model, tmp, cfg["tie_word_embeddings"])
    os.chmod(tmp, 0o644)  # safetensors creates it private; other users (TorchServe) read it
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
    })
    print(f"built {preset}: {n_params / 1e6:.2f}M params, {_describe(preset)}, "
          f"in {time.perf_counter() - t0:.1f}s -> {out}")
    return out


def _describe(preset: str) -> str:
    p = PRESETS[preset]
    return (f"{p['architecture']} L{p['num_hidden_layers']} H{p['hidden_size']} "
            f"heads {p['num_attention_heads']}/{p['num_key_value_heads']}x{p['head_dim']}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


MEASURE_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "import os\nimport sys\n",
    "Once upon a time, in a land far away,",
    "Héllo wörld! Ça va? Ünïcödé",
    "你好，世界。今天天气很好。",
    "🙂🚀 emoji test 🎉",
    "class Stack:\n    def __init__(self):",
    "1 2 3 4 5 6 7 8 9 10",
    "SELECT * FROM users WHERE id = 42;",
    "The capital of France is",
    "for i in range(10):\n    print(i)",
    "A",
    "raise ValueError('bad value: %r' % (x,))",
    "In the beginning was the Word, and the Word was with God.",
    "<html><body><p>Hello</p></body></html>",
]


def measure(model_dir, max_new_tokens: int = 64) -> dict:
    """Greedy-decode MEASURE_PROMPTS with transformers (float32) and report statistics.

    gap: top-1 minus top-2 logit at each greedy step.  rel_gap: the same in units of that
    step's logit std.  noise: max |float32 - float64 logit| at each step (a stand-in for the
    float32 difference between two correct implementations); gap/noise is what decides
    whether an argmax can flip.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    m64 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    gaps, rel, noise, outs = [], [], [], []
    for prompt in MEASURE_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        n = ids.shape[1]
        with torch.no_grad():
            seq = m32.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=PAD_ID)
            a = m32(seq).logits[0, n - 1:-1]
            b = m64(seq).logits[0, n - 1:-1]
        outs.append(seq[0, n:].tolist())
        top = torch.topk(a, 2, dim=-1).values
        g = top[:, 0] - top[:, 1]
        gaps.append(g)
        rel.append(g / a.std(dim=-1))
        noise.append((a.double() - b).abs().amax(dim=-1).float())
    g, r, z = torch.cat(gaps), torch.cat(rel), torch.cat(noise)
    distinct = sorted(len(set(o)) for o in outs)
    return {
        "steps": int(g.numel()),
        "gap_median": round(float(g.median()), 4),
        "gap_p01": round(float(torch.quantile(g, 0.01)), 5),
        "gap_min": float(g.min()),
        "rel_gap_median": round(float(r.median()), 4),
        "noise_fp32_vs_fp64_max": float(z.max()),
        "gap_over_noise_min": round(float((g / z).min()), 1),
        "distinct_tokens_per_output_min": distinct[0],
        "distinct_tokens_per_output_median": distinct[len(distinct) // 2],
        "distinct_tokens_all_outputs": len(set(t for o in outs for t in o)),
        "distinct_continuations": len({tuple(o) for o in outs}),
        "outputs_with_eos": sum(EOS_ID in o for o in outs),
        "sample": tok.decode(outs[0]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--preset", default="tiny-llama", choices=sorted(PRESETS))
    ap.add_argument("--tokenizer-dir", default=None,
                    help="copy the tokenizer from this checkpoint instead of training one")
    ap.add_argument("--measure", action="store_true",
                    help="after building, print greedy logit-gap statistics")
    args = ap.parse_args(argv)
    out = build_checkpoint(args.out, args.preset, args.tokenizer_dir)
    if args.measure:
        print(json.dumps(measure(out), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
