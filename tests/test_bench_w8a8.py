"""bench/w8a8_checkpoint.py on the small test model: every decoder projection becomes int8 weights with
per-channel scales, rounded as our own int8 rounds, everything else is kept, and config.json says
W8A8 in the compressed-tensors format."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open

from paged_kernels.linear import quantize_int8


def read_all(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})
    return tensors


def test_w8a8_copy_holds_our_int8_rounding_and_says_so_in_its_config(tiny_llama_dir, repo_root, tmp_path):
    out = tmp_path / "w8a8"
    done = subprocess.run([sys.executable, str(repo_root / "bench" / "w8a8_checkpoint.py"), "--model",
                           str(tiny_llama_dir), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    source, copy = read_all(tiny_llama_dir), read_all(out)
    projections = [n for n in source if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    assert projections
    for name in projections:
        q, scales = quantize_int8(source[name].to(torch.bfloat16))
        assert copy[name].dtype == torch.int8 and torch.equal(copy[name], q)
        assert torch.equal(copy[name[: -len("weight")] + "weight_scale"], scales.reshape(-1, 1))
    for name in set(source) - set(projections):
        assert torch.equal(copy[name], source[name].to(torch.bfloat16))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True}
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
