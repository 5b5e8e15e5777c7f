"""Pinned shared prefixes: a long system prompt or few-shot block computed once and kept in the pool.

``LLMEngine.register_prefix`` runs the prefix through the engine like the prefill of a one-token
request, then pins the full blocks that now cache it (``BlockManager.pin_prefix``): eviction never
takes them, so every request that starts with the prefix computes only its own tokens, however
much other traffic passes through the pool. A pinned prefix counts against the pool: a
registration that would leave less room than one request of ``max_model_len`` tokens needs is
refused. Only full blocks are pinned (a partial last block is not cached, so it is recomputed per
request).

Requests hit a prefix when their token ids start with its token ids. A text prefix is tokenized
on its own, so a request's text should continue it at a token boundary (a newline is one), or
requests should send token ids.

This module only remembers what is registered (``SharedPrefixRegistry``); it holds no engine.
"""
from __future__ import annotations

from typing import Any

from paged.errors import InvalidRequestError
from paged.stats import PinnedPrefixStats

PrefixKey = tuple[int, ...]


class SharedPrefixRegistry:
    """The registered prefixes of one engine: token ids -> the text they came from (None for ids)."""

    def __init__(self):
        self.texts: dict[PrefixKey, str | None] = {}

    def __contains__(self, key: PrefixKey) -> bool:
        return key in self.texts

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, key: PrefixKey, text: str | None) -> None:
        self.texts[key] = text

    def remove(self, key: PrefixKey) -> None:
        """InvalidRequestError if ``key`` is not registered."""
        if key not in self.texts:
            raise InvalidRequestError("prompt", "this prefix is not registered")
        del self.texts[key]

    def clear(self) -> None:
        self.texts.clear()

    def describe(self, pinned: dict[Any, PinnedPrefixStats]) -> list[dict[str, Any]]:
        """Each registered prefix: its tokens, how many are pinned, and the tokens requests took
        from its pinned blocks (``hit_tokens``); ``pinned``: the pool's stats per key."""
        return [{"num_tokens": len(key), "pinned_tokens": pinned[key].pinned_tokens,
                 "hit_tokens": pinned[key].hit_tokens,
                 "text": None if text is None else (text if len(text) <= 80 else text[:77] + "...")}
                for key, text in self.texts.items()]
