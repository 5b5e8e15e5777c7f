"""Each rank's weights are exactly its slices of the checkpoint, read without loading whole tensors.

Building and loading a shard needs no process group (collectives run only in the forward), so
these tests build every rank's shard in this process.
"""
import pytest
import safetensors
import torch

import paged.parallel.sharded_model as sharded_model
from paged.models.llama import LlamaForCausalLM
from paged.parallel.context import ParallelContext
from paged.parallel.sharded_model import build_sharded_model

CHECKPOINTS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_odd_vocab_dir"]


@pytest.fixture(params=CHECKPOINTS)
def model_dir(request):
    return request.getfixturevalue(request.param)


def build(model_dir, rank, world_size):
    return build_sharded_model(model_dir, ParallelContext(rank, world_size), torch.float32)


def expected_shards(full: LlamaForCausalLM, layout) -> dict[str, torch.Tensor]:
    """The rank's parameters cut by hand out of the unsharded model's fused parameters."""
    args = full.args
    q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    q, kv, inter = layout.q_rows(), layout.kv_rows(), layout.intermediate_rows()

    def vocab(weight):
        shard = torch.zeros(layout.vocab_per_rank, weight.shape[1])
        shard[:layout.num_real_vocab_rows] = weight[layout.vocab_rows()]
        return shard

    def qkv(fused):
        wq, wk, wv = fused.split([q_size, kv_size, kv_size])
        return torch.cat([wq[q], wk[kv], wv[kv]])

    out = {"embed_tokens.weight": vocab(full.embed_tokens.weight), "lm_head.weight": vocab(full.lm_head.weight),
           "norm.weight": full.norm.weight}
    for i, layer in enumerate(full.layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        out[p + "qkv.weight"] = qkv(layer.self_attn.qkv_proj.weight)
        if args.attention_bias:
            out[p + "qkv.bias"] = qkv(layer.self_attn.qkv_proj.bias)
        out[p + "o_proj.weight"] = layer.self_attn.o_proj.weight[:, q]
        gate, up = layer.mlp.gate_up_proj.weight.split(args.intermediate_size)
        out[p + "gate_up.weight"] = torch.cat([gate[inter], up[inter]])
        out[p + "down.weight"] = layer.mlp.down_proj.weight[:, inter]
    return out


def actual_shards(model) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": model.embed_tokens.weight, "lm_head.weight": model.lm_head.weight,
           "norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        out[p + "qkv.weight"] = layer.self_attn.qkv_proj.weight
        if layer.self_attn.qkv_proj.bias is not None:
            out[p + "qkv.bias"] = layer.self_attn.qkv_proj.bias
        out[p + "o_proj.weight"] = layer.self_attn.o_proj.weight
        out[p + "gate_up.weight"] = layer.mlp.gate_up_proj.weight
        out[p + "down.weight"] = layer.mlp.down_proj.weight
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_rank_holds_exactly_its_slices(model_dir, world_size):
    full = LlamaForCausalLM.from_pretrained(model_dir, torch.float32)
    for rank in range(world_size):
        model, layout = build(model_dir, rank, world_size)
        expected, actual = expected_shards(full, layout), actual_shards(model)
        assert sorted(actual) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(actual[name], value), f"rank {rank}: {name}"


def test_tied_embeddings_share_one_vocab_shard(tiny_qwen2_dir):
    model, _ = build(tiny_qwen2_dir, 1, 2)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_replicated_kv_heads_give_every_rank_the_same_kv_rows(tiny_qwen2_dir):
    (m0, layout), (m1, _) = build(tiny_qwen2_dir, 0, 2), build(tiny_qwen2_dir, 1, 2)
    q_size = layout.num_heads * layout.head_dim
    kv0 = m0.layers[0].self_attn.qkv_proj.weight[q_size:]
    assert torch.equal(kv0, m1.layers[0].self_attn.qkv_proj.weight[q_size:])


class RecordingSafeOpen:
    """Stands in for ``safe_open``: counts the elements each slice read returns and forbids whole
    tensor reads."""

    def __init__(self):
        self.elements = 0

    def __call__(self, *args, **kwargs):
        recorder = self
        reader = safetensors.safe_open(*args, **kwargs)

        class Reader:
            def __enter__(self):
                self.inner = reader.__enter__()
                return self

            def __exit__(self, *exc):
                return reader.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                raise AssertionError(f"whole tensor {name} read")

            def get_slice(self, name):
                tensor_slice = self.inner.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        value = tensor_slice[index]
                        recorder.elements += value.numel()
                        return value
                return Slice()
        return Reader()


def test_ranks_read_only_their_slices(tiny_llama_dir, monkeypatch):
    """Without KV replication or vocabulary padding, the ranks together read every element once,
    plus one copy of the (small, replicated) norm weights per extra rank."""
    with safetensors.safe_open(str(tiny_llama_dir / "model.safetensors"), framework="pt") as reader:
        sizes = {name: reader.get_slice(name).get_shape() for name in reader.keys()}
    total = sum(torch.Size(shape).numel() for shape in sizes.values())
    norms = sum(torch.Size(shape).numel() for name, shape in sizes.items() if "norm" in name)
    read = []
    for rank in range(2):
        recorder = RecordingSafeOpen()
        monkeypatch.setattr(sharded_model, "safe_open", recorder)
        build(tiny_llama_dir, rank, 2)
        read.append(recorder.elements)
    assert sum(read) == total + norms
    assert read[0] == read[1]
