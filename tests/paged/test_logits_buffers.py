"""LogitsBuffers: one reused buffer per dtype, grown on demand up to max_rows, nothing above it;
and the model's logits written through them equal the logits computed without them."""
import pytest
import torch

from paged.models.logits_buffers import LogitsBuffers


def test_a_view_of_the_requested_rows_reuses_the_same_memory():
    buffers = LogitsBuffers(max_rows=8)
    first = buffers.rows(4, 10, torch.float32)
    again = buffers.rows(3, 10, torch.float32)
    assert first.shape == (4, 10) and again.shape == (3, 10)
    assert again.data_ptr() == first.data_ptr()


def test_a_buffer_grows_to_twice_its_rows_but_never_past_max_rows():
    buffers = LogitsBuffers(max_rows=10)
    buffers.rows(3, 5, torch.float32)
    assert buffers.num_bytes == 3 * 5 * 4
    buffers.rows(4, 5, torch.float32)
    assert buffers.num_bytes == 6 * 5 * 4
    buffers.rows(7, 5, torch.float32)
    assert buffers.num_bytes == 10 * 5 * 4


def test_dtypes_have_separate_buffers():
    buffers = LogitsBuffers(max_rows=4)
    half = buffers.rows(2, 6, torch.bfloat16)
    full = buffers.rows(2, 6, torch.float32)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert buffers.dtypes == {torch.bfloat16, torch.float32}
    assert buffers.num_bytes == 2 * 6 * 2 + 2 * 6 * 4


def test_more_rows_than_max_rows_get_no_buffer():
    buffers = LogitsBuffers(max_rows=4)
    assert buffers.rows(5, 6, torch.float32) is None
    assert buffers.num_bytes == 0


def test_max_rows_must_be_positive():
    with pytest.raises(ValueError, match="max_rows"):
        LogitsBuffers(max_rows=0)


@pytest.mark.parametrize("backend", ["packed", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_through_the_buffers_equal_logits_without_them(tiny_llama_dir, dtype, backend):
    from paged.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype, linear_backend=backend)
    hidden = torch.randn(5, model.args.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    buffers = LogitsBuffers(max_rows=8)
    with torch.inference_mode():
        expected = model.compute_logits(hidden)
        got = model.compute_logits(hidden, buffers)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert got.data_ptr() == buffers.rows(5, model.args.vocab_size, torch.float32).data_ptr()


def test_the_lm_head_output_is_handed_over_in_the_model_dtype_when_asked(tiny_llama_dir):
    from paged.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), torch.bfloat16, linear_backend="packed")
    hidden = torch.randn(5, model.args.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    buffers = LogitsBuffers(max_rows=8)
    with torch.inference_mode():
        fp32 = model.compute_logits(hidden).clone()
        native = model.compute_logits(hidden, buffers, fp32=False)
    assert native.dtype == torch.bfloat16 and torch.equal(native.float(), fp32)
    assert buffers.dtypes == {torch.bfloat16}


def test_the_engine_decodes_bf16_logits_without_an_fp32_copy(tiny_llama_dir):
    from paged import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", num_kv_blocks=64, seed=0)
    try:
        runner = llm.engine.executor
        outputs = llm.generate([[1, 5, 9, 300], [1, 77]], SamplingParams(max_tokens=6, temperature=0.0),
                               use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)
        assert runner.logits_buffers.dtypes == {torch.bfloat16}
    finally:
        llm.close()


def test_the_runner_measures_where_the_lm_head_writes_its_logits_in_place(tiny_llama_dir, monkeypatch):
    # A plan that gives the largest bucket another path: the runner times the LM head there both
    # ways into kept memory at load (Linear.probe_forward_into) and reports what it measured.
    import paged.models.llama as llama
    from paged import LLM
    from paged_kernels import linear as kl

    mixed = kl.LinearPlan(torch.float32, limits=kl.bucket_limits(kl.PROBE_ROWS),
                          paths=("packed",) * (len(kl.PROBE_ROWS) - 1) + ("torch",), source="probe")
    monkeypatch.setattr(llama, "probe_linear_plan", lambda *args, **kwargs: kl.ProbeResult(mixed, {}))
    monkeypatch.setattr(llama, "_LINEAR_PROBES", {})
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_num_seqs=200, num_kv_blocks=64, seed=0)
    try:
        into = llm.engine.performance_info()["lm_head_into"]
        assert list(into["rows"]) == [200] and set(into["rows"][200]) == {"packed_us", "torch_then_copy_us"}
        head = llm.engine.executor.model.lm_head
        assert into["packed_rows"] == ([200] if head.into_packed_buckets else [])
    finally:
        llm.close()
