"""Incremental detokenization with stop strings.

Text is decoded from a small window of tokens each step (not the whole output), a character is
only emitted once the bytes that make it are complete (no broken UTF-8), and text that could be the
start of a stop string is held back until it is known not to be one.

Stop strings are matched with an Aho-Corasick automaton (``StopMatcher``), one per distinct stop
list, so a step costs O(new characters) whatever the number of stop strings: the automaton state
reached at the end of a sequence's text is remembered with the sequence, and the next step feeds
only the characters it added. The same state gives the hold-back: the longest tail of the text that
is a proper prefix of some stop string. Without a remembered state (a forked sequence, stop strings
that start counting at ``min_tokens``) the last ``longest - 1`` characters are scanned from the
root, which is exact because no match can start earlier and end later.
"""
from __future__ import annotations

import functools
import weakref
from collections import deque

from paged.sequence import Sequence


class StopMatcher:
    """Aho-Corasick automaton over a list of stop strings (the characters of Python strings).

    Per node: ``depth`` (length of the prefix it spells), ``match_len`` (the longest stop string
    that ends here, 0 if none) and ``hold`` (the longest proper prefix of a stop string that is a
    suffix of the text read so far).
    """

    def __init__(self, patterns: tuple[str, ...]):
        self.longest = max(len(p) for p in patterns)
        goto: list[dict[str, int]] = [{}]
        depth, match_len = [0], [0]
        for pattern in patterns:
            node = 0
            for ch in pattern:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    depth.append(depth[node] + 1)
                    match_len.append(0)
                node = nxt
            match_len[node] = len(pattern)
        fail = [0] * len(goto)
        hold = [0] * len(goto)
        queue = deque(goto[0].values())
        for child in queue:
            hold[child] = 1 if goto[child] else 0
        while queue:  # breadth first: a node's failure target is shallower, so already final
            node = queue.popleft()
            for ch, child in goto[node].items():
                target = fail[node]
                while target and ch not in goto[target]:
                    target = fail[target]
                fail[child] = goto[target].get(ch, 0)
                match_len[child] = max(match_len[child], match_len[fail[child]])
                hold[child] = depth[child] if goto[child] else hold[fail[child]]
                queue.append(child)
        self._goto, self._fail, self.match_len, self.hold = goto, fail, match_len, hold

    def scan(self, text: str, start: int, state: int = 0) -> tuple[int, int | None]:
        """Feed ``text[start:]`` from ``state``.

        Returns (state after the text, start index of the earliest-starting stop string that ends
        in ``text[start:]``, or None). After a first match the scan goes on only as far as a
        longer stop string starting earlier could still end.
        """
        goto, fail, match_len = self._goto, self._fail, self.match_len
        first = None
        end = len(text)
        i = start
        while i < end:
            ch = text[i]
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match_len[state]:
                begin = i - match_len[state] + 1
                if first is None or begin < first:
                    first = begin
                    end = min(end, first + self.longest - 1)
            i += 1
        return state, first


@functools.lru_cache(maxsize=256)
def stop_matcher(stop: tuple[str, ...]) -> StopMatcher:
    """The automaton of one stop list, built once and shared by every request that uses it."""
    return StopMatcher(stop)


# Sequence -> (matcher, len(seq.text), state at the end of seq.text). Valid while seq.text only
# grows through append_token (the engine's invariant); weak keys, so finished sequences drop out.
_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_at_end(seq: Sequence, matcher: StopMatcher) -> int:
    """The automaton state after ``seq.text``: remembered, or rebuilt from the last characters."""
    known = _states.get(seq)
    if known is not None and known[0] is matcher and known[1] == len(seq.text):
        return known[2]
    state, _ = matcher.scan(seq.text, max(0, len(seq.text) - matcher.longest + 1))
    return state


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

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
        if not stop:
            seq.text += after[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return False
        matcher = stop_matcher(tuple(stop))
        state = _state_at_end(seq, matcher)
        old_len = len(seq.text)
        seq.text += after[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        state, first = matcher.scan(seq.text, old_len, state)
        if first is not None:
            seq.text = seq.text[:first]
            _states.pop(seq, None)
            return True
        _states[seq] = (matcher, len(seq.text), state)
        return False

    def catch_up(self, seq: Sequence, skip_last: bool = False) -> None:
        """Decode every token not yet in ``seq.text`` at once: the same text ``append_token`` would
        have built token by token (without stop strings), for requests that skip per-step
        detokenization because nobody reads their text before they finish. ``skip_last``: the
        last token ended the sequence as a stop token, whose text is not shown."""
        end = len(seq.token_ids) - int(skip_last)
        if seq.read_offset >= end:
            return
        ids = seq.token_ids[:end]
        before = self._decode(ids[seq.prefix_offset:seq.read_offset])
        after = self._decode(ids[seq.prefix_offset:])
        if after.endswith("\ufffd"):
            # the tokens end inside a character: token by token, that tail is never shown
            full, seq.token_ids = seq.token_ids, ids[:seq.read_offset]
            for token in ids[seq.read_offset:]:
                seq.token_ids.append(token)
                self.append_token(seq, [])
            seq.token_ids = full
            return
        if len(after) > len(before):
            seq.text += after[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, end

    @staticmethod
    def visible_text(seq: Sequence, stop: list[str]) -> str:
        """The text safe to show now: withholds a tail that could still begin a stop string."""
        if seq.is_finished or not stop:
            return seq.text
        matcher = stop_matcher(tuple(stop))
        hold = matcher.hold[_state_at_end(seq, matcher)]
        return seq.text[:len(seq.text) - hold]
