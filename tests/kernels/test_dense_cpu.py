"""The compiled dense kernels (kernels/paged_kernels/csrc/dense_cpu.cpp: rms_norm, add_rms_norm, silu_and_mul,
rotary_qkv) against the torch reference in paged/models/forward_ops.py, and forward_ops' choice
between them (the kernel where it applies, the reference everywhere else).

The kernels round where the reference's chain of torch ops rounds, so: the residual add and RoPE
give the reference's bits in every dtype; RMSNorm and SiLU compute their fp32 sum of squares and
exp in another order than torch, ~1e-7 relative in fp32, which in bf16/fp16 can move a rounded
intermediate by one unit in the last place, and the result by up to two."""
from types import SimpleNamespace

import pytest
import torch

from paged_kernels import cpu_extension
from paged.models import forward_ops
from paged.models.llama import LlamaForCausalLM, ModelArgs, rope_inverse_frequencies
from thread_counts import at_thread_counts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens, size): one token, odd sizes (a vector tail), and enough tokens for several threads.
SHAPES = [(1, 512), (3, 333), (7, 17), (300, 1024)]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _kernels_loaded(compiled_ops):
    """Every test here needs the compiled library."""


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def norm_weight(size, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(size, generator=gen) + 0.5).to(dtype)


def assert_close_to_reference(got, want):
    """fp32: 1e-6 relative. bf16/fp16: at most two units in the last place (an intermediate the
    reference rounds to the dtype may differ by one, and a product with it by one more)."""
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2 * 2.0 ** -7, torch.float16: 2 * 2.0 ** -10}[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-7 if want.dtype == torch.float32 else 1e-5)


# ---- RMSNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_matches_the_reference(compiled_ops, dtype, shape):
    dtype = DTYPES[dtype]
    delta, residual = randn(*shape, dtype=dtype, seed=2), randn(*shape, dtype=dtype, seed=3)
    weight = norm_weight(shape[1], dtype)
    normed, new_residual = compiled_ops.add_rms_norm(delta, residual, weight, EPS)
    want_normed, want_residual = forward_ops.torch_add_rms_norm(delta, residual, weight, EPS)
    assert torch.equal(new_residual, want_residual)  # one rounded add, as torch's
    assert_close_to_reference(normed, want_normed)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_the_reference(compiled_ops, dtype, shape):
    dtype = DTYPES[dtype]
    x, weight = randn(*shape, dtype=dtype, seed=4), norm_weight(shape[1], dtype)
    assert_close_to_reference(compiled_ops.rms_norm(x, weight, EPS), forward_ops.torch_rms_norm(x, weight, EPS))


def test_add_rms_norm_leaves_its_inputs_alone(compiled_ops):
    delta, residual, weight = randn(5, 64, seed=5), randn(5, 64, seed=6), norm_weight(64, torch.float32)
    before = (delta.clone(), residual.clone())
    _, new_residual = compiled_ops.add_rms_norm(delta, residual, weight, EPS)
    assert torch.equal(delta, before[0]) and torch.equal(residual, before[1])
    assert new_residual.data_ptr() not in (delta.data_ptr(), residual.data_ptr())


def test_rms_norm_of_large_and_tiny_rows_stays_accurate(compiled_ops):
    # Rows of magnitude 1e15 and 1e-15: the fp32 sum of squares neither overflows nor flushes.
    x = torch.cat([randn(2, 256, seed=7, scale=1e15), randn(2, 256, seed=8, scale=1e-15)])
    weight = norm_weight(256, torch.float32)
    assert_close_to_reference(compiled_ops.rms_norm(x, weight, 0.0), forward_ops.torch_rms_norm(x, weight, 0.0))


def test_strided_rows_read_like_contiguous_ones(compiled_ops):
    wide = randn(6, 96, seed=9)
    delta, residual = wide[:, :40], wide[:, 50:90]  # rows 96 apart
    weight = norm_weight(40, torch.float32)
    got = compiled_ops.add_rms_norm(delta, residual, weight, EPS)
    want = compiled_ops.add_rms_norm(delta.contiguous(), residual.contiguous(), weight, EPS)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    three_d = randn(2, 3, 40, seed=10)
    assert torch.equal(compiled_ops.rms_norm(three_d, weight, EPS),
                       compiled_ops.rms_norm(three_d.reshape(6, 40), weight, EPS).reshape(2, 3, 40))


# ---- SiLU(gate) * up ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_silu_and_mul_matches_the_reference(compiled_ops, dtype, shape):
    gate_up = randn(shape[0], 2 * shape[1], dtype=DTYPES[dtype], seed=11, scale=4.0)
    assert_close_to_reference(compiled_ops.silu_and_mul(gate_up), forward_ops.torch_silu_and_mul(gate_up))


