"""Incremental detokenization with stop strings.

Text is decoded from a small window of tokens each step (not the whole output), a character is
only emitted once the bytes that make it are complete (no broken UTF-8), and text that could be the
start of a stop string is held back until it is known not to be one.
"""
from __future__ import annotations

from paged.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def append_token(self, seq: Sequence, stop: list[str], emit_text: bool = True) -> bool:
        """Decode the sequence's newest token into ``seq.text``; returns True if a stop string
        appeared (``seq.text`` is then cut right before it)."""
        if not emit_text:
            return False
        ids = seq.token_ids
        before = self._decode(ids[seq.prefix_offset:seq.read_offset])
        after = self._decode(ids[seq.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence or a token with no text yet
        old_len = len(seq.text)
        seq.text += after[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        if stop:
            longest = max(len(s) for s in stop)
            window_start = max(0, old_len - longest + 1)
            hits = [i for i in (seq.text.find(s, window_start) for s in stop) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                return True
        return False

    @staticmethod
    def visible_text(seq: Sequence, stop: list[str]) -> str:
        """The text safe to show now: withholds a tail that could still begin a stop string."""
        if seq.is_finished or not stop:
            return seq.text
        text = seq.text
        hold = 0
        for s in stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold]
