"""Reference outputs from the offline engine (``paged.LLM``), for comparing what a server answered.

The engine runs in one persistent subprocess (the model loads once) that answers JSON lines, so
the calling process never runs torch itself (tests and the soak keep their own threads free of
torch, see docs/serving.md) and repeated references cost nothing (they are cached).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SERVER = r"""
import json, sys
from paged import LLM, SamplingParams
llm = LLM(sys.argv[1], **json.loads(sys.argv[2]))
for line in sys.stdin:
    args = json.loads(line)
    params = [SamplingParams(**p) for p in args["params_list"]] if "params_list" in args else \
        SamplingParams(**args["params"])
    outs = llm.generate(args["prompts"], params, use_tqdm=False)
    print(json.dumps([{"text": [c.text for c in o.outputs], "token_ids": [list(c.token_ids) for c in o.outputs],
                       "finish_reason": [c.finish_reason for c in o.outputs],
                       "prompt_token_ids": list(o.prompt_token_ids)} for o in outs]), flush=True)
"""


class OfflineReference:
    """``generate(prompts, **sampling_params)`` -> one dict per prompt: text, token_ids and
    finish_reason per choice, and the prompt's token ids."""

    def __init__(self, model_dir: str | os.PathLike, engine_settings: dict):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(model_dir), json.dumps(engine_settings)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                      cwd=str(ROOT))
        self._cache: dict[str, list[dict]] = {}

    def generate(self, prompts: list, **params) -> list[dict]:
        """Every prompt with the same sampling parameters."""
        return self._ask({"prompts": prompts, "params": params})

    def generate_each(self, prompts: list, params_list: list[dict]) -> list[dict]:
        """Prompt i with ``params_list[i]``, all in one batch."""
        return self._ask({"prompts": prompts, "params_list": params_list})

    def _ask(self, message: dict) -> list[dict]:
        key = json.dumps(message, sort_keys=True)
        if key not in self._cache:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("the offline reference process died")
            self._cache[key] = json.loads(line)
        return self._cache[key]

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
