"""Sharded layers on 2 gloo ranks equal their unsharded twins (tp_layer_program.py does the work
in one torchrun; each test checks one case of its report)."""
import json
from pathlib import Path

import pytest

from tp_helpers import run_torchrun

PROGRAM = Path(__file__).with_name("tp_layer_program.py")
TOLERANCE = 1e-5  # fp32: a row-parallel sum adds the partial products in another order


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-layers") / "report.json"
    run_torchrun(PROGRAM, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["mlp", "attention_kv_split", "attention_kv_replicated", "attention_bias",
                                  "embedding_padded_vocab", "lm_head_padded_vocab"])
def test_sharded_layer_equals_unsharded(report, case):
    assert report[case]["max_error"] < TOLERANCE


@pytest.mark.parametrize("case", ["mlp", "attention_kv_split", "attention_kv_replicated", "embedding_padded_vocab",
                                  "shared_memory_all_reduce"])
def test_ranks_hold_identical_outputs_after_the_all_reduce(report, case):
    assert report[case]["ranks_agree"]


def test_shared_memory_all_reduce_equals_gloo_bit_for_bit(report):
    assert report["shared_memory_all_reduce"]["max_error"] == 0.0
