"""Offline batch generation, vLLM-style: ``LLM(model_dir).generate(prompts, params)``."""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from paged.config import EngineConfig
from paged.engine import LLMEngine
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams


class LLM:
    """An engine for offline use. Keyword arguments are ``EngineConfig`` fields.

    With ``tensor_parallel_size > 1`` the engine runs worker processes: ``close()`` them (or use
    ``with LLM(...) as llm:``) when done; they also die with this process in any case.
    """

    def __init__(self, model: str, **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. All prompts are validated before any runs.
        A request that failed alone (see ``RequestOutput.error``) is returned like the others."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        for prompt, p in zip(prompts, params):  # every prompt is checked before any runs
            self.engine.validate_request(prompt, p)
        pending = deque()
        for prompt, p in zip(prompts, params):
            pending.append((f"offline-{self._counter}", prompt, p))
            self._counter += 1
        ids = [request_id for request_id, _, _ in pending]
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
                while len(finished) < len(ids):
                    # more prompts than the waiting queue holds enter as room frees up
                    while pending and self.engine.can_accept_request():
                        self.engine.add_request(*pending.popleft(), stream=False)
                    for out in self.engine.step():
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in ids]

    def kv_stats(self) -> dict:
        return self.engine.kv_stats()

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any. Idempotent."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def register_prefix(self, prompt: str | list[int]) -> int:
        """Compute a shared prefix (a system prompt, few-shot examples) once and pin its full blocks:
        eviction never takes them, so requests starting with it compute only their own tokens.
        Returns the number of tokens pinned. ValueError if it would leave no room for one request
        of ``max_model_len`` tokens."""
        return self.engine.register_prefix(prompt)

    def unregister_prefix(self, prompt: str | list[int]) -> int:
        """Unpin a registered prefix (its blocks become evictable); returns the tokens unpinned."""
        return self.engine.unregister_prefix(prompt)

    def save_length_profile(self, path: str) -> None:
        """Save the finished requests' lengths for ``block_size="auto"`` (``block_size_profile=path``)."""
        self.engine.save_length_profile(path)
