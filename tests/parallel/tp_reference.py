"""References for the tensor-parallel engine tests: HF transformers' greedy tokens and a tie-aware
comparison.

A row-parallel layer sums partial products over the ranks, which adds them in another order than
one GEMM does, so logits differ from the unsharded model in the last bits (~1e-5 here). Where the
two best tokens of HF's logits are closer than that, either may come out; such a position counts
as a tie (``TIE_GAP``), and the sequences are compared only up to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TIE_GAP = 1e-4
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class Queue:\n    def __init__(self):\n        self.items = []\n",
    "The quick brown fox",
    "for key, value in sorted(mapping.items()):\n    print(key, value)\n" * 4,
    "x",
    "try:\n    result = compute()\nexcept KeyError as error:\n",
    "def area(r):\n    return 3.14159 * r * r\n\n\ndef volume(r, h):\n    return area(r) * h\n\n\n" * 4,
    "SELECT id, name FROM users WHERE active = 1 ORDER BY name;",
    "with open(path, 'rb') as handle:\n    payload = handle.read()\n" * 6,
]
MAX_TOKENS = [24, 32, 16, 28, 20, 30, 18, 22, 26, 16]


class HFReference:
    """HF's model and tokenizer for one checkpoint: greedy continuations and logits gaps."""

    def __init__(self, model_dir):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    @torch.inference_mode()
    def greedy(self, prompts: list[str], max_tokens: list[int]) -> list[list[int]]:
        """One prompt at a time (no padding), stopping at EOS as HF does."""
        outputs = []
        for prompt, count in zip(prompts, max_tokens):
            ids = torch.tensor([self.prompt_ids(prompt)])
            generated = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                                            do_sample=False, pad_token_id=self.tokenizer.pad_token_id or 0)
            outputs.append(generated[0, ids.shape[1]:].tolist())
        return outputs

    @torch.inference_mode()
    def top2_gap(self, token_ids: list[int]) -> float:
        """Logit of the best next token minus the second best, after ``token_ids``."""
        logits = self.model(torch.tensor([token_ids])).logits[0, -1].float()
        top = logits.topk(2).values
        return float(top[0] - top[1])


@dataclass
class Agreement:
    """How two sets of greedy continuations agree: equal ones, and ties (positions where HF's two
    best logits were within TIE_GAP and the continuations took different ones)."""
    equal: int = 0
    ties: list[tuple[int, int, float]] = field(default_factory=list)  # (sequence, position, gap)


def compare_greedy(hf: HFReference, prompts: list[str], got: list[list[int]], want: list[list[int]]) -> Agreement:
    """``got`` must equal ``want`` token for token, except from a tie on; AssertionError otherwise."""
    agreement = Agreement()
    for index, (prompt, a, b) in enumerate(zip(prompts, got, want)):
        if a == b:
            agreement.equal += 1
            continue
        position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = hf.top2_gap(hf.prompt_ids(prompt) + b[:position])
        assert gap < TIE_GAP, (f"prompt {index} differs at token {position} where HF's top-2 gap is {gap:.2e} "
                               f"(no tie): got {a} want {b}")
        agreement.ties.append((index, position, gap))
    print(f"greedy agreement: {agreement.equal}/{len(prompts)} equal, ties {agreement.ties}")
    return agreement
