// Greedy decoding's choice over a batch of logit rows, in one pass over memory:
//   torch.ops.paged_cpu.greedy_tokens(logits [rows, vocab]) -> int64 [rows]
// Row r's entry is the index of the first largest value of that row (torch.max(dim=-1)'s and
// torch.argmax's choice among equal values), or -1 where that maximum is not finite: the row holds
// a NaN or +inf, or nothing above -inf. That is the reference
//   best, tokens = logits.max(dim=-1); tokens[~torch.isfinite(best)] = -1
// (kernels/paged_kernels/sampling.py), equal index for index in every dtype, because comparisons
// of widened bf16/fp16 values order them exactly as the 16-bit values do.
//
// Why a kernel: on a 200 x 151,936 fp32 batch (a 0.5 B-class vocabulary) torch.max(dim=-1) takes
// ~12 ms on two Zen 4 cores, ~10% of the decode step it follows; one streaming pass that keeps a
// best value and its first index per vector lane reads the same 121 MB in a fraction of that.
// Rows are independent and split over torch's OpenMP threads; the result does not depend on the
// number of threads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec.h"

namespace {

using namespace paged_cpu;

// Fewer elements than this per call run on the calling thread (waking the other thread costs
// more than a pass over them): the same break-even as the light dense kernels of dense_cpu.cpp.
constexpr int64_t kParallelElements = 1 << 15;

template <typename T>
int64_t first_argmax(const T* row, int64_t n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Per lane: the largest value seen and the index where it was first seen; a strict > keeps the
  // first of equal values. NaN compares false, so it never becomes a lane's best: `nan_seen` notes it.
  vfloat best = splat(neg_inf);
  vint best_index = vint{};
  vint nan_seen = vint{};
  vint index = vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat v = load_float(row + i);
    const vint greater = v > best;
    best = greater ? v : best;
    best_index = greater ? index : best_index;
    nan_seen |= v != v;
    index += kLanes;
  }
  bool any_nan = false;
  float max_value = neg_inf;
  int64_t max_index = -1;
  for (int lane = 0; lane < kLanes; ++lane) {
    any_nan |= nan_seen[lane] != 0;
    if (best[lane] > max_value || (best[lane] == max_value && best[lane] > neg_inf && best_index[lane] < max_index)) {
      max_value = best[lane];
      max_index = best_index[lane];
    }
  }
  // The tail comes after every index above, so only a strictly larger value replaces the best.
  for (; i < n; ++i) {
    const float v = static_cast<float>(row[i]);
    any_nan |= v != v;
    if (v > max_value) {
      max_value = v;
      max_index = i;
    }
  }
  if (any_nan || !std::isfinite(max_value)) return -1;
  return max_index;
}

at::Tensor greedy_tokens(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "greedy_tokens takes logits [rows, vocab], got ", logits.dim(), " dimensions");
  TORCH_CHECK_VALUE(logits.stride(1) == 1, "greedy_tokens needs each row contiguous");
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t{1} << 31), "greedy_tokens takes rows shorter than 2^31");
  const int64_t rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* out = tokens.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(vocab, 1));
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const T* data = logits.const_data_ptr<T>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) out[r] = first_argmax(data + r * row_stride, vocab);
    });
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "greedy_tokens takes float32, bfloat16 or float16 logits, got ", logits.scalar_type());
  }
  return tokens;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(paged_cpu, m) {
  m.def("greedy_tokens(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(paged_cpu, CPU, m) {
  m.impl("greedy_tokens", &greedy_tokens);
}
