// The dense work of a decoder layer between its GEMMs and attention, one pass over memory each, as
// torch operators in the same library as the attention kernels:
//   torch.ops.paged_cpu.rms_norm(x, weight, eps) -> normed
//   torch.ops.paged_cpu.add_rms_norm(delta, residual, weight, eps) -> (normed, residual + delta)
//   torch.ops.paged_cpu.silu_and_mul(gate_up) -> SiLU(gate) * up
//   torch.ops.paged_cpu.rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> (q, k, v)
// Each stands for a chain of torch ops (see paged/models/forward_ops.py, the reference) and
// rounds where that chain rounds: math in fp32, every intermediate the chain stores in a bf16 or
// fp16 tensor rounded to that dtype (round to nearest even, as torch does). So in bf16/fp16 and in
// fp32 RoPE the results are torch's bits; RMSNorm's sum of squares and SiLU's exp differ from
// torch's in the last fp32 bits (another summation order, another exp), ~1e-7 relative.
//
// Rows (tokens) are independent: at::parallel_for splits them over torch's OpenMP threads once a
// call has enough elements to pay for waking them (kParallelElements*, measured), and the result
// does not depend on the number of threads. Inputs are read once and outputs written once;
// outputs are new contiguous tensors, inputs are never written.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

using namespace paged_cpu;

// Below this many elements per call a kernel runs on the calling thread: handing rows to the other
// threads cost more than it saved. Measured with bench/dense_ops.py --threads-sweep on a 2-core AMD
// EPYC (Zen 5, AVX-512), fp32: RMSNorm and RoPE (a few flops per element) broke even at 24-37 K
// elements, SiLU*up (an exp and a division per element) at 6-11 K.
constexpr int64_t kParallelElementsLight = 1 << 15;
constexpr int64_t kParallelElementsSiLU = 1 << 13;

// Rows [0, rows) of row_elements each, split over the threads in runs of at least
// min_elements elements (all on the calling thread below that).
template <typename F>
void for_rows(int64_t rows, int64_t row_elements, int64_t min_elements, const F& f) {
  const int64_t grain = std::max<int64_t>(1, min_elements / std::max<int64_t>(row_elements, 1));
  at::parallel_for(0, rows, grain, f);
}

// Calls f with a value of the C++ type of `dtype` (fp32, bf16, fp16).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK_VALUE(false, op, " takes float32, bfloat16 or float16 tensors, got ", dtype);
  }
}

// x as [rows, cols] with each row contiguous: as is when it already is, else a contiguous copy.
at::Tensor as_rows(const at::Tensor& x, int64_t cols) {
  if (x.dim() == 2 && x.stride(1) == 1) return x;
  return x.contiguous().view({-1, cols});
}

// 16 elements at p (count of them valid, the rest of the vector zero) and their store.
template <typename T>
inline vfloat load_n(const T* p, int64_t count) {
  return count == kLanes ? load_float(p) : load_float_partial(p, count);
}

template <typename T>
inline void store_n(T* p, vfloat v, int64_t count) {
  if (count == kLanes) store_float(p, v); else store_float_partial(p, v, count);
}

// ---- RMSNorm ----------------------------------------------------------------------------------

// One row: h = residual (+ delta, rounded to T and stored in new_residual); then
// out = weight * T(h * rsqrt(mean(h^2) + eps)), the mean and the product in fp32 (HF's RMSNorm).
template <typename T, bool kAdd>
void norm_row(const T* delta, const T* residual, T* new_residual, const T* weight, T* out, int64_t n, float eps) {
  vfloat sum0{}, sum1{};
  int64_t i = 0;
  auto residual_at = [&](int64_t i, int64_t count) {
    vfloat h = load_n(residual + i, count);
    if (kAdd) {
      h = round_to<T>(h + load_n(delta + i, count));
      store_n(new_residual + i, h, count);
    }
    return h;
  };
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {  // two chains halve the add latency
    const vfloat a = residual_at(i, kLanes), b = residual_at(i + kLanes, kLanes);
    sum0 += a * a;
    sum1 += b * b;
  }
  for (; i < n; i += kLanes) {
    const vfloat a = residual_at(i, std::min<int64_t>(kLanes, n - i));
    sum0 += a * a;
  }
  const float inv = 1.0f / std::sqrt(hsum(sum0 + sum1) / float(n) + eps);
  const T* h = kAdd ? new_residual : residual;  // still in L1: rows are a few KiB
  for (i = 0; i < n; i += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, n - i);
    store_n(out + i, round_to<T>(load_n(h + i, count) * inv) * load_n(weight + i, count), count);
  }
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0),
                    "rms_norm: weight must be [hidden] with hidden the input's last dimension, got input ",
                    x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype ", weight.scalar_type(),
                    " differs from the input's ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
}

