"""bench/gemm.py, run as the command it is: every shape x row count x dtype gets a timing per path
with GFLOP/s, GB/s and its error, the peak and bandwidth it is held against, a decode-step summary
with the probe's plan, and the host's CPU, ISA flags and threads in the JSON."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from paged_kernels.linear import onednn_unavailable_reason, packed_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


def test_gemm_bench_times_every_shape_path_and_dtype_and_writes_json(tmp_path):
    out = tmp_path / "gemm.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gemm.py"), "--presets", "tiny-llama",
                           "--dtypes", "float32,int8", "--rows", "1,3", "--repeats", "1", "--cold-mib", "0",
                           "--peak-size", "64", "--dram-mib", "64", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["cpu"] and result["threads"] == 1 and result["dram_read_gbps"] > 0
    assert isinstance(result["isa_flags"], list) and result["peaks"]["float32"]["peak"] > 0
    assert result["peaks"]["bfloat16"]["peak"] > 0  # int8 is held against bf16 arithmetic
    model = result["models"]["tiny-llama"]["dtypes"]
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    float_paths = {"torch"} | ({"onednn"} if onednn_unavailable_reason(torch.float32) is None else set()) | \
        ({"packed"} if packed_unavailable_reason(torch.float32) is None else set())
    for dtype, paths, tolerance in (("float32", float_paths, 1e-5), ("int8", {"dequant"}, 2e-2)):
        records = model[dtype]["records"]
        assert {(r["name"], r["m"]) for r in records} == {(name, m) for name in names for m in (1, 3)}
        for r in records:
            assert paths <= set(r["gflops"]) == set(r["weight_gbps"]) and all(t > 0 for t in r["us"].values())
            assert all(err < tolerance for err in r["rel_err_vs_fp64"].values()), r["rel_err_vs_fp64"]
        steps = model[dtype]["steps"]
        assert [s["m"] for s in steps] == [1, 3] and all(s["bound_us"] > 0 and s["plan"] for s in steps)
        # The roofline is never below the weight stream, so a step is never further from it.
        assert all(s["roofline_us"] >= s["bound_us"] and s["best_over_roofline"] <= s["best_over_bound"]
                   for s in steps)
    assert "tiny-llama float32: GEMMs of one decode step" in done.stdout
