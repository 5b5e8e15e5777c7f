"""bench/quality.py end to end on the small test model: every row, the reference's own row at zero."""
from __future__ import annotations

import json
import subprocess
import sys


def test_quality_bench_scores_every_row_against_hf_float32(tiny_llama_dir, repo_root, tmp_path):
    out = tmp_path / "quality.json"
    done = subprocess.run([sys.executable, str(repo_root / "bench" / "quality.py"), "--model", str(tiny_llama_dir),
                           "--max-tokens", "130", "--window", "65", "--skip-hf-bf16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["HF float32 (reference)", "ours float32", "ours bfloat16", "ours int8 (bf16 activations)"]
    assert all(row["tokens"] == 128 for row in rows.values())  # two windows of 65, their first tokens unscored
    assert abs(rows["ours float32"]["delta_vs_hf_fp32"]) < 1e-3 and rows["ours float32"]["mean_abs_token_diff"] < 1e-3
    assert rows["ours bfloat16"]["mean_abs_token_diff"] > 0  # bf16 rounds: not the fp32 figures
    assert "ours int8 (bf16 activations)" in done.stdout
