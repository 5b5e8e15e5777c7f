// Every decoder layer of a Llama-family step in one call, when each GEMM runs the packed kernel:
//   torch.ops.paged_cpu.decoder_layers(residual, cos, sin, ...) -> hidden states after the final norm
//
// It runs the ops a layer runs from Python (paged/models/llama.py, BoundDecoderLayer), in the same
// order on the same tensors, through the dispatcher: the same kernels, so the same bits. What it
// saves is the Python between them. A step calls ~9 ops per layer; from Python each call costs a
// few microseconds of argument checks, wrappers and dispatch, ~1.3 ms per step on a 30-layer model
// at 4 rows, a sixth of the step (docs/performance.md, "One call per step for the decoder layers").
//
// Per layer i (the first layer normalises the embeddings without an add):
//   h, residual = add_rms_norm(delta, residual, input_norms[i])
//   q, k, v     = rotary_qkv(packed_linear(h, qkv[i]), cos, sin)
//   write_kv_cache(k, v, key_caches[i], value_caches[i], slot_mapping)
//   attn        = paged_attention(q, ...)        (contiguous_attention where seq_slots is given)
//   h, residual = add_rms_norm(packed_linear(attn, o_proj[i]), residual, post_attention_norms[i])
//   delta       = packed_linear(packed_linear(h, gate_up[i], SiLU·up), down[i])
// and then add_rms_norm(delta, residual, final_norm).
//
// out_features holds the four GEMMs' output widths [qkv, o_proj, gate_up (after SiLU·up), down],
// the same for every layer. qkv_bias is empty (no bias) or one per layer; scales is empty (weights
// in the activations' dtype) or four per layer in that order (int8 weights).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The library's own ops, looked up once; the typed handles call their CPU kernels directly.
struct LayerOps {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptionalTensor&,
                                      const OptionalTensor&, bool, c10::string_view)>
      packed_linear;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm;
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, double)>
      add_rms_norm;
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t)>
      rotary_qkv;
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&)>
      write_kv_cache;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, double)>
      attention_paged;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, double)>
      attention_contiguous;
};

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const LayerOps& layer_ops() {
  static const LayerOps ops{
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptionalTensor&, const OptionalTensor&,
                         bool, c10::string_view)>("paged_cpu::packed_linear"),
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("paged_cpu::rms_norm"),
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "paged_cpu::add_rms_norm"),
      find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             int64_t, int64_t, int64_t)>("paged_cpu::rotary_qkv"),
      find_op<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&)>(
          "paged_cpu::write_kv_cache"),
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double)>("paged_cpu::paged_attention"),
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double)>("paged_cpu::contiguous_attention"),
  };
  return ops;
}

// The attention kernels take contiguous int32 indices; the step's are converted once, not per layer.
at::Tensor as_int32(const at::Tensor& index) {
  return index.scalar_type() == at::kInt && index.is_contiguous() ? index : index.to(at::kInt).contiguous();
}