def test_silu_and_mul_handles_the_extremes_of_exp(compiled_ops):
    # exp(-g) overflows (g < -88.7), underflows (g > 87.3) or is exact (0); inf and NaN propagate.
    gate = torch.tensor([-1e4, -100.0, -88.8, -88.0, -87.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 87.0, 87.5, 88.0,
                         100.0, float("inf"), float("-inf"), float("nan")])
    gate_up = torch.cat([gate, torch.full_like(gate, 1.5)])[None]
    torch.testing.assert_close(compiled_ops.silu_and_mul(gate_up), forward_ops.torch_silu_and_mul(gate_up),
                               rtol=1e-6, atol=1e-30, equal_nan=True)


def test_silu_and_mul_keeps_leading_dimensions(compiled_ops):
    gate_up = randn(2, 3, 2 * 24, seed=12)
    assert compiled_ops.silu_and_mul(gate_up).shape == (2, 3, 24)
    assert torch.equal(compiled_ops.silu_and_mul(gate_up), compiled_ops.silu_and_mul(gate_up.reshape(6, 48)).reshape(2, 3, 24))


# ---- RoPE on the fused qkv projection -----------------------------------------------------------

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def rope_tables(rope_scaling, head_dim, positions, dtype):
    """cos and sin [tokens, 1, head_dim] as the model builds them for its RoPE type."""
    args = ModelArgs(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=head_dim, intermediate_size=16,
                     num_layers=1, num_heads=1, num_kv_heads=1, head_dim=head_dim, rms_norm_eps=EPS,
                     rope_theta=10000.0, rope_scaling=rope_scaling, max_position_embeddings=4096,
                     tie_word_embeddings=False, attention_bias=False, sliding_window=None, bos_token_id=None,
                     eos_token_ids=[])
    model = SimpleNamespace(inv_freq=rope_inverse_frequencies(args))
    return LlamaForCausalLM.rope(model, positions, dtype)


def check_rotary(ops, num_tokens, num_heads, num_kv_heads, head_dim, dtype=torch.float32, rope="default", seed=0):
    positions = torch.randint(0, 4000, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    cos, sin = rope_tables(ROPE_SCALINGS[rope], head_dim, positions, dtype)
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed + 1)
    got = ops.rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    want = forward_ops.torch_rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g, w)  # every product and sum rounded where torch rounds it
    return got


