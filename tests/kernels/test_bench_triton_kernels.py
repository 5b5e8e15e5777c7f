"""bench/triton_kernels.py, run in-process: without a GPU it says so and exits 0; its smoke mode runs the
whole measurement path on tiny shapes through the interpreter."""
import json

import torch

BENCH_SCRIPT = "triton_kernels.py"


def test_exits_zero_without_a_gpu(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_smoke_run_compares_paged_and_dense_outputs(bench, tmp_path):
    out = tmp_path / "kernels.json"
    assert bench.main(["--smoke", "--contexts", "20", "--batches", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["phase"] for r in rows} == {"decode", "prefill"}
    assert all(r["max_abs_diff"] < 1e-4 and r["paged_overhead"] > 0 for r in rows)