template <bool kAdd>
void run_norm(const at::Tensor& delta, const at::Tensor& residual, at::Tensor& new_residual, const at::Tensor& weight,
              at::Tensor& out, double eps) {
  const int64_t n = residual.size(-1);
  if (out.numel() == 0) return;
  const at::Tensor x = as_rows(residual, n), w = weight.contiguous();
  const at::Tensor d = kAdd ? as_rows(delta, n) : delta;
  dispatch_dtype(residual.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* x_data = x.data_ptr<T>();
    const T* d_data = kAdd ? d.data_ptr<T>() : nullptr;
    const T* w_data = w.data_ptr<T>();
    T* out_data = out.data_ptr<T>();
    T* r_data = kAdd ? new_residual.data_ptr<T>() : nullptr;
    const int64_t x_stride = x.stride(0), d_stride = kAdd ? d.stride(0) : 0;
    for_rows(x.size(0), n, kParallelElementsLight, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        norm_row<T, kAdd>(kAdd ? d_data + row * d_stride : nullptr, x_data + row * x_stride,
                          kAdd ? r_data + row * n : nullptr, w_data, out_data + row * n, n, float(eps));
      }
    });
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor none;
  run_norm<false>(none, x, none, weight, out, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& delta, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm_args(residual, weight);
  TORCH_CHECK_VALUE(delta.sizes() == residual.sizes() && delta.scalar_type() == residual.scalar_type() &&
                    delta.device() == residual.device(),
                    "add_rms_norm: delta and residual must share shape, dtype and device, got ", delta.sizes(), " ",
                    delta.scalar_type(), " and ", residual.sizes(), " ", residual.scalar_type());
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  at::Tensor new_residual = at::empty(residual.sizes(), residual.options());
  run_norm<true>(delta, residual, new_residual, weight, out, eps);
  return {out, new_residual};
}

// ---- SiLU(gate) * up ----------------------------------------------------------------------------

// out = T(SiLU(gate)) * up, SiLU(g) = g / (1 + e^-g) in fp32 (torch's silu, then its mul).
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, n - i);
    const vfloat g = load_n(gate + i, count);
    const vfloat silu = round_to<T>(g / (1.0f + expv(-g)));
    store_n(out + i, silu * load_n(up + i, count), count);
  }
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK_VALUE(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
                    "silu_and_mul: the last dimension must be [gate | up], of even size, got ", gate_up.sizes());
  TORCH_CHECK_VALUE(gate_up.device().is_cpu(), "silu_and_mul: CPU tensors only");
  const int64_t n = gate_up.size(-1) / 2;
  std::vector<int64_t> sizes(gate_up.sizes().begin(), gate_up.sizes().end());
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, gate_up.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = as_rows(gate_up, 2 * n);
  dispatch_dtype(gate_up.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* x_data = x.data_ptr<T>();
    T* out_data = out.data_ptr<T>();
    const int64_t stride = x.stride(0);
    for_rows(x.size(0), n, kParallelElementsSiLU, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        silu_mul_row(x_data + row * stride, x_data + row * stride + n, out_data + row * n, n);
      }
    });
  });
  return out;
}

// ---- RoPE on the fused qkv projection ---------------------------------------------------------