@pytest.mark.parametrize("rope", list(ROPE_SCALINGS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rotary_qkv_equals_the_reference_for_every_rope_type(compiled_ops, rope, dtype):
    check_rotary(compiled_ops, 9, 8, 2, 64, DTYPES[dtype], rope, seed=13)


@pytest.mark.parametrize("head_dim", [6, 64, 80, 128, 256])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=str)
def test_rotary_qkv_head_shapes(compiled_ops, head_dim, heads):
    check_rotary(compiled_ops, 5, *heads, head_dim, seed=head_dim)


@pytest.mark.parametrize("num_tokens", [1, 2, 500])
def test_rotary_qkv_token_counts(compiled_ops, num_tokens):
    check_rotary(compiled_ops, num_tokens, 8, 2, 64, seed=num_tokens)


def test_rotary_qkv_takes_2d_tables_and_strided_qkv(compiled_ops):
    cos, sin = rope_tables(None, 64, torch.arange(4), torch.float32)
    wide = randn(4, 2 * 768, seed=14)
    qkv = wide[:, 100:868]  # rows 1536 apart
    got = compiled_ops.rotary_qkv(qkv, cos[:, 0], sin[:, 0], 8, 2, 64)
    want = forward_ops.torch_rotary_qkv(qkv, cos, sin, 8, 2, 64)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- every kernel --------------------------------------------------------------------------------

def test_results_do_not_depend_on_the_thread_count(compiled_ops):
    # 700 rows: every kernel splits them over the threads when there are several.
    delta, residual, weight = randn(700, 512, seed=15), randn(700, 512, seed=16), norm_weight(512, torch.float32)
    gate_up = randn(700, 2 * 1408, seed=17)
    cos, sin = rope_tables(None, 64, torch.arange(700), torch.float32)
    qkv = randn(700, 768, seed=18)

    def run():
        return [*compiled_ops.add_rms_norm(delta, residual, weight, EPS), compiled_ops.silu_and_mul(gate_up),
                *compiled_ops.rotary_qkv(qkv, cos, sin, 8, 2, 64)]

    serial, parallel = at_thread_counts(run, 1, max(2, torch.get_num_threads()))
    assert all(torch.equal(s, p) for s, p in zip(serial, parallel))


def test_zero_tokens_give_empty_outputs(compiled_ops):
    weight = norm_weight(64, torch.float32)
    normed, new_residual = compiled_ops.add_rms_norm(randn(0, 64), randn(0, 64), weight, EPS)
    assert normed.shape == new_residual.shape == (0, 64)
    assert compiled_ops.silu_and_mul(randn(0, 32)).shape == (0, 16)
    cos, sin = rope_tables(None, 8, torch.arange(0), torch.float32)
    assert [t.shape for t in compiled_ops.rotary_qkv(randn(0, 32), cos, sin, 2, 1, 8)] == [(0, 2, 8), (0, 1, 8), (0, 1, 8)]


def test_meta_kernels_agree_with_the_cpu_kernels(compiled_ops):
    weight = norm_weight(40, torch.float32)
    cos, sin = rope_tables(None, 16, torch.arange(3), torch.float32)
    torch.library.opcheck(compiled_ops.rms_norm.default, (randn(3, 40), weight, EPS))
    torch.library.opcheck(compiled_ops.add_rms_norm.default, (randn(3, 40), randn(3, 40, seed=1), weight, EPS))
    torch.library.opcheck(compiled_ops.silu_and_mul.default, (randn(3, 2, 40),))
    torch.library.opcheck(compiled_ops.rotary_qkv.default, (randn(3, 4 * 16), cos, sin, 2, 1, 16))


@pytest.mark.parametrize("call, message", [
    (lambda ops: ops.rms_norm(randn(2, 8), norm_weight(6, torch.float32), EPS), "weight must be"),
    (lambda ops: ops.rms_norm(randn(2, 8), norm_weight(8, torch.bfloat16), EPS), "dtype"),
    (lambda ops: ops.rms_norm(randn(2, 8, dtype=torch.float64), norm_weight(8, torch.float64), EPS), "float32"),
    (lambda ops: ops.add_rms_norm(randn(3, 8), randn(2, 8), norm_weight(8, torch.float32), EPS), "share shape"),
    (lambda ops: ops.silu_and_mul(randn(2, 7)), "even size"),
    (lambda ops: ops.rotary_qkv(randn(2, 100), randn(2, 1, 16), randn(2, 1, 16), 2, 1, 16), "qkv must be"),
    (lambda ops: ops.rotary_qkv(randn(2, 64), randn(2, 1, 8), randn(2, 1, 8), 2, 1, 16), "cos and sin"),
    (lambda ops: ops.rotary_qkv(randn(2, 60), randn(2, 1, 15), randn(2, 1, 15), 2, 1, 15), "even head_dim"),
], ids=["norm-size", "norm-dtype", "float64", "add-shapes", "odd-gate-up", "qkv-width", "rope-dim", "odd-head-dim"])
def test_bad_arguments_raise_value_errors(compiled_ops, call, message):
    with pytest.raises(ValueError, match=message):
        call(compiled_ops)


# ---- forward_ops: the kernel where it applies, the reference elsewhere ------------------------------

def model_like_args(dtype=torch.float32):
    """One call of each forward_ops function, shaped as the model calls it."""
    cos, sin = rope_tables(None, 64, torch.arange(5), dtype)
    weight = norm_weight(512, dtype)
    return {
        "rms_norm": (randn(5, 512, dtype=dtype), weight, EPS),
        "add_rms_norm": (randn(5, 512, dtype=dtype, seed=1), randn(5, 512, dtype=dtype, seed=2), weight, EPS),
        "rotary_qkv": (randn(5, 768, dtype=dtype, seed=3), cos, sin, 8, 2, 64),
        "silu_and_mul": (randn(5, 2 * 1408, dtype=dtype, seed=4),),
    }


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_ops_run_the_kernels_on_cpu_tensors(compiled_ops, dtype):
    for name, args in model_like_args(DTYPES[dtype]).items():
        got, kernel = getattr(forward_ops, name)(*args), getattr(compiled_ops, name)(*args)
        assert all(torch.equal(g, k) for g, k in zip(as_tuple(got), as_tuple(kernel))), name


def test_forward_ops_first_layer_norm_passes_the_residual_through(compiled_ops):
    residual, weight = randn(3, 64), norm_weight(64, torch.float32)
    normed, same = forward_ops.add_rms_norm(None, residual, weight, EPS)
    assert same is residual
    assert torch.equal(normed, compiled_ops.rms_norm(residual, weight, EPS))


def check_reference_served(args_by_name):
    for name, args in args_by_name.items():
        got = getattr(forward_ops, name)(*args)
        want = getattr(forward_ops, "torch_" + name)(*args)
        assert all(torch.equal(g, w) for g, w in zip(as_tuple(got), as_tuple(want))), name


def test_without_the_library_forward_ops_run_the_reference(monkeypatch):
    # No compiler, a failed build or PAGED_CPU_KERNELS=0 all leave cpu_extension.load() None.
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    for dtype in DTYPES.values():
        check_reference_served(model_like_args(dtype))


def test_unsupported_dtypes_run_the_reference():
    check_reference_served(model_like_args(torch.float64))


def test_a_norm_weight_of_another_dtype_runs_the_reference():
    x = randn(4, 32, dtype=torch.bfloat16)
    weight = norm_weight(32, torch.float32)  # torch promotes: the result is fp32
    check_reference_served({"rms_norm": (x, weight, EPS), "add_rms_norm": (x, x, weight, EPS)})
    assert forward_ops.rms_norm(x, weight, EPS).dtype == torch.float32


def test_tensors_that_need_gradients_run_the_reference():
    # The kernels have no backward: autograd keeps working through the reference.
    x = randn(4, 32).requires_grad_()
    weight = norm_weight(32, torch.float32)
    forward_ops.rms_norm(x, weight, EPS).sum().backward()
    forward_ops.silu_and_mul(torch.cat([x, x], dim=-1)).sum().backward()
    assert x.grad is not None
