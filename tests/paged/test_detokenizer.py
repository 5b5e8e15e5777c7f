"""Incremental detokenization with the default model's real (byte-level BPE) tokenizer.

Token streams are built so that multi-byte characters (accents, CJK, emoji) are split across
tokens: each piece of the text is either tokenized normally or spelled as one token per UTF-8
byte. The specification: the text built token by token equals the full decode, never shows a
broken character (U+FFFD) that the full text does not have, only grows, and stops right before
a stop string; ``visible_text`` never shows a tail that could still become a stop string.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged.detokenizer import Detokenizer
from paged.sampling_params import SamplingParams
from paged.sequence import SequenceGroup, SequenceStatus

REPLACEMENT = "\ufffd"
PIECES = ["a", "b", "S", "T", "O", "P", " ", "\n", ".", ",", "!", "def", " the", "é", "ñ", "ü", "Ç",
          "东", "京", "漢", "字", "ア", "🎉", "🚀", "👩\u200d💻", "🇫🇷", "e\u0301", "Ω", "€", "ß"]
MULTIBYTE_TEXTS = [
    "Café naïve résumé",
    "東京は晴れ、漢字テスト",
    "party 🎉🚀 done",
    "family 👩\u200d👩\u200d👧 flag 🇫🇷 coder 👩\u200d💻",
    "mixed: Ωmega € 5 — ß ç 东京 ✓",
]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---- tokenizer and token streams ------------------------------------------------------------------
def _byte_symbols() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the rest are
    shifted to code points from 256 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return symbols


class Tok:
    """The real tokenizer plus one token id per byte."""

    def __init__(self, model_dir):
        from transformers import AutoTokenizer
        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        symbols = _byte_symbols()
        self.byte_ids = [self.hf.convert_tokens_to_ids(symbols[b]) for b in range(256)]
        assert len(set(self.byte_ids)) == 256 and not set(self.byte_ids) & set(self.hf.all_special_ids)
        probe = "é東🎉"
        assert self.decode(self.bytes_of(probe)) == probe, "byte tokens do not round-trip"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def bytes_of(self, text: str) -> list[int]:
        return [self.byte_ids[b] for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


_TOKENIZERS: dict[str, Tok] = {}


@pytest.fixture(scope="module")
def tok(tiny_llama_dir) -> Tok:
    key = str(tiny_llama_dir)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tok(tiny_llama_dir)
    return _TOKENIZERS[key]


def stream(tok: Tok, pieces: list[tuple[str, bool]]) -> list[int]:
    """Token ids for the concatenated pieces; a piece flagged True is spelled byte by byte."""
    ids = []
    for text, as_bytes in pieces:
        ids += tok.bytes_of(text) if as_bytes else tok.encode(text)
    return ids


texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join)
segmented = st.lists(st.tuples(texts, st.booleans()), min_size=1, max_size=4)


def new_seq(tok: Tok, prompt: str = "Q: ", stop=()):
    params = SamplingParams(stop=list(stop), max_tokens=512)
    group = SequenceGroup("r", prompt, tok.hf.encode(prompt), params, 1, 0.0, None, None)
    return group.seqs[0]


def feed(detok: Detokenizer, seq, ids: list[int], stop=(), on_step=None):
    """Append tokens like the engine does until a stop string appears; returns (index, hit)."""
    for i, token in enumerate(ids):
        seq.token_ids.append(token)
        hit = detok.append_token(seq, list(stop))
        if hit:
            seq.status = SequenceStatus.FINISHED
        if on_step is not None:
            on_step(i, hit)
        if hit:
            return i, True
    seq.status = SequenceStatus.FINISHED
    return len(ids) - 1, False


# ---- incremental decoding -------------------------------------------------------------------------
@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
@pytest.mark.parametrize("as_bytes", [False, True], ids=["bpe", "bytes"])
def test_incremental_text_equals_the_full_decode(tok, text, as_bytes):
    ids = tok.bytes_of(text) if as_bytes else tok.encode(text)
    assert tok.decode(ids) == text
    seq = new_seq(tok)
    seen = []
    feed(Detokenizer(tok.hf), seq, ids, on_step=lambda i, hit: seen.append(seq.text))
    assert seq.text == text
    assert all(REPLACEMENT not in t for t in seen), "a broken character was shown"
    assert all(text.startswith(t) for t in seen)


@SETTINGS
@given(prompt=texts, pieces=segmented)
def test_incremental_decoding_of_any_segmentation_matches_the_full_decode(tok, prompt, pieces):
    ids = stream(tok, pieces)
    full = tok.decode(ids)
    assert full == "".join(text for text, _ in pieces)
    seq = new_seq(tok, prompt=prompt)
    detok = Detokenizer(tok.hf)
    previous = ""

    def check(i, hit):
        nonlocal previous
        assert seq.text.startswith(previous), "text only grows by appending"
        assert full.startswith(seq.text)
        assert REPLACEMENT not in seq.text
        previous = seq.text

    feed(detok, seq, ids, on_step=check)
    assert seq.text == full


def test_special_tokens_in_the_output_add_no_text(tok):
    eos, bos = tok.hf.eos_token_id, tok.hf.bos_token_id
    ids = tok.encode("ab") + [eos] + tok.bytes_of("é") + [bos, eos] + tok.encode(" cd")
    seq = new_seq(tok)
    feed(Detokenizer(tok.hf), seq, ids)
    assert seq.text == "abé cd"


def test_a_token_holding_half_a_character_adds_nothing_until_the_character_is_complete(tok):
    seq = new_seq(tok)
    detok = Detokenizer(tok.hf)
    first, second, third, fourth = tok.bytes_of("🎉")
    for token in (first, second, third):
        seq.token_ids.append(token)
        assert detok.append_token(seq, []) is False
        assert seq.text == ""
    seq.token_ids.append(fourth)
    detok.append_token(seq, [])
    assert seq.text == "🎉"


def test_no_text_is_decoded_when_emit_text_is_off(tok):
    seq = new_seq(tok, stop=["a"])
    seq.token_ids += tok.encode("a b")
    assert Detokenizer(tok.hf).append_token(seq, ["a"], emit_text=False) is False
    assert seq.text == ""


def test_decoding_window_starts_within_the_prompt_so_spacing_is_kept(tok):
    seq = new_seq(tok, prompt="x " * 20)
    feed(Detokenizer(tok.hf), seq, tok.encode(" hello world"))
    assert seq.text == " hello world"


# ---- stop strings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("as_bytes", [False, True], ids=["bpe", "bytes"])
def test_a_stop_string_split_across_tokens_is_found_and_cut_before(tok, as_bytes):
    text = "Hello, world! STOP and more"
    ids = tok.bytes_of(text) if as_bytes else tok.encode(text)
    seq = new_seq(tok, stop=["STOP"])
    index, hit = feed(Detokenizer(tok.hf), seq, ids, stop=["STOP"])
    assert hit
    assert seq.text == "Hello, world! "
    assert "STOP" in tok.decode(ids[:index + 1]) and "STOP" not in tok.decode(ids[:index]), \
        "found at the token that completes it, not later"


def test_a_multibyte_stop_string_is_found_once_its_last_byte_arrives(tok):
    text = "go 東京 now"
    ids = tok.bytes_of(text)
    seq = new_seq(tok, stop=["東京"])
    index, hit = feed(Detokenizer(tok.hf), seq, ids, stop=["東京"])
    assert hit and seq.text == "go "
    assert index == len("go 東京".encode()) - 1


def test_a_stop_string_at_the_start_of_the_output_leaves_no_text(tok):
    seq = new_seq(tok, stop=["ab"])
    _, hit = feed(Detokenizer(tok.hf), seq, tok.bytes_of("abc"), stop=["ab"])
    assert hit and seq.text == ""


def test_text_after_the_stop_string_in_the_same_token_is_dropped(tok):
    seq = new_seq(tok, stop=["!"])
    _, hit = feed(Detokenizer(tok.hf), seq, tok.encode("hey") + tok.bytes_of("x") + [tok.encode("!!")[0]],
                  stop=["!"])
    assert hit and seq.text == "heyx"


def test_of_several_stop_strings_completed_by_one_token_the_earliest_cuts(tok):
    seq = new_seq(tok, stop=["cd", "bcd!"])
    detok = Detokenizer(tok.hf)
    feed(detok, seq, tok.bytes_of("ab"))
    seq.status = SequenceStatus.RUNNING
    seq.token_ids += tok.encode("cd!")
    assert detok.append_token(seq, ["cd", "bcd!"])
    assert seq.text == "a"


def test_a_stop_string_that_never_appears_leaves_the_full_text(tok):
    seq = new_seq(tok, stop=["zzz"])
    _, hit = feed(Detokenizer(tok.hf), seq, tok.encode("zz z zz"), stop=["zzz"])
    assert not hit and seq.text == "zz z zz"


@SETTINGS
@given(pieces=segmented, data=st.data())
def test_any_stop_string_cuts_the_text_at_its_first_occurrence(tok, pieces, data):
    ids = stream(tok, pieces)
    full = tok.decode(ids)
    if data.draw(st.booleans(), label="stop taken from the text") and len(full) >= 1:
        start = data.draw(st.integers(0, len(full) - 1), label="start")
        stop = full[start:start + data.draw(st.integers(1, 4), label="length")]
    else:
        stop = data.draw(texts, label="stop")
    seq = new_seq(tok, stop=[stop])
    index, hit = feed(Detokenizer(tok.hf), seq, ids, stop=[stop])
    assert hit == (stop in full)
    assert seq.text == (full[:full.find(stop)] if stop in full else full)
    if hit:
        assert stop in tok.decode(ids[:index + 1]), "never reported before the stop string is complete"


# ---- visible_text ---------------------------------------------------------------------------------
def test_visible_text_is_the_whole_text_without_stop_strings(tok):
    seq = new_seq(tok)
    seq.text = "abc S"
    assert Detokenizer.visible_text(seq, []) == "abc S"


def test_visible_text_holds_back_the_longest_tail_that_could_begin_a_stop_string(tok):
    seq = new_seq(tok)
    seq.text = "xabc"
    assert Detokenizer.visible_text(seq, ["cz", "bcy"]) == "xa"
    assert Detokenizer.visible_text(seq, ["abcd"]) == "x"
    assert Detokenizer.visible_text(seq, ["q"]) == "xabc"


def test_visible_text_of_a_finished_sequence_is_all_of_its_text(tok):
    seq = new_seq(tok)
    seq.text = "the end S"
    seq.status = SequenceStatus.FINISHED
    assert Detokenizer.visible_text(seq, ["STOP"]) == "the end S"


@SETTINGS
@given(pieces=segmented, stops=st.lists(texts.map(lambda t: t[:5]), min_size=1, max_size=3), data=st.data())
def test_visible_text_only_grows_and_never_shows_a_possible_stop_prefix(tok, pieces, stops, data):
    ids = stream(tok, pieces)
    full = tok.decode(ids)
    if data.draw(st.booleans(), label="add a stop string from the text") and len(full) > 2:
        start = data.draw(st.integers(0, len(full) - 2), label="start")
        stops = stops + [full[start:start + 3]]
    seq = new_seq(tok, stop=stops)
    shown = []

    def check(i, hit):
        visible = Detokenizer.visible_text(seq, stops)
        if shown:
            assert visible.startswith(shown[-1]), f"visible text shrank: {shown[-1]!r} -> {visible!r}"
        shown.append(visible)
        assert seq.text.startswith(visible)
        assert not any(s in visible for s in stops)
        if not seq.is_finished:
            held = len(seq.text) - len(visible)
            for s in stops:
                for k in range(1, len(s)):
                    if seq.text.endswith(s[:k]):
                        assert held >= k, f"{seq.text!r} shows {s[:k]!r}, the start of stop {s!r}"

    feed(Detokenizer(tok.hf), seq, ids, stop=stops, on_step=check)
    assert Detokenizer.visible_text(seq, stops) == seq.text
    assert all(seq.text.startswith(v) for v in shown), "the final text extends everything shown"


# ---- the stop-string automaton --------------------------------------------------------------------
ALPHABET = "abc!é東"


def brute_force_hold(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@SETTINGS
@given(stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=6),
       text=st.text(ALPHABET, max_size=30), split=st.integers(0, 30))
def test_the_automaton_finds_the_earliest_stop_string_and_the_tail_to_hold(stops, text, split):
    from paged.detokenizer import StopMatcher

    matcher = StopMatcher(tuple(stops))
    split = min(split, len(text))
    state, first = matcher.scan(text, 0)
    starts = [text.find(s) for s in stops if s in text]
    assert first == (min(starts) if starts else None)
    if first is None:
        assert matcher.hold[state] == brute_force_hold(text, stops)
        # feeding in two pieces reaches the same state as feeding at once
        mid, _ = matcher.scan(text[:split], 0)
        assert matcher.scan(text, split, mid)[0] == state


def test_each_step_scans_only_the_new_characters(tok, monkeypatch):
    """O(new text) per step: with the state remembered, a step feeds the automaton only the
    characters it added, however many stop strings there are."""
    from paged import detokenizer

    scanned = []
    real_scan = detokenizer.StopMatcher.scan

    def counting_scan(self, text, start, state=0):
        scanned.append(len(text) - start)
        return real_scan(self, text, start, state)

    monkeypatch.setattr(detokenizer.StopMatcher, "scan", counting_scan)
    stops = [f"never{i:04d}" for i in range(30)]
    seq = new_seq(tok, stop=stops)
    detok = Detokenizer(tok.hf)
    added = []
    for token in tok.encode("a long enough output " * 10):
        before = len(seq.text)
        seq.token_ids.append(token)
        assert not detok.append_token(seq, stops)
        added.append(len(seq.text) - before)
        Detokenizer.visible_text(seq, stops)
    # the very first step has no remembered state: it rebuilds it from the (empty) text
    assert sum(scanned) == sum(added)


def test_the_automaton_of_a_stop_list_is_built_once():
    from paged.detokenizer import stop_matcher

    assert stop_matcher(("x", "yz")) is stop_matcher(("x", "yz"))


# ---- decoding once, at the end --------------------------------------------------------------------
@SETTINGS
@given(prompt=texts, pieces=segmented, cut=st.integers(0, 3))
def test_catching_up_at_the_end_gives_the_text_built_token_by_token(tok, prompt, pieces, cut):
    """``catch_up`` (non-streamed requests decode once, when they finish) equals the incremental
    text, also when the tokens end inside a multi-byte character (``cut`` bytes dropped)."""
    ids = stream(tok, pieces)
    ids = ids[:max(1, len(ids) - cut)]
    incremental = new_seq(tok, prompt=prompt)
    feed(Detokenizer(tok.hf), incremental, ids)
    once = new_seq(tok, prompt=prompt)
    once.token_ids.extend(ids)
    Detokenizer(tok.hf).catch_up(once)
    assert once.text == incremental.text and once.token_ids == incremental.token_ids


def test_catching_up_leaves_out_a_final_stop_token(tok):
    ids = tok.encode("def main(): return 1")
    seq = new_seq(tok)
    seq.token_ids.extend(ids)
    Detokenizer(tok.hf).catch_up(seq, skip_last=True)
    assert seq.text == tok.decode(ids[:-1])
