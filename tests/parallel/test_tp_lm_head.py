"""A rank's LM-head shard writes its logits into memory the rank reuses from step to step (no
fresh mapping per step), with the values its plain forward computes."""
import pytest
import torch

from paged.models.logits_buffers import LogitsBuffers
from paged.parallel.layers import ParallelLMHead
from paged.parallel.partition import shard_layout

HIDDEN, VOCAB, ROWS = 32, 101, 5


def lm_head_shard(dtype: torch.dtype, rank: int = 1) -> ParallelLMHead:
    layout = shard_layout(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                          vocab_size=VOCAB, world_size=2, rank=rank)
    head = ParallelLMHead(layout, HIDDEN)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(rank)))
    return head.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_into_writes_the_shard_logits_into_the_given_memory(dtype):
    head = lm_head_shard(dtype)
    hidden = torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(9)).to(dtype)
    out = torch.empty(ROWS, head.out_features, dtype=dtype)
    got = head.forward_into(hidden, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, head(hidden), rtol=0, atol=0)


def test_out_features_is_the_padded_shard_width():
    head = lm_head_shard(torch.float32)
    assert head.out_features == head.layout.vocab_per_rank == -(-VOCAB // 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_rank_model_computes_its_shard_logits_in_the_reused_buffers(tiny_llama_dir, dtype):
    from paged.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype)
    layout = shard_layout(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                          vocab_size=model.args.vocab_size, world_size=2, rank=0)
    model.lm_head = ParallelLMHead(layout, model.args.hidden_size).to(dtype).requires_grad_(False)
    model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(4)))
    hidden = torch.randn(ROWS, model.args.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    buffers = LogitsBuffers(max_rows=8)
    with torch.inference_mode():
        expected = model.compute_logits(hidden)
        got = model.compute_logits(hidden, buffers)
    assert got.shape == (ROWS, layout.vocab_per_rank) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.data_ptr() == buffers.rows(ROWS, layout.vocab_per_rank, torch.float32).data_ptr()
