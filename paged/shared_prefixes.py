"""Pinned shared prefixes: a long system prompt or few-shot block computed once and kept in the pool.

``register`` runs the prefix through the engine like the prefill of a one-token request, then pins
the full blocks that now cache it (``BlockManager.pin_prefix``): eviction never takes them, so
every request that starts with the prefix computes only its own tokens, however much other
traffic passes through the pool. A pinned prefix counts against the pool: a registration that
would leave less room than one request of ``max_model_len`` tokens needs is refused. Only full
blocks are pinned (a partial last block is not cached, so it is recomputed per request).

Requests hit a prefix when their token ids start with its token ids. A text prefix is tokenized
on its own, so a request's text should continue it at a token boundary (a newline is one), or
requests should send token ids.

``register_from_config`` is what a server calls at load with the ``shared_prefixes:`` list of its
configuration: each entry is inline text, ``{"text": ...}``, or ``{"file": path}`` relative to
the model directory (a file inside the archive).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paged.errors import InvalidRequestError
from paged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged.engine import LLMEngine

REQUEST_ID_PREFIX = "__shared-prefix-"


def is_prefix_request(request_id: str) -> bool:
    return request_id.startswith(REQUEST_ID_PREFIX)


class SharedPrefixes:
    """The engine's registered prefixes: token ids -> the text they came from (None for ids)."""

    def __init__(self):
        self.texts: dict[tuple[int, ...], str | None] = {}
        self._num_registrations = 0

    def register(self, engine: "LLMEngine", text: str | None, token_ids: list[int]) -> int:
        """Compute and pin the prefix; returns the number of tokens pinned (its full blocks).
        Registering the same prefix again changes nothing."""
        bm = engine.block_manager
        key = tuple(token_ids)
        if key in self.texts:
            return len(bm.pins[key]) * bm.block_size
        if not bm.prefix_cache.enabled:
            raise InvalidRequestError("prompt", "shared prefixes need enable_prefix_caching=True")
        if engine.has_unfinished_requests():
            raise RuntimeError("register a shared prefix while the engine has no unfinished requests")
        pinned_after = bm.num_pinned_blocks_with(token_ids)
        room = bm.max_blocks_for_one_sequence(engine.max_model_len)
        if pinned_after + room > bm.num_blocks:
            raise InvalidRequestError(
                "prompt", f"pinning this prefix ({len(token_ids)} tokens) would make {pinned_after} of the "
                          f"pool's {bm.num_blocks} blocks pinned, leaving {bm.num_blocks - pinned_after}; one "
                          f"request of max_model_len={engine.max_model_len} tokens needs up to {room}")
        request_id = f"{REQUEST_ID_PREFIX}{self._num_registrations}"
        self._num_registrations += 1
        engine.add_request(request_id, token_ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                           stream=False)
        while request_id in engine.requests:
            for out in engine.step():
                if out.request_id == request_id and out.error is not None:
                    raise RuntimeError(f"computing the shared prefix failed: {out.error}") from out.error
        # The request just finished: its blocks are cached and nothing has been scheduled since.
        pinned = bm.pin_prefix(key, token_ids)
        self.texts[key] = text
        return pinned

    def unregister(self, engine: "LLMEngine", token_ids: list[int]) -> int:
        """Unpin the prefix (its blocks become evictable); returns the number of tokens unpinned."""
        key = tuple(token_ids)
        if key not in self.texts:
            raise InvalidRequestError("prompt", "this prefix is not registered")
        del self.texts[key]
        return engine.block_manager.unpin_prefix(key)

    def describe(self, engine: "LLMEngine") -> list[dict[str, Any]]:
        """Each registered prefix: its tokens, how many are pinned, and the tokens requests took from
        its pinned blocks (``hit_tokens``)."""
        bm = engine.block_manager
        return [{"num_tokens": len(key), "pinned_tokens": len(bm.pins[key]) * bm.block_size,
                 "hit_tokens": bm.pin_hit_tokens[key],
                 "text": None if text is None else (text if len(text) <= 80 else text[:77] + "...")}
                for key, text in self.texts.items()]


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


def engine_factory_with_prefixes(entries: Any, model_dir: str,
                                 base_factory: Callable[[Any], "LLMEngine"] | None = None):
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


def register_from_config(engine: "LLMEngine", entries: Any, model_dir: str) -> list[dict[str, Any]]:
    """Register every prefix of a ``shared_prefixes:`` list (run on the engine's thread, at load);
    returns ``describe``'s list. ValueError for a bad entry or a prefix that does not fit."""
    for text in load_prefix_entries(entries, model_dir):
        engine.register_prefix(text)
    return engine.shared_prefixes()
