"""Offline batch generation, vLLM-style: ``LLM(model_dir).generate(prompts, params)``."""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from paged.config import EngineConfig
from paged.engine import LLMEngine
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams


class LLM:
    """An engine for offline use. Keyword arguments are ``EngineConfig`` fields."""

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
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = f"offline-{self._counter}"
                self._counter += 1
                self.engine.add_request(request_id, prompt, p, stream=False)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[request_id] for request_id in ids]

    def kv_stats(self) -> dict:
        return self.engine.kv_stats()

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
