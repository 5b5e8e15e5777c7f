"""Fixtures for the tensor-parallel tests (helpers that tests import live in tp_helpers.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ODD_VOCAB_SIZE = 16001  # the tokenizer's 16000 tokens plus one row no text maps to


@pytest.fixture(scope="session")
def tiny_odd_vocab_dir(tmp_path_factory, make_model, tiny_llama_dir) -> Path:
    """The tiny-llama3 shapes (8 heads, 4 KV heads, 2 layers, llama3 RoPE) with a vocabulary of
    16001 rows, which 2 ranks cannot split evenly. The extra LM head row is zero, so its logit (0)
    never wins a greedy step and every generated id stays inside the tokenizer."""
    import torch

    out = tmp_path_factory.mktemp("tiny-odd-vocab")
    config = make_model.model_config("tiny-llama3")
    config["vocab_size"] = ODD_VOCAB_SIZE
    model = make_model._build_model(config, "tiny-llama3")
    with torch.no_grad():
        model.get_output_embeddings().weight[ODD_VOCAB_SIZE - 1].zero_()
    make_model._save_weights(model, out / "model.safetensors", tied=False)
    for name in make_model.TOKENIZER_FILES:
        shutil.copyfile(tiny_llama_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": make_model.BOS_ID, "eos_token_id": make_model.EOS_ID, "pad_token_id": make_model.PAD_ID}))
    (out / "config.json").write_text(json.dumps(config))
    return out