// Rotate-half RoPE of one head row x [d]: with x = [x1 | x2] and cos = [c1 | c2], sin = [s1 | s2],
// out = [x1 c1 - x2 s1 | x2 c2 + x1 s2], each product and sum rounded to T as torch's
// `x * cos + rotate_half(x) * sin` rounds them. In fp32 the products must not be fused into the
// additions (an FMA rounds once where torch rounds twice): contraction is off in this function.
#if defined(__clang__)
#define NO_FP_CONTRACT _Pragma("clang fp contract(off)")
#else
#define NO_FP_CONTRACT
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
template <typename T>
void rotate_head(const T* x, const T* cos, const T* sin, T* out, int64_t half) {
  NO_FP_CONTRACT
  for (int64_t i = 0; i < half; i += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, half - i);
    const vfloat x1 = load_n(x + i, count), x2 = load_n(x + half + i, count);
    const vfloat first = round_to<T>(x1 * load_n(cos + i, count)) - round_to<T>(x2 * load_n(sin + i, count));
    const vfloat second = round_to<T>(x2 * load_n(cos + half + i, count)) + round_to<T>(x1 * load_n(sin + half + i, count));
    store_n(out + i, first, count);
    store_n(out + half + i, second, count);
  }
}
#if !defined(__clang__)
#pragma GCC pop_options
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotary_qkv(const at::Tensor& qkv, const at::Tensor& cos,
                                                          const at::Tensor& sin, int64_t num_heads,
                                                          int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0,
                    "rotary_qkv: num_heads, num_kv_heads and an even head_dim must be positive, got ", num_heads,
                    ", ", num_kv_heads, ", ", head_dim);
  const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) == width, "rotary_qkv: qkv must be [num_tokens, ", width,
                    "] for ", num_heads, " + 2 x ", num_kv_heads, " heads of ", head_dim, ", got ", qkv.sizes());
  const int64_t num_tokens = qkv.size(0);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK_VALUE(t->dim() >= 2 && t->size(0) == num_tokens && t->size(-1) == head_dim &&
                      t->numel() == num_tokens * head_dim,
                      "rotary_qkv: cos and sin must be [num_tokens, head_dim] (or [num_tokens, 1, head_dim]), got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == qkv.scalar_type(), "rotary_qkv: cos and sin must have qkv's dtype ",
                      qkv.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(qkv.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
                    "rotary_qkv: CPU tensors only");
  at::Tensor q = at::empty({num_tokens, num_heads, head_dim}, qkv.options());
  at::Tensor k = at::empty({num_tokens, num_kv_heads, head_dim}, qkv.options());
  at::Tensor v = at::empty({num_tokens, num_kv_heads, head_dim}, qkv.options());
  if (num_tokens == 0) return {q, k, v};
  const at::Tensor x = as_rows(qkv, width), c = as_rows(cos, head_dim), s = as_rows(sin, head_dim);
  dispatch_dtype(qkv.scalar_type(), "rotary_qkv", [&](auto tag) {
    using T = decltype(tag);
    const T* x_data = x.data_ptr<T>();
    const T* c_data = c.data_ptr<T>();
    const T* s_data = s.data_ptr<T>();
    T* q_data = q.data_ptr<T>();
    T* k_data = k.data_ptr<T>();
    T* v_data = v.data_ptr<T>();
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    for_rows(num_tokens, width, kParallelElementsLight, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* row = x_data + t * x.stride(0);
        const T* cos_row = c_data + t * c.stride(0);
        const T* sin_row = s_data + t * s.stride(0);
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
          T* dst = h < num_heads ? q_data + t * q_size + h * head_dim : k_data + t * kv_size + (h - num_heads) * head_dim;
          rotate_head(row + h * head_dim, cos_row, sin_row, dst, head_dim / 2);
        }
        std::memcpy(v_data + t * kv_size, row + q_size + kv_size, kv_size * sizeof(T));
      }
    });
  });
  return {q, k, v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(paged_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor delta, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_qkv(Tensor qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(paged_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_qkv", &rotary_qkv);
}

// Shapes only, for tracing (meta and fake tensors, torch.compile): the ops stay opaque calls. Sizes
// may be symbolic there, hence the sym_ accessors.
TORCH_LIBRARY_IMPL(paged_cpu, Meta, m) {
  m.impl("rms_norm", [](const at::Tensor& x, const at::Tensor&, double) {
    return at::empty_symint(x.sym_sizes(), x.options());
  });
  m.impl("add_rms_norm", [](const at::Tensor&, const at::Tensor& residual, const at::Tensor&, double) {
    return std::make_tuple(at::empty_symint(residual.sym_sizes(), residual.options()),
                           at::empty_symint(residual.sym_sizes(), residual.options()));
  });
  m.impl("silu_and_mul", [](const at::Tensor& gate_up) {
    std::vector<c10::SymInt> sizes(gate_up.sym_sizes().begin(), gate_up.sym_sizes().end());
    sizes.back() = sizes.back() / 2;
    return at::empty_symint(sizes, gate_up.options());
  });
  m.impl("rotary_qkv", [](const at::Tensor& qkv, const at::Tensor&, const at::Tensor&, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim) {
    const c10::SymInt num_tokens = qkv.sym_size(0);
    return std::make_tuple(at::empty_symint({num_tokens, num_heads, head_dim}, qkv.options()),
                           at::empty_symint({num_tokens, num_kv_heads, head_dim}, qkv.options()),
                           at::empty_symint({num_tokens, num_kv_heads, head_dim}, qkv.options()));
  });
}
