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
from paged.sampling_params import SamplingParams
from paged.shared_prefixes import engine_factory_with_prefixes

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
    config = EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=96, max_model_len=512)
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
