"""bench/virtual_kv.py, run in-process on tiny sizes: churn in every configuration, and the
granularity arithmetic."""
import json

BENCH_SCRIPT = "virtual_kv.py"


def test_smoke_run_measures_every_configuration(bench, compiled_ops, tmp_path):
    out = tmp_path / "virtual_kv.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["config"]: row for row in report["churn"]["results"]}
    assert {"eager 4K", "deferred 4K"} <= set(rows)
    for row in rows.values():
        assert row["us_per_sequence"] > 0
        # Eager reclaim gives every page back; deferral keeps the warm slots' pages.
        assert (row["resident_after_bytes"] > 0) == row["deferred_reclaim"]
    # Deferral reuses warm pages: fewer page faults than faulting every sequence in again.
    assert rows["deferred 4K"]["faults_per_sequence"] < rows["eager 4K"]["faults_per_sequence"]


def test_granularity_counts_whole_units_per_region(bench):
    args = bench.parse_args(["--smoke", "--no-huge-pages"])
    rows = {row["unit"]: row for row in bench.granularity(args)}
    token_bytes = bench.KV_HEADS * bench.HEAD_DIM * 4
    blocks16 = rows["paged blocks of 16"]
    assert blocks16["unit_bytes"] == 16 * token_bytes
    assert blocks16["needed_bytes"] <= blocks16["committed_bytes"] < blocks16["needed_bytes"] + \
        2 * bench.LAYERS * args.granularity_seqs * 16 * token_bytes
    assert rows["4 KiB pages"]["committed_bytes"] <= blocks16["committed_bytes"]  # 8 tokens a page here
