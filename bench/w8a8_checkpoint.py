"""An int8 W8A8 copy of an HF checkpoint in the compressed-tensors format, for vLLM's own int8 path.

Our ``quantization: int8`` is weight-only: int8 weights, one scale per output channel, bf16
activations. vLLM's CPU build offers int8 as W8A8 (int8 weights and int8 activations quantized per
token at run time, oneDNN int8 GEMMs) for checkpoints that carry it. No such checkpoint can be
fetched here, so this writes one from the same weights: every projection of every decoder layer
(``*_proj.weight``) rounded exactly as ours rounds it (``paged_kernels.linear.quantize_int8``:
symmetric, absmax / 127 per output channel) and stored as int8 ``weight`` + fp32 ``weight_scale``
[out, 1]; biases, norms, the embedding and the LM head stay as they are (the LM head is left out
of the quantization, as tools that make these checkpoints do by default). config.json gains the
``quantization_config`` that tells vLLM: weights int8 per channel, activations int8 per token,
dynamic, symmetric. The two engines then read the same int8 weights; they differ in the
activations (vLLM rounds them to int8, we keep bf16) and so in the arithmetic.

    python bench/w8a8_checkpoint.py --model model-store/bench-qwen2-0.5b --out model-store/bench-qwen2-0.5b-w8a8

The checkpoint is written once (config.json last marks it finished).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "kernels"))

from paged_kernels.linear import quantize_int8  # noqa: E402

QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                              "dynamic": True},
        "output_activations": None,
    }},
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
}


def write_w8a8(model_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the W8A8 copy of ``model_dir`` into ``out_dir`` (kept if it is already finished). The
    weights are first cast to ``dtype``, as our engine casts them before it quantizes."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                tensor = reader.get_tensor(name).to(dtype)
                if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                    q, scales = quantize_int8(tensor)
                    tensors[name] = q.contiguous()
                    tensors[name[: -len("weight")] + "weight_scale"] = scales.float().reshape(-1, 1).contiguous()
                else:
                    tensors[name] = tensor.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for extra in model_dir.iterdir():  # tokenizer and generation files
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name != "config.json":
            shutil.copy2(extra, out_dir / extra.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint directory (safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the dtype the engines run in (weights are cast to it before rounding)")
    args = ap.parse_args()
    print(write_w8a8(args.model, args.out, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
