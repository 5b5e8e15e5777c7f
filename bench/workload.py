"""Seeded synthetic workloads shaped like published request-length statistics.

No data set is downloaded: prompt and output lengths are drawn from log-normal distributions
(heavy right tail, like real chat traffic) whose means are pinned to published figures, and
prompt tokens are uniform random ids from the model's vocabulary (special ids excluded). Every
request ignores EOS, so its output length is exactly the drawn one, for every engine.

Profiles (lengths in tokens, before ``scale``):

- ``sharegpt``: mean prompt 161, mean output 338, prompt <= 1024, prompt + output <= 2048
  (the ShareGPT figures quoted in the vLLM paper); log-normal sigma 1.0 (prompt) and 0.8 (output).
- ``alpaca``: mean prompt 19, mean output 58, same caps; sigma 0.6 and 0.8.

``scale`` multiplies the means, the minimums and the caps (0.5 halves every length: a CPU-sized
ShareGPT). The same (profile, num_requests, scale, seed, vocab) always gives the same workload.

Use as a module (``make_workload``) or a command that writes the workload as JSON:

    python bench/workload.py --profile sharegpt --scale 0.5 -n 64 --model model-store/tiny-llama
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    mean_prompt: float
    mean_output: float
    sigma_prompt: float
    sigma_output: float
    max_prompt: int = 1024
    max_total: int = 2048
    min_prompt: int = 4
    min_output: int = 4


PROFILES: dict[str, Profile] = {
    "sharegpt": Profile("sharegpt", 161.0, 338.0, 1.0, 0.8),
    "alpaca": Profile("alpaca", 19.0, 58.0, 0.6, 0.8),
}


@dataclass
class Workload:
    name: str
    profile: str
    scale: float
    seed: int
    vocab_size: int
    prompts: list[list[int]]
    output_lens: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def summary(self) -> dict[str, Any]:
        pl, ol = self.prompt_lens, self.output_lens
        return {
            "name": self.name, "profile": self.profile, "scale": self.scale, "seed": self.seed,
            "num_requests": self.num_requests,
            "prompt_tokens": sum(pl), "output_tokens": sum(ol),
            "mean_prompt": round(sum(pl) / len(pl), 1), "mean_output": round(sum(ol) / len(ol), 1),
            "max_prompt": max(pl), "max_output": max(ol),
            "max_total": max(p + o for p, o in zip(pl, ol)),
        }

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "profile": self.profile, "scale": self.scale, "seed": self.seed,
                "vocab_size": self.vocab_size, "prompts": self.prompts,
                "output_lens": self.output_lens, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Workload":
        return cls(name=d["name"], profile=d["profile"], scale=d["scale"], seed=d["seed"],
                   vocab_size=d["vocab_size"], prompts=[list(p) for p in d["prompts"]],
                   output_lens=list(d["output_lens"]), meta=d.get("meta", {}))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path: str) -> "Workload":
        with open(path) as f:
            return cls.from_json(json.load(f))


def _lognormal_lengths(rng: random.Random, n: int, mean: float, sigma: float,
                       lo: int, hi: int) -> list[float]:
    # mu chosen so that the untruncated mean is `mean`; the rescaling below pins the sample mean.
    mu = math.log(mean) - sigma * sigma / 2.0
    return [min(max(rng.lognormvariate(mu, sigma), lo), hi) for _ in range(n)]


def _pin_mean(xs: list[float], mean: float, lo: int, hi: int, iters: int = 30) -> list[int]:
    """Rescale samples (then clip) so that their rounded mean is as close to `mean` as the caps allow."""
    ys = list(xs)
    for _ in range(iters):
        cur = sum(ys) / len(ys)
        if abs(cur - mean) < 0.05:
            break
        f = mean / cur
        ys = [min(max(y * f, lo), hi) for y in ys]
    return [int(min(max(round(y), lo), hi)) for y in ys]


def special_token_ids(model_dir: str | None) -> set[int]:
    ids: set[int] = set()
    if not model_dir:
        return ids
    for fname in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, fname)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            cfg = json.load(f)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = cfg.get(key)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list):
                ids.update(x for x in v if isinstance(x, int))
    return ids


def vocab_size_of(model_dir: str) -> int:
    """Ids a prompt may hold: the model's vocabulary, cut to its tokenizer's where that is smaller
    (a checkpoint may pad its embedding past the tokenizer; vLLM refuses ids the tokenizer lacks)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        size = int(json.load(f)["vocab_size"])
    tokenizer_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tokenizer_path):
        with open(tokenizer_path) as f:
            tokenizer = json.load(f)
        ids = list(tokenizer.get("model", {}).get("vocab", {}).values())
        ids += [t["id"] for t in tokenizer.get("added_tokens", [])]
        if ids:
            size = min(size, max(ids) + 1)
    return size


