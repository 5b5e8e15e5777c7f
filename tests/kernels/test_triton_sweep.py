"""Wide seeded sweep of the Triton paged attention against the reference (interpreter).

Not part of ``make test``: run with ``pytest -m triton_sweep tests/kernels`` (minutes).
Each case draws a random batch (decode / full prefill / chunk on a cached prefix per sequence)
and a random configuration; the axes below are all covered.
"""
import random

import pytest
import torch

from paged_kernels.reference import reference_paged_attention
from paged_kernels.triton_attention import triton_paged_attention
from paged_cases import DTYPES, assert_close_to_reference, make_batch

BLOCK_SIZES = [1, 2, 5, 8, 16, 32, 64, 128, 256]
HEAD_DIMS = [64, 80, 96, 128, 256]
HEADS = [(4, 4), (8, 4), (8, 2), (8, 1), (12, 2), (16, 2)]  # GQA ratios 1, 2, 4, 8, 6, 8
SPLITS = [None, 1, 2, 3, 5]
BLOCK_QS = [None, 1, 2, 4, 16]
NUM_CASES = 72


def _draw(seed):
    rng = random.Random(seed)
    q_lens, kv_lens = [], []
    for _ in range(rng.randint(1, 4)):
        kv = rng.choice([1, rng.randint(1, 40), rng.randint(40, 200), 16 * rng.randint(1, 8)])
        kind = rng.choice(["decode", "prefill", "chunk"])
        if kind == "prefill" and kv > 64:  # keep the interpreter's work bounded
            kind = "chunk"
        q = 1 if kind == "decode" else kv if kind == "prefill" else rng.randint(1, min(kv, 32))
        q_lens.append(q)
        kv_lens.append(kv)
    num_heads, num_kv_heads = HEADS[seed % len(HEADS)]
    config = dict(
        block_size=BLOCK_SIZES[seed % len(BLOCK_SIZES)],
        head_dim=HEAD_DIMS[seed % len(HEAD_DIMS)],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        dtype=rng.choice(list(DTYPES)),
        poison=rng.random() < 0.5,
    )
    # one-token tiles over many tokens mean hundreds of interpreted programs: only for small batches
    block_qs = BLOCK_QS if sum(q_lens) <= 48 else [None, 4, 16]
    knobs = dict(num_splits=rng.choice(SPLITS), block_q=rng.choice(block_qs))
    return q_lens, kv_lens, config, knobs


CASES = [_draw(seed) for seed in range(NUM_CASES)]


def _case_id(case):
    q_lens, kv_lens, c, k = case
    return (f"q{'-'.join(map(str, q_lens))}_kv{'-'.join(map(str, kv_lens))}_bs{c['block_size']}"
            f"_d{c['head_dim']}_h{c['num_heads']}kv{c['num_kv_heads']}_{c['dtype']}"
            f"_split{k['num_splits']}_bq{k['block_q']}")


@pytest.mark.triton_sweep
@pytest.mark.parametrize("seed", range(NUM_CASES), ids=[_case_id(c) for c in CASES])
def test_sweep_matches_reference(seed):
    q_lens, kv_lens, config, knobs = CASES[seed]
    config = dict(config, dtype=DTYPES[config["dtype"]])
    batch = make_batch(q_lens, kv_lens, seed=seed, **config)
    out = triton_paged_attention(*batch.args(), **knobs)
    assert_close_to_reference(out, reference_paged_attention(*batch.args()))
