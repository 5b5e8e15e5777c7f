"""config.json variants the loader reads: ``architectures`` missing, with a supported or another model_type."""
from __future__ import annotations

import json
import shutil

import pytest

from paged.models.llama import ModelArgs


def _copy_without_architectures(src, dst, model_type: str):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["architectures"]
    cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_without_architectures_loads_by_its_supported_model_type(tiny_llama_dir, tmp_path):
    model_dir = _copy_without_architectures(tiny_llama_dir, tmp_path / "m", "llama")
    args = ModelArgs.from_checkpoint(model_dir)
    assert args.architecture == "LlamaForCausalLM"
    assert args == ModelArgs.from_checkpoint(tiny_llama_dir)


def test_config_without_architectures_and_an_unsupported_model_type_is_refused(tiny_llama_dir, tmp_path):
    model_dir = _copy_without_architectures(tiny_llama_dir, tmp_path / "m", "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelArgs.from_checkpoint(model_dir)
