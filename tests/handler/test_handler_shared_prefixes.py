"""The handler's ``shared_prefixes:`` setting: checked when the config is read, registered on every
engine the worker builds (also one rebuilt after a fault), listed by describe."""
from __future__ import annotations

import asyncio
import json

import pytest

from paged_handler.service import LLMService
from paged_handler.settings import HANDLER_DEFAULTS, parse_handler_config
from paged_handler.tokenization import TokenizerPool
from paged.async_engine import AsyncLLMEngine
from paged.config import EngineConfig
from paged import LLM
from paged.sampling_params import SamplingParams
from paged_handler.prefixes import engine_factory_with_prefixes, load_prefix_entries, register_from_config

SYSTEM_PROMPT = "You are a careful assistant that answers in Python.\n" * 4


def test_a_prefix_entry_naming_a_missing_file_fails_the_config(tmp_path):
    with pytest.raises(ValueError, match="shared_prefixes"):
        parse_handler_config({"shared_prefixes": [{"file": "missing.txt"}]}, str(tmp_path))


def test_prefix_entries_and_a_relative_profile_resolve_inside_the_model_dir(tmp_path):
    (tmp_path / "system.txt").write_text(SYSTEM_PROMPT)
    config, settings = parse_handler_config(
        {"shared_prefixes": ["inline", {"file": "system.txt"}], "block_size_profile": "profile.json"},
        str(tmp_path))
    assert settings["shared_prefixes"] == ["inline", {"file": "system.txt"}]
    assert config.block_size_profile == str(tmp_path / "profile.json")


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=96, max_model_len=512, dtype="float32")
    engine = AsyncLLMEngine(config, engine_factory=engine_factory_with_prefixes([SYSTEM_PROMPT],
                                                                                str(tiny_llama_dir))).start(600)
    tokenizers = TokenizerPool(str(tiny_llama_dir), threads=1, max_pending=4)
    yield engine, LLMService(engine, tokenizers, dict(HANDLER_DEFAULTS), "llm")
    tokenizers.shutdown()
    engine.shutdown()


def test_describe_lists_the_registered_prefix(served):
    _, service = served
    info = asyncio.run(service.describe())
    [prefix] = info["shared_prefixes"]
    assert prefix["pinned_tokens"] > 0 and prefix["num_tokens"] >= prefix["pinned_tokens"]


def test_a_request_behind_the_prefix_takes_its_pinned_blocks(served):
    engine, _ = served

    async def run():
        async for out in engine.generate("behind-prefix", SYSTEM_PROMPT + "def main():",
                                         SamplingParams(max_tokens=4, temperature=0.0), stream=False):
            last = out
        return last
    out = asyncio.run(run())
    pinned = engine.call(lambda e: e.shared_prefixes()).result(30)[0]["pinned_tokens"]
    assert out.num_cached_tokens >= pinned
    assert json.dumps(engine.call(lambda e: e.kv_stats()).result(30)["num_shared_prefixes"]) == "1"


def test_shared_prefixes_from_config_register_inline_text_and_archive_files(tiny_llama_dir, tmp_path):
    (tmp_path / "prompts").mkdir()
    few_shot = "def add(a, b):\n    return a + b\n\n\n" * 6
    (tmp_path / "prompts" / "few_shot.txt").write_text(few_shot)
    system = "You are a careful Python reviewer. Answer with code only.\n" * 3
    llm = LLM(str(tiny_llama_dir), block_size=16, num_kv_blocks=64, max_model_len=256, swap_space_bytes=0, dtype="float32")
    listed = register_from_config(llm.engine, [system, {"file": "prompts/few_shot.txt"}], str(tmp_path))
    tokenizer = llm.tokenizer
    assert [p["num_tokens"] for p in listed] == [len(tokenizer(system).input_ids), len(tokenizer(few_shot).input_ids)]
    assert all(p["pinned_tokens"] == p["num_tokens"] // 16 * 16 and p["hit_tokens"] == 0 for p in listed)
    llm.generate([few_shot + "def mul(a, b):"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    assert llm.engine.shared_prefixes()[1]["hit_tokens"] == listed[1]["pinned_tokens"]


@pytest.mark.parametrize("entries, message", [
    ("not a list", "must be a list"),
    ([""], r"shared_prefixes\[0\]: the text is empty"),
    ([{"file": "../outside.txt"}], "outside the model directory"),
    ([{"file": "missing.txt"}], "cannot read 'missing.txt'"),
    ([{"path": "x"}], r"expected text, \{text: ...\} or \{file: "),
    (["fine", 3], r"shared_prefixes\[1\]"),
])
def test_bad_shared_prefix_entries_are_a_clear_error(tmp_path, entries, message):
    with pytest.raises(ValueError, match=message):
        load_prefix_entries(entries, str(tmp_path))