at::Tensor decoder_layers(const at::Tensor& embeddings, const at::Tensor& cos, const at::Tensor& sin,
                          at::TensorList input_norms, at::TensorList post_attention_norms, const at::Tensor& final_norm,
                          double eps, at::TensorList qkv, const c10::List<OptionalTensor>& qkv_bias,
                          at::TensorList o_proj, at::TensorList gate_up, at::TensorList down,
                          const c10::List<OptionalTensor>& scales, at::IntArrayRef out_features,
                          at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& slot_mapping,
                          const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                          const OptionalTensor& seq_slots, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          double scale) {
  const size_t num_layers = qkv.size();
  TORCH_CHECK_VALUE(num_layers > 0, "decoder_layers: no layers");
  for (size_t size : {input_norms.size(), post_attention_norms.size(), o_proj.size(), gate_up.size(), down.size(),
                      key_caches.size(), value_caches.size()}) {
    TORCH_CHECK_VALUE(size == num_layers, "decoder_layers: every per-layer list needs ", num_layers,
                      " entries (one per layer), got one with ", size);
  }
  TORCH_CHECK_VALUE(qkv_bias.size() == 0 || qkv_bias.size() == num_layers,
                    "decoder_layers: qkv_bias needs none or one entry per layer, got ", qkv_bias.size());
  TORCH_CHECK_VALUE(scales.size() == 0 || scales.size() == 4 * num_layers,
                    "decoder_layers: scales needs none or four entries per layer, got ", scales.size());
  TORCH_CHECK_VALUE(out_features.size() == 4, "decoder_layers: out_features must be [qkv, o_proj, gate_up, down]");
  TORCH_CHECK_VALUE(embeddings.dim() == 2, "decoder_layers: embeddings must be [num_tokens, hidden_size]");

  const LayerOps& ops = layer_ops();
  const int64_t rows = embeddings.size(0);
  const OptionalTensor none;
  auto weight_scales = [&](size_t layer, size_t gemm) -> OptionalTensor {
    return scales.size() == 0 ? none : OptionalTensor(scales.get(4 * layer + gemm));
  };
  const at::Tensor tables = seq_slots.has_value() ? as_int32(*seq_slots) : as_int32(block_tables);
  const at::Tensor lens = as_int32(seq_lens), starts = as_int32(query_start_loc);

  at::Tensor residual = embeddings;
  at::Tensor h = ops.rms_norm.call(residual, input_norms[0], eps);
  at::Tensor delta;
  for (size_t i = 0; i < num_layers; ++i) {
    if (i > 0) std::tie(h, residual) = ops.add_rms_norm.call(delta, residual, input_norms[i], eps);
    const OptionalTensor bias = qkv_bias.size() == 0 ? none : OptionalTensor(qkv_bias.get(i));
    const at::Tensor projected = ops.packed_linear.call(h, qkv[i], out_features[0], bias, weight_scales(i, 0),
                                                        false, "auto");
    auto [q, k, v] = ops.rotary_qkv.call(projected, cos, sin, num_heads, num_kv_heads, head_dim);
    at::Tensor key_cache = key_caches[i], value_cache = value_caches[i];
    ops.write_kv_cache.call(k, v, key_cache, value_cache, slot_mapping);
    const at::Tensor attended = seq_slots.has_value()
        ? ops.attention_contiguous.call(q, key_cache, value_cache, tables, lens, starts, scale)
        : ops.attention_paged.call(q, key_cache, value_cache, tables, lens, starts, scale);
    const at::Tensor out = ops.packed_linear.call(attended.view({rows, num_heads * head_dim}), o_proj[i],
                                                  out_features[1], none, weight_scales(i, 1), false, "auto");
    std::tie(h, residual) = ops.add_rms_norm.call(out, residual, post_attention_norms[i], eps);
    const at::Tensor activated = ops.packed_linear.call(h, gate_up[i], out_features[2], none, weight_scales(i, 2),
                                                        true, "auto");
    delta = ops.packed_linear.call(activated, down[i], out_features[3], none, weight_scales(i, 3), false, "auto");
  }
  return std::get<0>(ops.add_rms_norm.call(delta, residual, final_norm, eps));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(paged_cpu, m) {
  m.def("decoder_layers(Tensor embeddings, Tensor cos, Tensor sin, Tensor[] input_norms, "
        "Tensor[] post_attention_norms, Tensor final_norm, float eps, Tensor[] qkv, Tensor?[] qkv_bias, "
        "Tensor[] o_proj, Tensor[] gate_up, Tensor[] down, Tensor?[] scales, int[] out_features, "
        "Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor slot_mapping, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, Tensor? seq_slots, int num_heads, int num_kv_heads, "
        "int head_dim, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(paged_cpu, CPU, m) {
  m.impl("decoder_layers", &decoder_layers);
}
