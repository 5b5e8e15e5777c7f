"""bench/gemm.py, run as the command it is: every shape x row count gets a timing per path, the
peak it is measured against, and the difference from F.linear."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from paged_kernels.linear import onednn_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


def test_gemm_bench_times_every_shape_and_path_and_writes_json(tmp_path):
    out = tmp_path / "gemm.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gemm.py"), "--rows", "1,3", "--repeats", "1",
                           "--peak-size", "64", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["peaks"]["float32"]["peak"] > 0 and result["cpu"]
    records = result["records"]
    assert {(r["name"], r["m"]) for r in records} == {
        (name, m) for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head") for m in (1, 3)}
    paths = {"torch"} if onednn_unavailable_reason(torch.float32) else {"torch", "onednn"}
    for r in records:
        assert paths <= set(r["us"]) and all(t > 0 for t in r["us"].values())
        if "onednn" in r["us"]:
            assert r["max_rel_diff_vs_torch"] < 1e-5
            assert ("onednn_fused_add" in r["us"]) == r["residual"]
    assert "tiny-llama lm_head 512>16000" in done.stdout
