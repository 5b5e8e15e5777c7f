"""paged_kernels.linear: the oneDNN prepacked path computes what F.linear computes, in every dtype the host
supports; a Linear runs each row count on its plan's path (the packed kernel, oneDNN, F.linear,
the int8 paths); the probe picks per row bucket from its measurements and drops, with a recorded
reason, a path that is missing or fails. (The packed kernel's arithmetic: test_packed_linear.py.)"""
from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from paged_kernels import linear as kl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 outputs are rounded to 8/11 mantissa bits; the two paths may round different partial sums.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}


def random_linear(in_features: int, out_features: int, dtype: torch.dtype, bias: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    layer = kl.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    return layer.to(dtype).eval()


def random_rows(rows: int, features: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def requires_onednn(dtype: torch.dtype):
    reason = kl.onednn_unavailable_reason(dtype)
    if reason is not None:
        pytest.skip(f"oneDNN cannot run {dtype} on this host: {reason} (the fallback is tested below)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(dtype, rows, bias):
    requires_onednn(dtype)
    layer = random_linear(96, 200, dtype, bias=bias)
    x = random_rows(rows, 96, dtype)
    packed = kl.pack_weight(layer.weight, 256)
    got = kl.onednn_linear(x, packed, layer.bias)
    assert got.dtype == dtype and got.shape == (rows, 200)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_without_onednn_support_reports_why(dtype):
    reason = kl.onednn_unavailable_reason(dtype)
    if reason is None:
        kl.pack_weight(random_linear(32, 16, dtype).weight)  # claimed supported: must pack
    else:
        assert str(dtype).removeprefix("torch.") in reason or "oneDNN" in reason or "mkldnn" in reason
        result = kl.probe_linear_plan([(random_linear(32, 16, dtype).weight, 1)], dtype)
        assert not result.plan.uses("onednn") and result.figures["unavailable"]["onednn"] == reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_residual_add_equals_add_after_the_gemm(dtype):
    requires_onednn(dtype)
    layer = random_linear(128, 64, dtype)
    x, residual = random_rows(17, 128, dtype), random_rows(17, 64, dtype, seed=2)
    packed = kl.pack_weight(layer.weight, 256)
    fused = kl.onednn_linear_add(x, residual, packed, None)
    torch.testing.assert_close(fused, residual + kl.onednn_linear(x, packed, None), **TOLERANCE[dtype])


def test_plan_buckets_cover_every_row_count():
    limits = kl.bucket_limits((1, 8, 64, 256))
    assert limits == (2, 22, 128, math.inf)
    plan = kl.LinearPlan(torch.float32, limits=limits, paths=("packed", "onednn", "torch", "torch"), source="probe")
    assert [plan.path_for(r) for r in (1, 2, 3, 22, 23, 128, 129, 10_000)] == \
        ["packed", "packed", "onednn", "onednn", "torch", "torch", "torch", "torch"]
    assert plan.describe() == "packed for rows 1-2; onednn for rows 3-22; torch for rows 23-"
    plan = kl.LinearPlan(torch.float32, limits=limits, paths=("torch", "onednn", "onednn", "torch"))
    assert plan.describe() == "torch for rows 1-2; onednn for rows 3-128; torch for rows 129-"
    assert kl.LinearPlan.everywhere("onednn", torch.float32).describe() == "onednn"
    assert kl.LinearPlan.everywhere("packed", torch.bfloat16, "int8").describe() == "int8 packed"


@pytest.mark.parametrize("kwargs", [
    dict(paths=("torch_int8",)),                                        # an int8 path for a float plan
    dict(paths=("onednn",), quantization="int8"),                       # a float path for an int8 plan
    dict(paths=("torch",), quantization="int4"),                        # no such quantization
    dict(limits=(4, math.inf), paths=("torch",)),                       # one path per limit
])
def test_a_plan_refuses_paths_that_do_not_fit(kwargs):
    with pytest.raises(ValueError):
        kl.LinearPlan(torch.float32, **kwargs)


def test_linear_module_runs_each_row_count_on_its_planned_path(compiled_ops):
    requires_onednn(torch.float32)
    layer = random_linear(64, 48, torch.float32, bias=True)
    layer.apply_plan(kl.LinearPlan(torch.float32, limits=(2, 4, math.inf), paths=("packed", "onednn", "torch")))
    with torch.inference_mode():
        for rows, expected in [(2, lambda x: kl.packed_linear(x, layer.packed)),
                               (4, lambda x: kl.onednn_linear(x, layer.onednn_weight, layer.bias)),
                               (5, lambda x: F.linear(x, layer.weight, layer.bias))]:
            x = random_rows(rows, 64, torch.float32)
            assert torch.equal(layer(x), expected(x))
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **TOLERANCE[torch.float32])


def test_a_bound_linear_reads_the_weights_it_has_when_called(compiled_ops):
    layer = random_linear(64, 48, torch.float32)
    layer.apply_plan(kl.LinearPlan.everywhere("packed", torch.float32))
    bound = layer.bind(3)
    x = random_rows(3, 64, torch.float32)
    with torch.inference_mode():
        before = bound(x)
        # what move_to_huge_pages does: the packed copy is replaced by one elsewhere in memory
        layer.packed = dataclasses.replace(layer.packed, data=layer.packed.data * 2)
        assert torch.equal(bound(x), layer(x))
        torch.testing.assert_close(bound(x), 2 * before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["packed", "torch"])
def test_forward_into_writes_the_forward_result_into_the_callers_memory(compiled_ops, path):
    layer = random_linear(64, 48, torch.bfloat16, bias=True)
    layer.apply_plan(kl.LinearPlan.everywhere(path, torch.bfloat16))
    x = random_rows(5, 64, torch.bfloat16)
    out = torch.empty(5, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        written = layer.forward_into(x, out)
        assert written.data_ptr() == out.data_ptr() and torch.equal(out, layer(x))


MIXED_PATHS = ("packed", "packed", "packed", "packed", "torch")  # another path for the largest bucket


def mixed_plan(dtype: torch.dtype) -> kl.LinearPlan:
    return kl.LinearPlan(dtype, limits=kl.bucket_limits(kl.PROBE_ROWS), paths=MIXED_PATHS, source="probe")


def test_probe_forward_into_times_only_the_buckets_the_plan_gives_another_path(compiled_ops):
    layer = random_linear(64, 96, torch.float32, bias=True)
    layer.apply_plan(mixed_plan(torch.float32))
    figures = layer.probe_forward_into(max_rows=200, repeats=1)
    assert list(figures["rows"]) == [200]  # the torch bucket, at the most rows the caller writes
    assert set(figures["rows"][200]) == {"packed_us", "torch_then_copy_us"}
    assert figures["packed_rows"] == ([200] if layer.into_packed_buckets else [])
    assert layer.probe_forward_into(max_rows=100, repeats=1) == {"rows": {}, "packed_rows": []}


def test_probe_forward_into_has_nothing_to_decide_without_a_packed_copy(compiled_ops):
    layer = random_linear(64, 96, torch.float32)
    layer.apply_plan(kl.LinearPlan.everywhere("torch", torch.float32))
    assert layer.probe_forward_into(max_rows=256) == {} and layer.into_packed_buckets == frozenset()


def test_forward_into_runs_the_packed_kernel_on_the_buckets_the_probe_gave_it(compiled_ops):
    layer = random_linear(64, 96, torch.float32, bias=True)
    layer.apply_plan(mixed_plan(torch.float32))
    x = random_rows(150, 64, torch.float32)
    out = torch.empty(150, 96)
    with torch.inference_mode():
        assert torch.equal(layer.forward_into(x, out), F.linear(x, layer.weight, layer.bias))  # the plan's path
        layer.into_packed_buckets = frozenset({len(MIXED_PATHS) - 1})
        assert torch.equal(layer.forward_into(x, out), kl.packed_linear(x, layer.packed))
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), **TOLERANCE[torch.float32])


def test_a_new_plan_forgets_the_forward_into_choice(compiled_ops):
    layer = random_linear(64, 96, torch.float32)
    layer.apply_plan(mixed_plan(torch.float32))
    layer.into_packed_buckets = frozenset({len(MIXED_PATHS) - 1})
    layer.apply_plan(mixed_plan(torch.float32))
    assert layer.into_packed_buckets == frozenset()


@pytest.mark.parametrize("path", ["packed", "onednn", "torch"])
def test_path_runners_of_a_fused_gate_up_compute_silu_and_mul(compiled_ops, path):
    if path == "onednn":
        requires_onednn(torch.float32)
    layer = random_linear(64, 2 * 48, torch.float32, bias=True)
    runner = kl.path_runners(layer.weight, (path,), bias=layer.bias, silu_and_mul_after=True)[path]
    x = random_rows(7, 64, torch.float32)
    gate, up = F.linear(x, layer.weight, layer.bias).chunk(2, dim=-1)
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_probe_times_a_fused_gate_up_with_its_silu_and_mul(compiled_ops, monkeypatch):
    seen = []

    def record(x, runners, repeats):
        seen.append({path: runner(x).shape[1] for path, runner in runners.items()})
        return dict.fromkeys(runners, 1.0)
    monkeypatch.setattr(kl, "_time_paths", record)
    gate_up, down = random_linear(32, 2 * 64, torch.float32).weight, random_linear(64, 32, torch.float32).weight
    with torch.inference_mode():
        result = kl.probe_linear_plan([(gate_up, 1, True), (down, 1)], torch.float32, repeats=1)
    assert result.figures["shapes"] == [[128, 32], [32, 64]]
    assert seen[0] == dict.fromkeys(seen[0], 64) and seen[1] == dict.fromkeys(seen[1], 32)  # SiLU·up halves


def test_linear_without_plan_or_with_torch_plan_is_f_linear():
    layer = random_linear(32, 16, torch.float32)
    x = random_rows(5, 32, torch.float32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    layer.apply_plan(kl.LinearPlan.everywhere("torch", torch.float32))
    assert layer.packed is None and layer.onednn_weight is None and torch.equal(layer(x), F.linear(x, layer.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_runs_every_int8_path_close_to_the_float_layer(compiled_ops, dtype):
    layer = random_linear(64, 48, dtype, bias=True)
    layer.apply_plan(kl.LinearPlan(dtype, limits=(2, 4, math.inf), paths=("packed", "torch_int8", "dequant"),
                                   quantization="int8"))
    q, scales = kl.quantize_int8(layer.weight)
    assert torch.equal(layer.int8[0], q) and layer.packed.scales is not None
    with torch.inference_mode():
        for rows in (2, 4, 5):
            x = random_rows(rows, 64, dtype)
            reference = F.linear(x.double(), q.double() * scales.double()[:, None], layer.bias.double())
            assert float((layer(x).double() - reference).abs().max() / reference.abs().max()) < 2e-2
            float_out = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            assert float((layer(x).double() - float_out).abs().max() / float_out.abs().max()) < 3e-2


def test_fused_gate_up_runs_silu_and_mul_only_on_packed_rows(compiled_ops):
    layer = random_linear(64, 2 * 40, torch.float32)
    layer.fuse_silu_and_mul = True
    layer.apply_plan(kl.LinearPlan(torch.float32, limits=(4, math.inf), paths=("packed", "torch")))
    small, large = random_rows(4, 64, torch.float32), random_rows(5, 64, torch.float32)
    assert layer.fuses_silu_and_mul(4) and not layer.fuses_silu_and_mul(5)
    with torch.inference_mode():
        gate, up = F.linear(small, layer.weight).chunk(2, dim=-1)
        torch.testing.assert_close(layer.silu_and_mul(small), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="silu_and_mul"):
            layer(small)  # the packed copy holds SiLU·up, not the plain output
        with pytest.raises(ValueError, match="does not fuse"):
            layer.silu_and_mul(large)
        assert torch.equal(layer(large), F.linear(large, layer.weight))


def fake_timings(table: dict):
    """A _time_paths stand-in: seconds per path from ``table[rows]``."""
    return lambda x, runners, repeats: {path: table[x.shape[0]][path] for path in runners}


def test_probe_chooses_per_bucket_from_its_timings(compiled_ops, monkeypatch):
    requires_onednn(torch.float32)
    # packed fastest at 1 and 4 rows, oneDNN at 16, within the 10% margin over torch at 64, slower at 256.
    fake = {1: dict(packed=1.0, onednn=2.0, torch=3.0), 4: dict(packed=1.0, onednn=2.0, torch=3.0),
            16: dict(packed=2.0, onednn=1.0, torch=3.0), 64: dict(packed=2.0, onednn=1.0, torch=1.05),
            256: dict(packed=3.0, onednn=2.0, torch=1.0)}
    monkeypatch.setattr(kl, "_time_paths", fake_timings(fake))
    weights = [(random_linear(64, 32, torch.float32).weight, 2), (random_linear(32, 64, torch.float32).weight, 1)]
    result = kl.probe_linear_plan(weights, torch.float32)
    assert result.plan.paths == ("packed", "packed", "onednn", "torch", "torch")
    assert result.figures["chosen"] == list(result.plan.paths)
    assert result.figures["us_per_step"]["torch"][0] == pytest.approx(3.0 * 3 * 1e6)  # calls-weighted sum
    assert result.plan.source == "probe" and result.figures["probe_s"] >= 0


def test_bf16_probe_chooses_the_fastest_path_without_a_torch_margin(compiled_ops, monkeypatch):
    # Within 10% of the packed kernel: fp32 would keep F.linear (HF's op); bf16 has no such contract.
    fake = {rows: dict(packed=1.0, onednn=2.0, torch=1.05) for rows in kl.PROBE_ROWS}
    monkeypatch.setattr(kl, "_time_paths", fake_timings(fake))
    weights = [(random_linear(64, 32, torch.bfloat16).weight, 1)]
    assert kl.probe_linear_plan(weights, torch.bfloat16).plan.paths == ("packed",) * len(kl.PROBE_ROWS)
    weights = [(random_linear(64, 32, torch.float32).weight, 1)]
    assert kl.probe_linear_plan(weights, torch.float32).plan.paths == ("torch",) * len(kl.PROBE_ROWS)


def test_int8_probe_chooses_the_fastest_int8_path_without_a_torch_margin(compiled_ops, monkeypatch):
    fake = {rows: dict(packed=1.0, torch_int8=1.05, dequant=9.0) for rows in kl.PROBE_ROWS}
    fake[256] = dict(packed=2.0, torch_int8=3.0, dequant=1.0)
    monkeypatch.setattr(kl, "_time_paths", fake_timings(fake))
    result = kl.probe_linear_plan([(random_linear(64, 32, torch.float32).weight, 1)], torch.float32,
                                  quantization="int8")
    assert result.plan.paths == ("packed",) * 4 + ("dequant",) and result.plan.quantization == "int8"


def test_probe_on_this_host_returns_figures_for_every_bucket():
    weights = [(random_linear(256, 512, torch.float32).weight, 4), (random_linear(512, 256, torch.float32).weight, 4)]
    result = kl.probe_linear_plan(weights, torch.float32, repeats=2)
    figures = result.figures
    assert figures["rows"] == list(kl.PROBE_ROWS) and len(figures["chosen"]) == len(kl.PROBE_ROWS)
    measured = figures.get("us_per_step", {})
    for i, chosen in enumerate(figures["chosen"]):
        if measured and measured["torch"][i] is not None:
            fastest = min(measured, key=lambda p: measured[p][i])
            assert chosen in (fastest, "torch")
    assert figures["probe_s"] < 3 * kl.PROBE_BUDGET_S


def test_probe_skips_onednn_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    result = kl.probe_linear_plan([(random_linear(32, 16, torch.float32).weight, 1)], torch.float32, repeats=1)
    assert not result.plan.uses("onednn") and "no oneDNN" in result.figures["unavailable"]["onednn"]


def test_probe_falls_back_to_torch_with_a_logged_reason_when_no_other_path_runs(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(kl, "packed_unavailable_reason", lambda dtype: "no compiler")
    with caplog.at_level(logging.WARNING, logger="paged_kernels.linear"):
        result = kl.probe_linear_plan([(random_linear(32, 16, torch.float32).weight, 1)], torch.float32)
    assert result.plan.describe() == "torch" and result.figures["unavailable"]["packed"] == "no compiler"
    assert any("torch" in record.getMessage() and "no compiler" in record.getMessage() for record in caplog.records)


def test_probe_drops_a_path_that_fails(monkeypatch):
    requires_onednn(torch.float32)

    def broken_pack(weight, rows_hint=None):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(kl, "pack_weight", broken_pack)
    result = kl.probe_linear_plan([(random_linear(32, 16, torch.float32).weight, 1)], torch.float32, repeats=1)
    assert not result.plan.uses("onednn")
    assert "could not create a primitive" in result.figures["unavailable"]["onednn"]


def test_probe_trims_tall_weights_and_scales_their_time_back(monkeypatch):
    requires_onednn(torch.float32)
    seen = []
    real_pack = kl.pack_weight
    monkeypatch.setattr(kl, "pack_weight", lambda w, hint=None: seen.append(tuple(w.shape)) or real_pack(w, hint))
    monkeypatch.setattr(kl, "PROBE_MAX_MACS", 256 * 64 * 128)
    kl.probe_linear_plan([(random_linear(64, 1000, torch.float32).weight, 1)], torch.float32, repeats=1)
    assert seen == [(128, 64)]


def test_probe_past_its_budget_extends_the_last_measured_decision(monkeypatch):
    requires_onednn(torch.float32)
    monkeypatch.setattr(kl, "PROBE_BUDGET_S", 0.0)
    monkeypatch.setattr(kl, "_time_paths", fake_timings(
        {rows: dict(packed=2.0, onednn=1.0, torch=3.0) for rows in kl.PROBE_ROWS}))
    result = kl.probe_linear_plan([(random_linear(64, 32, torch.float32).weight, 1)], torch.float32)
    assert result.figures["unmeasured_rows"] == list(kl.PROBE_ROWS[1:])
    assert [t is not None for t in result.figures["us_per_step"]["torch"]] == [True] + [False] * 4
    assert result.plan.describe() == "onednn"


def test_probe_measures_the_smallest_and_largest_rows_first_and_fills_between_from_the_nearest(monkeypatch):
    requires_onednn(torch.float32)
    timed = []
    # One time unit per timed row count, a budget of 1.5: two row counts fit.
    monkeypatch.setattr(kl, "probe_clock", lambda: float(len(timed)))
    monkeypatch.setattr(kl, "PROBE_BUDGET_S", 1.5)

    def fake(x, runners, repeats):
        timed.append(x.shape[0])
        return {"packed": 1.0, "onednn": 2.0, "torch": 3.0} if x.shape[0] < 16 else \
            {"packed": 3.0, "onednn": 1.0, "torch": 2.0}

    monkeypatch.setattr(kl, "_time_paths", fake)
    result = kl.probe_linear_plan([(random_linear(64, 32, torch.float32).weight, 1)], torch.float32)
    assert timed[:2] == [1, 256] and result.figures["unmeasured_rows"] == [4, 16, 64]
    # 4 is nearer 1 than 256, 16 is nearer 1 (log distance 2.8 vs 2.8: the smaller wins), 64 nearer 256
    assert result.plan.paths == ("packed", "packed", "packed", "onednn", "onednn")
