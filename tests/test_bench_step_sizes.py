"""bench/step_sizes.py, run as the command it is on the small test model: every step of each workload
lands in one bucket of tokens per step, the buckets' seconds add up to the run, and each bucket is
held to its arithmetic floor."""
from __future__ import annotations

import json
import subprocess
import sys


def test_step_sizes_accounts_for_every_step_of_each_workload(tiny_llama_dir, repo_root, tmp_path):
    out = tmp_path / "steps.json"
    done = subprocess.run([sys.executable, str(repo_root / "bench" / "step_sizes.py"), "--model", str(tiny_llama_dir),
                           "--workloads", "alpaca:1:12,sharegpt:0.2:6", "--max-num-batched-tokens", "64",
                           "--peak-size", "128", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["meta"]["peak_gflops"] > 0 and result["meta"]["linear_backend"]
    assert [r["workload"] for r in result["results"]] == ["alpaca-n12", "sharegpt-x0.2-n6"]
    for run in result["results"]:
        buckets = run["buckets"]
        assert sum(b["steps"] for b in buckets) == run["steps"] > 0
        assert abs(sum(b["seconds"] for b in buckets) - run["seconds"]) < 0.05 * run["seconds"]
        assert all(b["over_arithmetic_floor"] > 0 and b["mean_tokens"] >= b["mean_sampled_rows"] for b in buckets)
        assert max(b["mean_tokens"] for b in buckets) <= 64  # no step runs more than the batched-token budget
