"""paged_kernels.linear: the oneDNN prepacked path computes what F.linear computes, in every dtype the host
supports; the probe picks per row bucket from its measurements and degrades to F.linear, with a
logged reason, when oneDNN is missing or fails."""
from __future__ import annotations

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
        assert not result.plan.any_onednn and result.figures["reason"] == reason


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
    plan = kl.LinearPlan(torch.float32, limits=limits, onednn=(True, True, False, False), source="probe")
    assert [plan.use_onednn(r) for r in (1, 2, 3, 22, 23, 128, 129, 10_000)] == \
        [True, True, True, True, False, False, False, False]
    assert plan.describe() == "onednn for rows 1-22; torch for rows 23-"
    plan = kl.LinearPlan(torch.float32, limits=limits, onednn=(False, True, True, False))
    assert plan.describe() == "torch for rows 1-2; onednn for rows 3-128; torch for rows 129-"
    assert kl.LinearPlan.everywhere("onednn", torch.float32).describe() == "onednn"
    assert kl.LinearPlan.everywhere("torch", torch.float32).describe() == "torch"


def test_linear_module_runs_each_row_count_on_its_planned_path():
    requires_onednn(torch.float32)
    layer = random_linear(64, 48, torch.float32, bias=True)
    layer.apply_plan(kl.LinearPlan(torch.float32, limits=(4, math.inf), onednn=(True, False)))
    small, large = random_rows(4, 64, torch.float32), random_rows(5, 64, torch.float32)
    with torch.inference_mode():
        assert torch.equal(layer(small), kl.onednn_linear(small, layer.packed, layer.bias))
        assert torch.equal(layer(large), F.linear(large, layer.weight, layer.bias))


def test_linear_without_plan_or_with_torch_plan_is_f_linear():
    layer = random_linear(32, 16, torch.float32)
    x = random_rows(5, 32, torch.float32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    layer.apply_plan(kl.LinearPlan.everywhere("torch", torch.float32))
    assert layer.packed is None and torch.equal(layer(x), F.linear(x, layer.weight))


def test_probe_chooses_per_bucket_from_its_timings(monkeypatch):
    requires_onednn(torch.float32)
    # Fake timings (F.linear, oneDNN): oneDNN 3x faster at 1 and 8 rows, inside the 10% margin
    # at 64, slower at 256.
    fake = {1: (3.0, 1.0), 8: (3.0, 1.0), 64: (1.05, 1.0), 256: (1.0, 2.0)}
    monkeypatch.setattr(kl, "_time_pair", lambda x, weight, packed, repeats: fake[x.shape[0]])
    weights = [(random_linear(64, 32, torch.float32).weight, 2), (random_linear(32, 64, torch.float32).weight, 1)]
    result = kl.probe_linear_plan(weights, torch.float32)
    assert result.plan.onednn == (True, True, False, False)
    assert result.figures["chosen"] == ["onednn", "onednn", "torch", "torch"]
    assert result.figures["torch_us_per_step"][0] == pytest.approx(3.0 * 3 * 1e6)  # calls-weighted sum
    assert result.plan.source == "probe" and result.figures["probe_s"] >= 0


def test_probe_on_this_host_returns_figures_for_every_bucket():
    weights = [(random_linear(256, 512, torch.float32).weight, 4), (random_linear(512, 256, torch.float32).weight, 4)]
    result = kl.probe_linear_plan(weights, torch.float32, repeats=2)
    figures = result.figures
    assert figures["rows"] == list(kl.PROBE_ROWS) and len(figures["chosen"]) == len(kl.PROBE_ROWS)
    if kl.onednn_unavailable_reason(torch.float32) is None:
        for t, o, chosen in zip(figures["torch_us_per_step"], figures["onednn_us_per_step"], figures["chosen"]):
            assert (chosen == "onednn") == (t > o * kl.ONEDNN_MIN_SPEEDUP)
    assert figures["probe_s"] < 5


def test_probe_falls_back_to_torch_when_onednn_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="paged_kernels.linear"):
        result = kl.probe_linear_plan([(random_linear(32, 16, torch.float32).weight, 1)], torch.float32)
    assert not result.plan.any_onednn and result.plan.describe() == "torch"
    assert "no oneDNN" in result.figures["reason"]
    assert any("F.linear" in record.getMessage() for record in caplog.records)


def test_probe_falls_back_to_torch_when_onednn_fails(monkeypatch, caplog):
    requires_onednn(torch.float32)

    def broken_pack(weight, rows_hint=None):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(kl, "pack_weight", broken_pack)
    with caplog.at_level(logging.WARNING, logger="paged_kernels.linear"):
        result = kl.probe_linear_plan([(random_linear(32, 16, torch.float32).weight, 1)], torch.float32)
    assert result.plan.describe() == "torch" and "could not create a primitive" in result.figures["reason"]
    assert len(caplog.records) == 1


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
    monkeypatch.setattr(kl, "_time_pair", lambda x, weight, packed, repeats: (3.0, 1.0))
    result = kl.probe_linear_plan([(random_linear(64, 32, torch.float32).weight, 1)], torch.float32)
    assert result.figures["unmeasured_rows"] == list(kl.PROBE_ROWS[1:])
    assert len(result.figures["torch_us_per_step"]) == 1
    assert result.plan.describe() == "onednn"
