"""bench/attention_layouts.py, run in-process on tiny shapes: every layout is built from the same
contents, timed, and gives the same output."""
import json

BENCH_SCRIPT = "attention_layouts.py"


def test_smoke_run_times_every_layout_on_identical_outputs(bench, compiled_ops, tmp_path):
    out = tmp_path / "attention_layouts.json"
    assert bench.main(["--smoke", "--cpu-time", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"contiguous", "paged bs=8", "paged bs=16", "paged bs=128"} <= set(report["layouts"])
    for row in report["results"]:
        assert row["outputs_identical"]
        assert set(row["us_per_layer"]) == set(report["layouts"]) and all(t > 0 for t in row["us_per_layer"].values())
    assert report["clock"] == "thread CPU time" and report["statistic"] == "median"


def test_every_layout_holds_the_same_keys(bench):
    # The paged pools, read through their block tables, hold what the contiguous slots hold.
    args = bench.parse_args(["--smoke", "--layers", "2"])
    built = bench.build([1, 3], [21, 9], args, seed=0)
    _, contiguous, slots, _ = built["layouts"]["contiguous"]
    for name, (kind, caches, tables, _) in built["layouts"].items():
        if kind != "paged":
            continue
        block_size = caches[0][0].shape[1]
        for layer, (key_pool, value_pool) in enumerate(caches):
            for seq, kv_len in enumerate([21, 9]):
                keys = key_pool[tables[seq].long()].flatten(0, 1)[:kv_len]
                values = value_pool[tables[seq].long()].flatten(0, 1)[:kv_len]
                assert keys.shape[0] == kv_len and block_size in (8, 16, 32, 128)
                assert keys.equal(contiguous[layer][0][int(slots[seq]), :kv_len]), name
                assert values.equal(contiguous[layer][1][int(slots[seq]), :kv_len]), name
