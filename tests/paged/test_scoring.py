"""paged/scoring.py: windows, and our runner's next-token log-probabilities against HF's."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from paged.scoring import SequenceScorer, hf_token_logprobs, windows


def test_windows_cut_consecutively_and_drop_a_lone_last_token():
    assert windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="max_len"):
        windows([1, 2], 1)


def test_float32_logprobs_equal_hf_over_several_windows(tiny_llama_dir):
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(3, 16000, (150,), generator=generator).tolist()
    scorer = SequenceScorer(str(tiny_llama_dir), max_len=64, dtype="float32", block_size=16)
    ours = scorer.token_logprobs(token_ids)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    reference = hf_token_logprobs(model, token_ids, max_len=64)
    assert ours.shape == reference.shape == (63 + 63 + 21,)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)  # logprobs ~ -35 here: fp32 GEMM order


def test_a_window_longer_than_the_pool_and_unsupported_settings_are_refused(tiny_llama_dir):
    scorer = SequenceScorer(str(tiny_llama_dir), max_len=32, dtype="float32")
    with pytest.raises(ValueError, match="2..32 tokens"):
        scorer.window_logprobs(list(range(33)))
    with pytest.raises(ValueError, match="integer block_size"):
        SequenceScorer(str(tiny_llama_dir), dtype="float32", block_size="auto")
