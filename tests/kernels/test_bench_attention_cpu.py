"""bench/attention_cpu.py, run in-process on tiny shapes: the whole measurement path works and the
two CPU paths agree."""
import json

BENCH_SCRIPT = "attention_cpu.py"


def test_smoke_run_times_both_paths_and_compares_outputs(bench, compiled_ops, tmp_path):
    out = tmp_path / "attention_cpu.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {r["what"] for r in rows} == {"attention", "layer"}
    assert all(r["max_abs_diff"] < 1e-5 and r["plain_us"] > 0 and r["compiled_us"] > 0 for r in rows)
    assert report["host_cpu"] and report["threads"] >= 1 and report["dram_read_gbps"] > 0


def test_a_model_shape_and_dtype_are_measured_and_recorded(bench, compiled_ops, tmp_path):
    out = tmp_path / "attention_cpu.json"
    assert bench.main(["--smoke", "--shape", "smollm2-135m", "--dtype", "bfloat16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["shape_name"] == "smollm2-135m" and report["layers"] == 30
    assert report["shapes"] == dict(num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16")
    assert all(r["max_abs_diff"] < 0.05 for r in report["results"])  # bf16 outputs round to ~3 digits


def test_cpu_time_mode_asks_for_one_thread_and_records_its_clock(bench, compiled_ops, tmp_path, monkeypatch):
    requested = []
    monkeypatch.setattr(bench.torch, "set_num_threads", requested.append)  # the session keeps its threads
    out = tmp_path / "attention_cpu.json"
    assert bench.main(["--smoke", "--cpu-time", "--out", str(out)]) == 0
    assert requested == [1]
    assert json.loads(out.read_text())["clock"] == "thread CPU time"


def test_decode_lengths_are_seeded_and_bounded(bench):
    lengths = bench.lognormal_lengths(200, 250, seed=3)
    assert lengths == bench.lognormal_lengths(200, 250, seed=3)
    assert all(1 <= n <= 2048 for n in lengths)
    assert 150 < sorted(lengths)[100] < 400  # the median is near the requested one