def make_workload(profile: str, num_requests: int, scale: float = 1.0, seed: int = 0,
                  vocab_size: int = 16000, exclude_ids: set[int] | None = None,
                  name: str | None = None) -> Workload:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    if not (0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    p = PROFILES[profile]
    rng = random.Random(f"{profile}:{seed}")  # string seeds are stable across Python versions
    max_prompt = max(1, int(p.max_prompt * scale))
    max_total = max(2, int(p.max_total * scale))
    min_prompt = max(1, round(p.min_prompt * scale))
    min_output = max(1, round(p.min_output * scale))
    mean_prompt, mean_output = p.mean_prompt * scale, p.mean_output * scale

    plens = _pin_mean(_lognormal_lengths(rng, num_requests, mean_prompt, p.sigma_prompt,
                                         min_prompt, max_prompt),
                      mean_prompt, min_prompt, max_prompt)
    max_out = max_total - min_prompt
    olens_f = _lognormal_lengths(rng, num_requests, mean_output, p.sigma_output, min_output, max_out)
    olens = _pin_mean(olens_f, mean_output, min_output, max_out)
    # Enforce the total cap by shortening the output (keeps prompts as drawn).
    olens = [max(min_output, min(o, max_total - pl)) for pl, o in zip(plens, olens)]

    excluded = set(exclude_ids or ())
    allowed_low = 0
    while allowed_low in excluded:
        allowed_low += 1
    prompts: list[list[int]] = []
    for pl in plens:
        toks = []
        while len(toks) < pl:
            t = rng.randrange(allowed_low, vocab_size)
            if t not in excluded:
                toks.append(t)
        prompts.append(toks)
    tag = f"{profile}-x{scale:g}" if scale != 1.0 else profile
    return Workload(name=name or tag, profile=profile, scale=scale, seed=seed, vocab_size=vocab_size,
                    prompts=prompts, output_lens=olens,
                    meta={"sigma_prompt": p.sigma_prompt, "sigma_output": p.sigma_output,
                          "target_mean_prompt": mean_prompt, "target_mean_output": mean_output,
                          "max_prompt": max_prompt, "max_total": max_total,
                          "excluded_token_ids": sorted(excluded)})


def single_request_workload(model_dir: str, prompt_len: int = 16, output_len: int = 256,
                            seed: int = 0) -> Workload:
    """One request (batch-1 decode): ``prompt_len`` random prompt tokens, ``output_len`` new ones."""
    excluded = special_token_ids(model_dir)
    vocab = vocab_size_of(model_dir)
    rng = random.Random(f"single:{seed}")
    prompt: list[int] = []
    while len(prompt) < prompt_len:
        token = rng.randrange(vocab)
        if token not in excluded:
            prompt.append(token)
    return Workload(name=f"batch1-decode-{output_len}", profile="single", scale=1.0, seed=seed,
                    vocab_size=vocab, prompts=[prompt], output_lens=[output_len],
                    meta={"excluded_token_ids": sorted(excluded)})


def workload_for_model(model_dir: str, profile: str, num_requests: int, scale: float = 1.0,
                       seed: int = 0) -> Workload:
    return make_workload(profile, num_requests, scale, seed, vocab_size=vocab_size_of(model_dir),
                         exclude_ids=special_token_ids(model_dir))


def as_text(workload: Workload, model_dir: str) -> list[str]:
    """The prompts decoded to text with the model's tokenizer (for engines that only take text).

    Re-encoding text need not give back the same ids, so the benchmark feeds ids, not this."""
    from transformers import AutoTokenizer  # imported lazily: the generator itself needs no torch
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.decode(p) for p in workload.prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="sharegpt")
    ap.add_argument("-n", "--num-requests", type=int, default=64)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="model-store/tiny-llama", help="checkpoint dir (vocab, special ids)")
    ap.add_argument("--vocab-size", type=int, default=None, help="use instead of --model's config")
    ap.add_argument("--out", default=None, help="write the workload JSON here (else print a summary)")
    args = ap.parse_args()
    if args.vocab_size is not None:
        wl = make_workload(args.profile, args.num_requests, args.scale, args.seed, args.vocab_size)
    else:
        wl = workload_for_model(args.model, args.profile, args.num_requests, args.scale, args.seed)
    if args.out:
        wl.save(args.out)
    print(json.dumps(wl.summary()))


if __name__ == "__main__":
    main()
