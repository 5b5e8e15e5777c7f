"""A tiny stand-in for paged.engine.LLMEngine: deterministic, no torch, for async-engine and handler tests.

Token ids in a prompt switch on faults, so a test (or a client of a TorchServe running this engine)
can reach every path of the async side:
- ``FAIL_REQUEST_TOKEN``: after two generated tokens the engine fails that request alone (a
  finished output whose ``error`` is a RequestFailedError with status 400), like a row with no
  allowed token;
- ``KILL_ENGINE_TOKEN``: ``step()`` raises, like an engine that cannot go on.
"""
from __future__ import annotations

import time

from paged.errors import EngineOverloadedError, InvalidRequestError, RequestFailedError
from paged.outputs import CompletionOutput, RequestMetrics, RequestOutput

FAIL_REQUEST_TOKEN = 97
KILL_ENGINE_TOKEN = 98


class FakeEngine:
    vocab_size = 100
    max_model_len = 64
    tokenizer = None
    eos_token_ids = [2]

    def __init__(self, config, fail_after_steps: int | None = None, step_sleep_s: float = 0.0):
        self.config = config
        self.fail_after_steps = fail_after_steps
        self.step_sleep_s = step_sleep_s
        self.steps = 0
        self.reqs: dict[str, dict] = {}
        self.added: list[tuple[str, object]] = []   # (request id, prompt as given)
        self.params: dict[str, object] = {}          # request id -> SamplingParams
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params, arrival_time=None, stream=True):
        self.added.append((request_id, prompt))
        self.params[request_id] = params
        if request_id in self.reqs:
            raise InvalidRequestError(None, f"duplicate request id {request_id!r}")
        if isinstance(prompt, str):
            prompt = [ord(c) % self.vocab_size for c in prompt]
        if not prompt:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        if any(t < 0 or t >= self.vocab_size for t in prompt):
            raise InvalidRequestError("prompt", "prompt token ids outside the vocabulary")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError("max_tokens", "prompt + max_tokens longer than max_model_len")
        if len(self.reqs) >= self.config.max_waiting_requests:
            raise EngineOverloadedError("too many waiting requests")
        self.reqs[request_id] = dict(prompt=list(prompt), params=params, out=[], stream=stream,
                                     metrics=RequestMetrics(arrival_time or time.time()))

    def abort_request(self, request_id):
        if self.reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        self.steps += 1
        if self.fail_after_steps is not None and self.steps > self.fail_after_steps:
            raise RuntimeError("boom in step")
        if any(KILL_ENGINE_TOKEN in r["prompt"] for r in self.reqs.values()):
            raise RuntimeError("the engine cannot go on")
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        outs = []
        for rid, r in list(self.reqs.items()):
            params = r["params"]
            if FAIL_REQUEST_TOKEN in r["prompt"] and len(r["out"]) == 2:
                out = RequestOutput(rid, None, r["prompt"], [CompletionOutput(0, "", [], finish_reason="abort")],
                                    True, r["metrics"])
                out.error = RequestFailedError("no token is allowed by this request's parameters", 400)
                outs.append(out)
                del self.reqs[rid]
                continue
            tok = (sum(r["prompt"]) + len(r["out"])) % self.vocab_size
            r["out"].append(tok)
            done = len(r["out"]) >= params.max_tokens
            text = "".join(f"t{t} " for t in r["out"])
            logprobs = [{t: -0.5} for t in r["out"]] if params.logprobs is not None else None
            choices = [CompletionOutput(i, text, list(r["out"]), logprobs=logprobs,
                                        finish_reason="length" if done else None) for i in range(params.n)]
            if r["stream"] or done:  # stream=False: reported once, when finished
                outs.append(RequestOutput(rid, None, r["prompt"], choices, done, r["metrics"]))
            if done:
                del self.reqs[rid]
        return outs

    def kv_stats(self):
        return {"num_blocks": 10, "free_blocks": 10 - len(self.reqs), "num_running": len(self.reqs),
                "num_waiting": 0, "num_swapped": 0, "kv_usage": len(self.reqs) / 10,
                "prefix_hits": 0, "prefix_queries": 0, "prefix_hit_rate": 0.0}
