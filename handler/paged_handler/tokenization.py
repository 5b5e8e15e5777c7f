"""Prompt tokenization and chat templates on a small thread pool: off the event loop (which must keep
streaming other requests) and off the engine thread (which must keep stepping).

The tokenizers are Rust (``tokenizers``) and run no torch ops, so these threads do not touch
torch's OpenMP pool (the engine thread stays the only torch thread, see paged/async_engine.py).
Each thread owns its tokenizer instance: a transformers call mutates the Rust tokenizer's
truncation/padding state, and two threads sharing one instance can fail with "Already borrowed".
The event loop has its own instance too, for the short per-token decodes of logprobs answers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import queue
import threading

from paged_handler.errors import RequestError


def _load(model: str):
    """The tokenizer of a checkpoint directory or of a GGUF file (its embedded vocabulary)."""
    from paged.models.gguf_checkpoint import load_tokenizer

    return load_tokenizer(model)


class TokenizerPool:
    """``threads`` tokenizer threads; at most ``max_pending`` requests wait for one (then 503)."""

    def __init__(self, model_dir: str, threads: int = 2, max_pending: int = 64):
        self._instances: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self._instances.put(_load(model_dir))
        self._local = threading.local()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="paged-tokenizer", initializer=self._take_instance)
        self._max_pending = max_pending
        self._pending = 0  # changed on the event loop thread only
        self._loop_tokenizer = _load(model_dir)
        self.has_chat_template = bool(getattr(self._loop_tokenizer, "chat_template", None))
        self.longest_token_chars, self.longest_token_json_bytes = _token_sizes(self._loop_tokenizer)

    def _take_instance(self) -> None:
        self._local.tokenizer = self._instances.get()

    async def _run(self, fn, *args):
        if self._pending >= self._max_pending:
            raise RequestError(f"server overloaded: {self._pending} requests are waiting for tokenization; "
                               "retry later", 503, "overloaded")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._pending -= 1

    async def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt, exactly as the engine would tokenize it (special tokens added)."""
        return await self._run(self._encode, text)

    def _encode(self, text: str) -> list[int]:
        return list(self._local.tokenizer(text).input_ids)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Token ids of a chat rendered with the checkpoint's template (a plain one if it has none)."""
        return await self._run(self._encode_chat, messages, add_generation_prompt)

    def _encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        tok = self._local.tokenizer
        if self.has_chat_template:
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - template errors are about the caller's messages
                raise RequestError(f"chat template failed: {str(exc)[:300]}", param="messages") from None
        else:  # no template in the checkpoint: a plain, documented fallback
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
            if add_generation_prompt:
                text += "<|assistant|>\n"
        return list(tok(text, add_special_tokens=False)["input_ids"])

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one pool per worker, lives as long as it
    def token_text(self, token_id: int) -> str:
        """The text of one token alone (logprobs answers); event loop thread only."""
        return self._loop_tokenizer.decode([token_id], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _token_sizes(tok) -> tuple[int, int]:
    """(most characters, most JSON-encoded UTF-8 bytes) any single token can add to a text.

    The second bounds the size of an answer before it is generated (control characters escape to
    six bytes). A byte-level token that decodes to a replacement character alone is counted as that
    character, which is more than the byte it stands for.
    """
    most_chars, most_bytes = 1, 1
    for token_id in range(len(tok)):
        text = tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        most_chars = max(most_chars, len(text))
        most_bytes = max(most_bytes, len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2)
    return most_chars, most_bytes
