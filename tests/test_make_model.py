"""The tiny checkpoints from scripts/make_model.py load with transformers and match their spec."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TEXTS = [
    "Hello, world!",
    "  two leading spaces,\ttabs\n\nand newlines \n",
    "Héllo wörld — ça va? Ünïcödé ß",
    "emoji 🙂🚀🎉 and a ZWJ family 👨‍👩‍👧",
    "你好，世界。今天天气很好。",
    "def f(x):\n    return {'k': [x, 1e-5]}\n",
]

PRESET_FIXTURES = {
    "tiny-llama": "tiny_llama_dir",
    "tiny-qwen2": "tiny_qwen2_dir",
    "tiny-llama3": "tiny_llama3_dir",
}


@pytest.fixture(params=sorted(PRESET_FIXTURES))
def preset_dir(request):
    return request.param, request.getfixturevalue(PRESET_FIXTURES[request.param])


def _config(d):
    return json.loads((d / "config.json").read_text())


def test_files_present(preset_dir):
    _, d = preset_dir
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / f).is_file(), f
    assert not list(d.glob("*.bin")) and not list(d.glob("*.py")), "no pickles, no remote code"


def test_llama_config(tiny_llama_dir):
    c = _config(tiny_llama_dir)
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (512, 1408, 8)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (8, 2, 64)
    assert c["vocab_size"] == 16000 and c["max_position_embeddings"] == 2048
    assert c["rope_theta"] == 10000.0 and c["rope_scaling"] is None
    assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert c["rms_norm_eps"] == 1e-5 and c["tie_word_embeddings"] is False
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


def test_qwen2_config(tiny_qwen2_dir):
    c = _config(tiny_qwen2_dir)
    assert c["architectures"] == ["Qwen2ForCausalLM"] and c["model_type"] == "qwen2"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (256, 704, 4)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 1, 64)
    assert c["rope_theta"] == 1e6 and c["tie_word_embeddings"] is True
    assert c["vocab_size"] == 16000


def test_llama3_config(tiny_llama3_dir):
    c = _config(tiny_llama3_dir)
    assert (c["hidden_size"], c["num_hidden_layers"]) == (256, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (8, 4, 32)
    rs = c["rope_scaling"]
    assert rs == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    assert c["rope_parameters"] == {**rs, "rope_theta": c["rope_theta"]}


def test_loads_and_generates(preset_dir):
    name, d = preset_dir
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cfg = model.config
    assert cfg.rope_parameters["rope_theta"] == _config(d)["rope_theta"]
    if name == "tiny-llama3":
        assert cfg.rope_parameters["rope_type"] == "llama3"
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name == "tiny-qwen2")
    if name == "tiny-qwen2":
        q = model.model.layers[0].self_attn.q_proj
        assert q.bias is not None and q.bias.abs().sum() > 0
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 16
    assert len(set(new)) >= 6, f"greedy output too repetitive: {new}"
    assert torch.isfinite(model(out).logits).all()


def test_tokenizer_special_tokens(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert len(tok) == 16000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.eos_token_id
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_roundtrip(tiny_llama_dir, text):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text
    assert all(0 <= i < 16000 for i in ids)


def test_chat_template(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.\n<|user|>\nHi 🙂\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False).endswith("Hi 🙂\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1


def test_tokenizer_dir_is_copied(tmp_path, make_model, tiny_llama_dir):
    out = make_model.build_checkpoint(tmp_path / "q", "tiny-llama3", tokenizer_dir=tiny_llama_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (tiny_llama_dir / f).read_bytes()


def test_weights_deterministic(tmp_path, make_model, tiny_llama3_dir, tiny_llama_dir):
    out = make_model.build_checkpoint(tmp_path / "again", "tiny-llama3", tokenizer_dir=tiny_llama_dir)
    assert (out / "model.safetensors").read_bytes() == (tiny_llama3_dir / "model.safetensors").read_bytes()
    assert (out / "config.json").read_bytes() == (tiny_llama3_dir / "config.json").read_bytes()


def test_unknown_preset(tmp_path, make_model):
    with pytest.raises(ValueError, match="unknown preset"):
        make_model.build_checkpoint(tmp_path, "gpt-17")
