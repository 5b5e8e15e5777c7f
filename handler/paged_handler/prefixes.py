"""The ``shared_prefixes:`` setting of model-config.yaml: read it, and register it on every engine.

Each entry is inline text, ``{"text": ...}``, or ``{"file": path}`` relative to the model
directory (a file inside the archive). The list is checked when the config is read
(``load_prefix_entries``), and registered on every engine the worker builds, rebuilt ones too
(``engine_factory_with_prefixes``), on the engine thread. See docs/sharing.md.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def load_prefix_entries(entries: Any, model_dir: str) -> list[str]:
    """The texts of a ``shared_prefixes:`` configuration list; ValueError names the bad entry."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"shared_prefixes must be a list, got {type(entries).__name__}")
    root = os.path.realpath(model_dir)
    texts = []
    for index, entry in enumerate(entries):
        where = f"shared_prefixes[{index}]"
        if isinstance(entry, dict) and set(entry) == {"text"}:
            entry = entry["text"]
        if isinstance(entry, str):
            if not entry:
                raise ValueError(f"{where}: the text is empty")
            texts.append(entry)
            continue
        if not isinstance(entry, dict) or set(entry) != {"file"} or not isinstance(entry["file"], str):
            raise ValueError(f"{where}: expected text, {{text: ...}} or {{file: path in the model archive}}, "
                             f"got {entry!r}")
        path = os.path.realpath(os.path.join(root, entry["file"]))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"{where}: {entry['file']!r} is outside the model directory")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"{where}: cannot read {entry['file']!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{where}: {entry['file']!r} is not UTF-8 text") from None
        if not text:
            raise ValueError(f"{where}: {entry['file']!r} is empty")
        texts.append(text)
    return texts


def register_from_config(engine, entries: Any, model_dir: str) -> list[dict[str, Any]]:
    """Register every prefix of a ``shared_prefixes:`` list on ``engine`` (an ``LLMEngine``, on
    its thread); returns ``engine.shared_prefixes()``. ValueError for a bad entry or a prefix
    that does not fit."""
    for text in load_prefix_entries(entries, model_dir):
        engine.register_prefix(text)
    return engine.shared_prefixes()


def engine_factory_with_prefixes(entries: Any, model_dir: str, base_factory: Callable[[Any], Any] | None = None):
    """An engine factory (for ``AsyncLLMEngine``) that registers the ``shared_prefixes:`` list on
    every engine it builds, so an engine rebuilt after a fault has its prefixes again."""
    def build(config):
        if base_factory is None:
            from paged.engine import LLMEngine  # on the engine thread, like every torch import

            engine = LLMEngine(config)
        else:
            engine = base_factory(config)
        register_from_config(engine, entries, model_dir)
        return engine
    return build
