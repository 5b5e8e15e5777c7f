"""EngineConfig validation: every invalid value is a ValueError that names the field, and
``from_dict`` refuses unknown keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from paged.config import PREEMPTION_MODES, SUPPORTED_DTYPES, EngineConfig

MODEL = "model-store/tiny-llama"   # only a path: nothing is loaded

INVALID = [
    ("model", dict(model="")),
    ("model", dict(model=None)),
    ("model", dict(model=3)),
    ("block_size", dict(block_size=0)),
    ("block_size", dict(block_size=-16)),
    ("block_size", dict(block_size=257)),
    ("block_size", dict(block_size=16.0)),
    ("block_size", dict(block_size=True)),
    ("block_size", dict(block_size="16")),
    ("num_kv_blocks", dict(num_kv_blocks=0)),
    ("num_kv_blocks", dict(num_kv_blocks=-1)),
    ("num_kv_blocks", dict(num_kv_blocks=1.5)),
    ("kv_cache_memory_bytes", dict(kv_cache_memory_bytes=0)),
    ("kv_cache_memory_bytes", dict(kv_cache_memory_bytes=True)),
    ("kv_cache_memory_bytes", dict(num_kv_blocks=8, kv_cache_memory_bytes=1 << 20)),
    ("swap_space_bytes", dict(swap_space_bytes=-1)),
    ("swap_space_bytes", dict(swap_space_bytes=1.5)),
    ("swap_space_bytes", dict(swap_space_bytes=None)),
    ("swap_space_bytes", dict(swap_space_bytes=False)),
    ("max_num_seqs", dict(max_num_seqs=0)),
    ("max_num_seqs", dict(max_num_seqs=None)),
    ("max_num_batched_tokens", dict(max_num_batched_tokens=0)),
    ("max_num_batched_tokens", dict(max_num_batched_tokens=2048.0)),
    ("max_model_len", dict(max_model_len=0)),
    ("max_model_len", dict(max_model_len=-128)),
    ("tensor_parallel_size", dict(tensor_parallel_size=0)),
    ("max_waiting_requests", dict(max_waiting_requests=0)),
    ("preemption_mode", dict(preemption_mode="evict")),
    ("preemption_mode", dict(preemption_mode=None)),
    ("dtype", dict(dtype="float64")),
    ("dtype", dict(dtype="fp16")),
    ("attention_backend", dict(attention_backend="cuda")),
    ("attention_backend", dict(attention_backend="")),
    ("request_timeout_s", dict(request_timeout_s=0)),
    ("request_timeout_s", dict(request_timeout_s=-1.0)),
    ("request_timeout_s", dict(request_timeout_s=True)),
    ("request_timeout_s", dict(request_timeout_s="30")),
    ("seed", dict(seed=1.0)),
    ("seed", dict(seed=True)),
    ("seed", dict(seed="0")),
    ("enable_prefix_caching", dict(enable_prefix_caching=1)),
    ("enable_prefix_caching", dict(enable_prefix_caching="yes")),
    ("linear_backend", dict(linear_backend="mkl")),
    ("quantization", dict(quantization="int4")),
    ("quantization", dict(quantization=True)),
    ("linear_backend", dict(quantization="int8", linear_backend="onednn")),
    ("fuse_decoder_layers", dict(fuse_decoder_layers=None)),
    ("fuse_decoder_layers", dict(fuse_decoder_layers="false")),
]


@pytest.mark.parametrize("field, kwargs", INVALID, ids=[f"{f}-{kw}" for f, kw in INVALID])
def test_an_invalid_value_is_a_value_error_naming_the_field(field, kwargs):
    kwargs = {"model": MODEL, **kwargs}
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_a_nan_request_timeout_is_rejected():
    with pytest.raises(ValueError, match="request_timeout_s"):
        EngineConfig(model=MODEL, request_timeout_s=float("nan"), dtype="float32")


def test_defaults_are_valid():
    cfg = EngineConfig(model=MODEL)
    assert cfg.block_size == 16 and cfg.num_kv_blocks is None and cfg.kv_cache_memory_bytes is None
    assert cfg.preemption_mode == "auto" and cfg.dtype == "auto" and cfg.enable_prefix_caching is True
    assert cfg.tensor_parallel_size == 1 and cfg.attention_backend is None and cfg.request_timeout_s is None
    assert cfg.quantization is None and cfg.linear_backend is None


@pytest.mark.parametrize("kwargs", [
    dict(block_size=1), dict(block_size=256), dict(num_kv_blocks=1), dict(kv_cache_memory_bytes=1),
    dict(swap_space_bytes=0), dict(max_model_len=1), dict(request_timeout_s=0.5), dict(request_timeout_s=30),
    dict(seed=-3), dict(attention_backend="torch"), dict(attention_backend="triton"),
    dict(linear_backend="packed"), dict(quantization="int8"), dict(quantization="int8", linear_backend="packed"),
    *[dict(preemption_mode=m) for m in PREEMPTION_MODES], *[dict(dtype=d) for d in SUPPORTED_DTYPES],
])
def test_boundary_and_enumerated_values_are_accepted(kwargs):
    EngineConfig(model=MODEL, **kwargs)


def test_a_path_like_model_becomes_a_string():
    assert EngineConfig(model=Path("some") / "dir", dtype="float32").model == str(Path("some") / "dir")


def test_from_dict_builds_the_same_config_as_the_constructor():
    values = dict(model=MODEL, block_size=8, num_kv_blocks=64, preemption_mode="swap", seed=3)
    assert EngineConfig.from_dict(values) == EngineConfig(**values)


def test_from_dict_rejects_unknown_keys_and_names_them():
    with pytest.raises(ValueError, match="blok_size"):
        EngineConfig.from_dict({"model": MODEL, "blok_size": 16})


def test_from_dict_names_every_unknown_key():
    with pytest.raises(ValueError) as info:
        EngineConfig.from_dict({"model": MODEL, "zeta": 1, "alpha": 2})
    assert "alpha" in str(info.value) and "zeta" in str(info.value)


def test_from_dict_still_validates_values():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig.from_dict({"model": MODEL, "block_size": 0})


def test_to_dict_round_trips_through_from_dict():
    cfg = EngineConfig(model=MODEL, num_kv_blocks=32, request_timeout_s=5.0, compile=False, dtype="float32")
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg


def test_tensor_parallel_over_nodes_needs_a_rendezvous_and_an_engine_address():
    with pytest.raises(ValueError, match="tensor_parallel_rdzv_endpoint"):
        EngineConfig(model=MODEL, tensor_parallel_size=2, tensor_parallel_nnodes=2, dtype="float32")
    cfg = EngineConfig(model=MODEL, tensor_parallel_size=2, tensor_parallel_nnodes=2,
                       tensor_parallel_rdzv_endpoint="127.0.0.1:29500",
                       tensor_parallel_engine_address="tcp:127.0.0.1:29501", dtype="float32")
    assert cfg.tensor_parallel_nnodes == 2


def test_tensor_parallel_size_must_divide_over_the_nodes():
    with pytest.raises(ValueError, match="does not divide"):
        EngineConfig(model=MODEL, tensor_parallel_size=3, tensor_parallel_nnodes=2, dtype="float32")
