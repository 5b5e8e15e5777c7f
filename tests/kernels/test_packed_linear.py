"""The packed small-M GEMM (csrc/packed_linear_cpu.cpp through paged_kernels.linear): it computes
F.linear within the dtype's tolerance on every instruction path this host has, for odd sizes, 1-16
rows and beyond, with and without bias, int8 weights and the fused SiLU·up; the result does not
depend on the thread count; strided rows are handled and bad arguments refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paged.models.forward_ops import torch_silu_and_mul
from paged_kernels import cpu_extension
from paged_kernels import linear as kl
from thread_counts import at_thread_counts



@pytest.fixture(autouse=True)
def _packed_kernel(compiled_ops):
    """The packed kernel is part of the compiled library (conftest: skipped only without a compiler)."""

DTYPES = [torch.float32, torch.bfloat16]
# Normwise: max |error| / max |reference|. bf16 outputs carry 8 mantissa bits.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (out_features, in_features): odd and panel-unaligned sizes, a K past one AMX chunk, a wide one.
SHAPES = [(77, 33), (200, 96), (64, 513), (1000, 40)]
ROWS = list(range(1, 17)) + [17, 40]


def isas(dtype: torch.dtype) -> list[str]:
    """The instruction paths to test for rows of ``dtype``: every one this host has for them."""
    if dtype == torch.float32:
        return ["auto"]
    return ["auto", *kl.packed_isa().split(",")]


def random(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def normwise_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_packed_linear_matches_f_linear_for_every_row_count(dtype, shape, bias):
    out_features, in_features = shape
    weight = random(out_features, in_features, dtype=dtype) * in_features ** -0.5
    b = random(out_features, dtype=dtype, seed=1) if bias else None
    packed = kl.pack_for_kernel(weight, b)
    for isa in isas(dtype):
        for rows in ROWS:
            x = random(rows, in_features, dtype=dtype, seed=rows)
            got = kl.packed_linear(x, packed, isa)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            reference = F.linear(x.double(), weight.double(), None if b is None else b.double())
            assert normwise_error(got, reference) < TOLERANCE[dtype], (isa, rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_int8_weights_compute_the_dequantized_product(dtype, shape):
    out_features, in_features = shape
    weight = random(out_features, in_features) * in_features ** -0.5
    q, scales = kl.quantize_int8(weight)
    b = random(out_features, dtype=dtype, seed=1)
    packed = kl.pack_for_kernel(q, b, scales)
    dequantized = q.double() * scales.double()[:, None]
    for isa in isas(dtype):
        for rows in (1, 3, 8, 16, 17, 40):
            x = random(rows, in_features, dtype=dtype, seed=rows)
            reference = F.linear(x.double(), dequantized, b.double())
            assert normwise_error(kl.packed_linear(x, packed, isa), reference) < TOLERANCE[dtype], (isa, rows)


def test_int8_quantization_is_symmetric_per_output_channel():
    weight = random(20, 50)
    weight[3] = 0.0
    q, scales = kl.quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (20,)
    assert int(q.abs().max()) == 127 and int(q[3].abs().max()) == 0
    assert torch.equal(q.abs().amax(dim=1)[[i for i in range(20) if i != 3]], torch.full((19,), 127, dtype=torch.int8))
    assert float((q.float() * scales[:, None] - weight).abs().max()) <= float(scales.max()) / 2 + 1e-7


@pytest.mark.parametrize("path", ["torch_int8", "dequant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_int8_paths_compute_the_dequantized_product(path, dtype):
    weight = random(200, 96) * 96 ** -0.5
    q, scales = kl.quantize_int8(weight)
    b = random(200, dtype=dtype, seed=1)
    x = random(5, 96, dtype=dtype, seed=2)
    reference = F.linear(x.double(), q.double() * scales.double()[:, None], b.double())
    if path == "torch_int8":
        got = kl.torch_int8_linear(x, q, scales.to(dtype), b)
    else:
        got = kl.dequant_linear(x, q, scales, b)
    assert normwise_error(got, reference) < 1.5 * TOLERANCE[dtype]


def test_dequant_path_works_in_slices_of_rows(monkeypatch):
    monkeypatch.setattr(kl, "DEQUANT_ROWS", 64)
    q, scales = kl.quantize_int8(random(200, 48))
    x = random(3, 48, seed=2)
    torch.testing.assert_close(kl.dequant_linear(x, q, scales, None), F.linear(x, q.float() * scales[:, None]))


def test_torch_int8_path_refuses_the_sizes_that_crash_torch():
    q, scales = kl.quantize_int8(random(32, 40))
    with pytest.raises(ValueError, match="divisible by 16"):
        kl.torch_int8_linear(random(1, 40, dtype=torch.bfloat16), q, scales.bfloat16(), None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_fused_silu_and_mul_equals_the_gemm_then_the_silu_kernel(dtype, int8):
    """The epilogue rounds where the separate ops round, so the fused result is theirs exactly."""
    intermediate, hidden = 40, 48  # 40: half-panels padded
    weight = random(2 * intermediate, hidden) * hidden ** -0.5
    if int8:
        q, scales = kl.quantize_int8(weight)
        fused, plain = kl.pack_for_kernel(q, None, scales, silu_and_mul=True), kl.pack_for_kernel(q, None, scales)
    else:
        weight = weight.to(dtype)
        fused, plain = kl.pack_for_kernel(weight, silu_and_mul=True), kl.pack_for_kernel(weight)
    ops = cpu_extension.load()
    for isa in isas(dtype):
        for rows in (1, 5, 17):
            x = random(rows, hidden, dtype=dtype, seed=rows)
            got = kl.packed_linear(x, fused, isa)
            assert got.shape == (rows, intermediate)
            unfused = kl.packed_linear(x, plain, isa)
            torch.testing.assert_close(got, ops.silu_and_mul(unfused), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got, torch_silu_and_mul(unfused), **dict(rtol=1e-5, atol=1e-5)
                                       if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_result_does_not_depend_on_the_thread_count(dtype):
    weight = random(4096, 256, dtype=dtype)  # enough panels to split over threads
    packed = kl.pack_for_kernel(weight)
    x = random(5, 256, dtype=dtype, seed=3)
    one, two = at_thread_counts(lambda: kl.packed_linear(x, packed), 1, 2)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_give_the_contiguous_result(dtype):
    weight = random(96, 64, dtype=dtype)
    packed = kl.pack_for_kernel(weight)
    x = random(7, 64, dtype=dtype, seed=4)
    expected = kl.packed_linear(x, packed)
    transposed = x.t().contiguous().t()          # column-major
    sliced = random(7, 131, dtype=dtype)[:, 3:67]  # odd row stride, offset start
    sliced.copy_(x)
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    assert torch.equal(kl.packed_linear(transposed, packed), expected)
    assert torch.equal(kl.packed_linear(sliced, packed), expected)


def test_zero_rows_give_an_empty_result():
    packed = kl.pack_for_kernel(random(40, 32))
    assert kl.packed_linear(torch.empty(0, 32), packed).shape == (0, 40)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_the_out_variant_writes_the_same_result_into_the_given_rows(dtype, int8):
    weight = random(200, 96, dtype=dtype)
    bias = random(200, dtype=dtype, seed=1)
    if int8:
        q, scales = kl.quantize_int8(weight)
        packed = kl.pack_for_kernel(q, bias, scales)
    else:
        packed = kl.pack_for_kernel(weight, bias)
    x = random(9, 96, dtype=dtype, seed=2)
    buffer = torch.full((12, 200), float("nan"), dtype=dtype)
    out = buffer[:9]
    ops = cpu_extension.load()
    ops.packed_linear_out(x, packed.data, 200, packed.bias, packed.scales, False, "auto", out)
    assert torch.equal(out, kl.packed_linear(x, packed))
    assert buffer[9:].isnan().all()  # rows past the view untouched


@pytest.mark.parametrize("out", [torch.empty(3, 40), torch.empty(2, 41), torch.empty(2, 40, dtype=torch.bfloat16),
                                 torch.empty(40, 2).t()], ids=["rows", "columns", "dtype", "strided"])
def test_the_out_variant_refuses_an_output_of_another_shape_dtype_or_layout(out):
    packed = kl.pack_for_kernel(random(40, 32))
    with pytest.raises(ValueError, match="out must be"):
        cpu_extension.load().packed_linear_out(random(2, 32), packed.data, 40, None, None, False, "auto", out)


@pytest.mark.parametrize("case, message", [
    ("float16 rows", "float32 or bfloat16"),
    ("rows of another dtype", "does not take"),
    ("wrong in_features", "features"),
    ("int8 without scales", "need scales"),
    ("bias of another length", "bias must be"),
    ("unknown isa", "isa must be"),
    ("amx on fp32 rows", "needs bf16 rows"),
])
def test_bad_arguments_are_value_errors(case, message):
    weight = random(40, 32)
    packed = kl.pack_for_kernel(weight)
    ops = cpu_extension.load()
    x = random(2, 32)
    with pytest.raises(ValueError, match=message):
        if case == "float16 rows":
            ops.packed_linear(x.half(), packed.data, 40)
        elif case == "rows of another dtype":
            ops.packed_linear(x.bfloat16(), packed.data, 40)
        elif case == "wrong in_features":
            ops.packed_linear(random(2, 31), packed.data, 40)
        elif case == "int8 without scales":
            ops.packed_linear(x, kl.pack_for_kernel(kl.quantize_int8(weight)[0]).data, 40)
        elif case == "bias of another length":
            ops.packed_linear(x, packed.data, 40, torch.zeros(40))
        elif case == "unknown isa":
            ops.packed_linear(x, packed.data, 40, isa="sse")
        else:
            ops.packed_linear(x, packed.data, 40, isa="amx")


def test_packed_column_order_interleaves_gate_and_up_half_panels():
    order = kl.packed_column_order(2 * 20, silu_and_mul=True)
    assert order.tolist()[:32] == list(range(16)) + list(range(20, 36))
    assert order.tolist()[32:] == [16, 17, 18, 19] + [-1] * 12 + [36, 37, 38, 39] + [-1] * 12
    assert kl.packed_column_order(33).tolist() == list(range(33)) + [-1] * 31
    with pytest.raises(ValueError, match="even"):
        kl.packed_column_order(33, silu_and_mul=True)


def test_the_report_names_the_instruction_paths():
    isa = kl.packed_isa().split(",")
    assert "fma" in isa and set(isa) <= {"amx", "avx512_bf16", "fma"}
