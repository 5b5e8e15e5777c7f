"""greedy_tokens: each row's first argmax, -1 where the row's maximum is not finite; the compiled
kernel equals the plain-torch reference index for index."""
import pytest
import torch

from paged_kernels.sampling import greedy_tokens, reference_greedy_tokens

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * 4).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 49152])
def test_compiled_kernel_equals_the_reference(compiled_ops, dtype, vocab):
    logits = _logits(7, vocab, dtype)
    assert torch.equal(compiled_ops.greedy_tokens(logits), reference_greedy_tokens(logits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_maxima_give_the_first_index(compiled_ops, dtype):
    logits = torch.zeros(4, 100, dtype=dtype)
    for row, positions in enumerate([(3, 50), (17, 33, 99), (0, 16, 32), (98, 99)]):
        logits[row, list(positions)] = 2.5
    assert compiled_ops.greedy_tokens(logits).tolist() == [3, 17, 0, 98]
    assert reference_greedy_tokens(logits).tolist() == [3, 17, 0, 98]


def test_bf16_rounding_ties_resolve_like_torch(compiled_ops):
    # fp32 values that differ become equal in bf16; the first of them wins, as torch.argmax chooses.
    logits = torch.full((1, 64), -1.0)
    logits[0, 40], logits[0, 9] = 1.0001, 1.0
    rounded = logits.to(torch.bfloat16)
    assert compiled_ops.greedy_tokens(rounded).tolist() == [int(rounded.float().argmax())] == [9]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", [0, 21, 40])  # in the vector body and in the tail of a 41-wide row
def test_a_row_without_a_finite_maximum_gives_minus_one_and_leaves_the_others(compiled_ops, dtype, position):
    logits = _logits(4, 41, dtype)
    logits[0, position] = float("nan")
    logits[1, position] = float("inf")
    logits[2] = float("-inf")
    tokens = compiled_ops.greedy_tokens(logits)
    assert tokens[:3].tolist() == [-1, -1, -1]
    assert tokens[3] == int(logits[3].float().argmax())
    assert torch.equal(tokens, reference_greedy_tokens(logits))


def test_minus_infinity_beside_finite_values_is_not_a_failure(compiled_ops):
    logits = torch.full((1, 40), float("-inf"))
    logits[0, 33] = -1e30
    assert compiled_ops.greedy_tokens(logits).tolist() == [33]


def test_rows_of_a_strided_batch_are_read_in_place(compiled_ops):
    wide = _logits(6, 300, torch.float32)
    view = wide[::2, :257]
    assert not view.is_contiguous()
    assert torch.equal(compiled_ops.greedy_tokens(view), reference_greedy_tokens(view.contiguous()))


def test_result_does_not_depend_on_the_thread_count(compiled_ops):
    logits = _logits(64, 4096, torch.bfloat16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = compiled_ops.greedy_tokens(logits)
        torch.set_num_threads(2)
        assert torch.equal(compiled_ops.greedy_tokens(logits), single)
    finally:
        torch.set_num_threads(threads)


def test_dispatcher_takes_the_reference_for_rows_it_cannot_compile():
    logits = _logits(3, 50, torch.float64)
    assert torch.equal(greedy_tokens(logits), reference_greedy_tokens(logits))
    transposed = _logits(50, 3, torch.float32).t()  # rows not contiguous
    assert torch.equal(greedy_tokens(transposed), reference_greedy_tokens(transposed))


@pytest.mark.parametrize("shape", [(0, 10), (10,), (2, 3, 4)])
def test_dispatcher_rejects_anything_but_a_nonempty_batch_of_rows(shape):
    with pytest.raises(ValueError, match="logits \\[rows > 0, vocab\\]"):
        greedy_tokens(torch.zeros(shape))
