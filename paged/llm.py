"""Offline batch generation, vLLM-style: ``LLM(model_dir).generate(prompts, params)``."""
from __future__ import annotations

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

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any. Idempotent."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
