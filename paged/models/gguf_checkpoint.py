"""GGUF files (llama.cpp's format) as HF checkpoint directories: checked, dequantized, written.

``LLM("model.gguf")`` and ``model: model.gguf`` in the handler config load a GGUF file the way
vLLM's GGUF support does: the weights are dequantized at load (the engine then runs them in its
``dtype``; ``quantization: int8`` quantizes them again its own way). The conversion itself is
transformers' GGUF loader (which reads the file with the ``gguf`` package and undoes llama.cpp's
Q/K row permutation); this module checks what it is given first, so an unsupported architecture
or quant type fails with a ValueError that names it instead of deep inside transformers, and
writes the result as the directory our loader reads (config.json with ``architectures``,
model.safetensors, tokenizer files with the chat template, generation_config.json).

``scripts/build_smollm2.py`` uses ``convert_gguf`` to build the default model once (float32); the
engine uses ``DequantizedCheckpoint`` to convert into a temporary directory (in its own dtype) that
lives as long as it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# GGUF's general.architecture -> the HF architecture our Llama-family model implements.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The tensor types the gguf package dequantizes and transformers' loader accepts, by GGML name.
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def is_gguf(model: str | os.PathLike) -> bool:
    """Is ``model`` a path to a GGUF file (by its suffix; the header is checked by ``check_gguf``)?"""
    return str(model).lower().endswith(".gguf")


def check_gguf(path: str | os.PathLike) -> dict:
    """Read the header of the GGUF file at ``path``; ValueError unless we can load it.

    Returns {"architecture": HF architecture, "quant_types": {GGML type name: tensor count}}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # an install without the package: say which one
        raise ValueError(f"loading {path.name} needs the 'gguf' package: {exc}") from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a GGUF file we can read"
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {exc}") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} in {path.name} is not supported; "
                         f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name not in SUPPORTED_QUANT_TYPES:
            raise ValueError(f"GGUF tensor {tensor.name!r} in {path.name} has quant type {name}, which is not "
                             f"supported; supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
        counts[name] = counts.get(name, 0) + 1
    return {"architecture": GGUF_ARCHITECTURES[arch], "quant_types": dict(sorted(counts.items()))}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, provenance: dict | None = None,
                 dtype: str = "float32") -> Path:
    """Dequantize the GGUF file into an HF checkpoint directory ``out_dir`` (safetensors in ``dtype``,
    a torch dtype name). ``provenance``: written to ``source.json`` beside the weights (where the
    file came from). The whole model passes through memory in ``dtype`` once (transformers' loader).

    The result is the same for the same file and library versions. Files are written into a
    sibling staging directory that is renamed into place at the end, config.json last within it,
    so a present ``out_dir/config.json`` means a finished conversion. ValueError as ``check_gguf``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    info = check_gguf(gguf_path)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tokenizer.save_pretrained(staging)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=getattr(torch, dtype))
    config = model.config.to_dict()
    tied = bool(config.get("tie_word_embeddings"))
    # save_pretrained refuses a model loaded from GGUF ("not serializable"): write the tensors
    # ourselves, the tied LM head once (as the embedding).
    tensors = {key: value.detach().contiguous() for key, value in model.state_dict().items()
               if not (tied and key == "lm_head.weight")}
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(staging / "model.safetensors", 0o644)  # readable like the other files (save_file makes it 0600)
    generation = model.generation_config.to_diff_dict()
    generation.pop("transformers_version", None)
    _write_json(staging / "generation_config.json", generation)
    del model, tensors
    # The conversion leaves architectures out and records a quantization the weights no longer have.
    config.pop("quantization_config", None)
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)  # where this conversion read from: not part of the checkpoint
    config["architectures"] = [info["architecture"]]
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    if provenance is not None:
        _write_json(staging / "source.json", {**provenance, "gguf_quant_types": info["quant_types"]})
    _write_json(staging / "config.json", config)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer of a checkpoint directory or of a GGUF file (its embedded vocabulary)."""
    from transformers import AutoTokenizer

    if is_gguf(model):
        path = Path(model).resolve()
        check_gguf(path)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(model))


class DequantizedCheckpoint:
    """A GGUF file converted into a temporary checkpoint directory (``.path``; weights in ``dtype``,
    the dtype the engine runs, so no precision is kept that it would drop), removed by ``cleanup()``
    or when this object is collected. A directory is passed through unchanged."""

    def __init__(self, model: str | os.PathLike, dtype: str = "float32"):
        self._tmp: tempfile.TemporaryDirectory | None = None
        if not is_gguf(model):
            self.path = str(model)
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="paged-gguf-")
        self.path = str(convert_gguf(model, Path(self._tmp.name) / "checkpoint", dtype=dtype))

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
