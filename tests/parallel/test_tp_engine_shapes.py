"""Tensor parallel over shapes that split unevenly: a single KV head (replicated on both ranks, with
q/k/v bias and tied embeddings: tiny-qwen2) and a vocabulary of 16001 rows (padded to 16002, the
padding cut off before sampling). Greedy output equals HF's and the single-device engine's
(tie-aware, see tp_reference.py), with chunked prefill and preemption."""
import pytest

from paged import LLM, SamplingParams
from tp_reference import MAX_TOKENS, PROMPTS, HFReference, compare_greedy

SETTINGS = dict(block_size=16, num_kv_blocks=24, max_num_batched_tokens=48, enable_prefix_caching=True, seed=0,
                dtype="float32")


@pytest.fixture(scope="module", params=["tiny_qwen2_dir", "tiny_odd_vocab_dir"])
def checkpoint(request):
    model_dir = request.getfixturevalue(request.param)
    with LLM(str(model_dir), tensor_parallel_size=2, **SETTINGS) as tp_llm:
        yield model_dir, tp_llm


def greedy_tokens(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in MAX_TOKENS]
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_greedy_equals_hf_and_the_single_device_engine(checkpoint):
    model_dir, tp_llm = checkpoint
    hf = HFReference(model_dir)
    got = greedy_tokens(tp_llm)
    stats = tp_llm.kv_stats()
    assert stats["num_recompute_preemptions"] + stats["num_swap_preemptions"] > 0, "the pool was never short"
    compare_greedy(hf, PROMPTS, got, hf.greedy(PROMPTS, MAX_TOKENS))
    compare_greedy(hf, PROMPTS, got, greedy_tokens(LLM(str(model_dir), **SETTINGS)))
    assert stats["free_blocks"] == stats["num_blocks"]


def test_ranks_hold_the_kv_heads_the_split_gives_them(checkpoint):
    model_dir, tp_llm = checkpoint
    args = tp_llm.engine.model_args
    ranks = tp_llm.engine.performance_info()["tensor_parallel"]["ranks"]
    assert [r["kv_heads"] for r in ranks] == [max(1, args.num_kv_heads // 2)] * 2
