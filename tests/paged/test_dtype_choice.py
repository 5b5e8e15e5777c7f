"""dtype "auto": bfloat16 where the CPU has native bf16 dot products, float32 elsewhere; explicit wins."""
from __future__ import annotations

import pytest
import torch

from paged.config import EngineConfig
from paged.dtype_choice import choose_dtype, cpu_flags
from paged.llm import LLM


@pytest.mark.parametrize("flags", [{"avx512f", "avx512_bf16"}, {"avx512f", "amx_bf16", "amx_tile"}])
def test_auto_is_bfloat16_with_native_bf16_dot_products(flags):
    choice = choose_dtype("auto", "cpu", flags=flags)
    assert choice.dtype == "bfloat16" and choice.requested == "auto"
    assert any(flag in choice.reason for flag in ("avx512_bf16", "amx_bf16"))


def test_auto_is_float32_without_them():
    choice = choose_dtype("auto", "cpu", flags={"avx2", "fma", "avx512f"})
    assert choice.dtype == "float32" and "no native bf16" in choice.reason


def test_auto_is_float32_when_the_cpu_features_are_unknown(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: x\n")
    for path in (tmp_path / "missing", tmp_path / "cpuinfo"):
        choice = choose_dtype("auto", "cpu", cpuinfo_path=str(path))
        assert choice.dtype == "float32" and "unknown" in choice.reason


def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(tmp_path / "cpuinfo")) == {"fpu", "avx2", "avx512_bf16"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(dtype):
    for flags in ({"avx512_bf16"}, set()):
        choice = choose_dtype(dtype, "cpu", flags=flags)
        assert choice.dtype == dtype and choice.reason == "set by the dtype setting"


def test_auto_is_the_default_and_an_unknown_dtype_is_refused():
    assert EngineConfig(model="m").dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="m", dtype="int8")


def test_the_engine_runs_and_reports_the_resolved_dtype(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=16, max_model_len=64)
    expected = choose_dtype("auto", "cpu")
    info = llm.engine.performance_info()["dtype"]
    assert info == expected.describe() and llm.engine.config.dtype == expected.dtype
    assert llm.engine.executor.dtype == getattr(torch, expected.dtype)  # the weights and KV run in it
