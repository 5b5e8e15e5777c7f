// The small-M GEMM of decode: y = x @ W^T (+ bias) for a few rows x [M, K] against a weight W [N, K]
// that paged_kernels/linear.py packed once at load (pack_for_kernel), as one torch operator:
//   torch.ops.paged_cpu.packed_linear(x, packed, out_features, bias, scales, silu_and_mul, isa) -> y
//   torch.ops.paged_cpu.packed_linear_out(..., out): the same y written into out (reused memory)
//
// At decode a step multiplies a handful of rows by every weight of the model, so the time is the
// time to stream the weights from DRAM: the kernel reads each weight byte once per call, in the
// order it lies in memory, and keeps the M rows' partial sums in registers (or AMX tiles) meanwhile.
//
// Packed layout: the N outputs in panels of kPanel = 32 (zero rows pad the last), each panel one
// contiguous run of memory:
//   float32:        [panels, K, 32]          element (p, k, c)    = W[32p + c, k]
//   bfloat16, int8: [panels, K2 / 2, 32, 2]  element (p, j, c, e) = W[32p + c, 2j + e]
// with K2 = K rounded up to a multiple of 32 (zero columns pad it). The pairs are the operand order
// of AVX512_BF16's dot product (vdpbf16ps: 16 fp32 lanes += the products of 16 pairs of bf16), so
// one 64-byte load gives 16 columns at two k; 16 pairs (32 k) of 16 columns are one AMX B tile
// (rows of 64 bytes, 128 bytes apart). With silu_and_mul the packer has interleaved the gate and up
// halves of a fused gate_up weight, so that panel p holds gate outputs [16p, 16p + 16) and the
// matching up outputs, and the kernel writes SiLU(gate) * up. bias and int8 scales come as fp32 in
// packed column order.
//
// Arithmetic: fp32 sums always. bf16 rows with bf16 or int8 weights: AMX tiles (tdpbf16ps) where
// the CPU and the build have them, else vdpbf16ps, else the pairs widened to fp32 and FMAs; fp32:
// FMAs. On an Emerald Rapids Xeon (1 thread, weights in L2) AMX streamed ~60 GB/s of weights at 1
// row where vdpbf16ps managed ~35: vdpbf16ps issues at half the rate of an FMA, and a tile product
// costs about as much for 1 row as for 16, so AMX runs every row count there. int8 (weight-only,
// symmetric per output channel): each weight widened exactly (bf16 holds every integer up to 256)
// to bf16 for the dot products or to fp32 for FMAs, and the channel's scale multiplies the sum.
// Then bias and one rounding to the output dtype (torch's round to nearest even). The order of the
// additions differs from F.linear's, so results differ in the last bits. `isa` forces one
// instruction path ("amx", "avx512_bf16", "fma"; "auto" picks), for tests and benchmarks.
//
// Threads: whole panels are split over torch's OpenMP threads (at::parallel_for), each thread a
// contiguous run of panels (one linear stream of memory); a call with little weight per thread
// stays on the calling thread. Rows go in tiles of at most kMaxTileRows (2 accumulators per row
// stay in the 32 vector registers) or kAmxRows (AMX); a panel is read from DRAM by its first tile
// and from L2 by the others, which meanwhile prefetch the next panel (NextPanel). The result does
// not depend on the number of threads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define PAGED_CPU_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using namespace paged_cpu;

constexpr int kPanel = 2 * kLanes;
constexpr int kMaxTileRows = 12;
constexpr int kPairsPerChunk = 16;  // K is packed in chunks of 32 (one AMX tile deep)
constexpr int kAmxRows = 16;  // rows of an A tile
// Below this many weight bytes per thread a call runs on the calling thread: waking a thread costs
// a few microseconds, the time to stream ~64 KiB.
constexpr int64_t kMinBytesPerThread = 64 << 10;

typedef int16_t vshort __attribute__((vector_size(kLanes * sizeof(int16_t))));
typedef int16_t vshort_unaligned __attribute__((vector_size(kLanes * sizeof(int16_t)), aligned(1)));
typedef uint32_t vuint_unaligned __attribute__((vector_size(kLanes * sizeof(uint32_t)), aligned(2)));

// What every tile writes its sums through: scale, bias, SiLU·up, rounding, the N tail.
template <typename T>
struct Epilogue {
  const float* scales;  // [panels * 32] in packed column order, or null
  const float* bias;    // [panels * 32] in packed column order, or null
  T* out;
  int64_t out_stride;
  int64_t out_features;  // columns of out
  bool silu_and_mul;

  // acc0 / acc1: the sums of packed columns [32p, 32p + 16) and [32p + 16, 32p + 32) for row m.
  inline void store(int64_t row, int64_t panel, vfloat acc0, vfloat acc1) const {
    const int64_t base = panel * kPanel;
    if (scales != nullptr) {
      acc0 *= load(scales + base);
      acc1 *= load(scales + base + kLanes);
    }
    if (bias != nullptr) {
      acc0 += load(bias + base);
      acc1 += load(bias + base + kLanes);
    }
    T* dst = out + row * out_stride;
    if (silu_and_mul) {
      // As torch_silu_and_mul rounds: the GEMM's bf16 outputs, SiLU rounded, then the product.
      const vfloat gate = round_to<T>(acc0), up = round_to<T>(acc1);
      const vfloat silu = round_to<T>(gate / (1.0f + expv(-gate)));
      put(dst, panel * kLanes, silu * up);
    } else {
      put(dst, base, acc0);
      put(dst, base + kLanes, acc1);
    }
  }

  inline void put(T* dst, int64_t col, vfloat v) const {
    const int64_t count = std::min<int64_t>(kLanes, out_features - col);
    if (count == kLanes) {
      store_float(dst + col, v);
    } else if (count > 0) {
      store_float_partial(dst + col, v, count);
    }
  }
};

// Pulls the next panel toward the cache while the row tiles of this one compute. Only the first
// tile of a panel reads it from DRAM; without prefetches the memory bus idles while the later
// tiles run from L2, then the compute waits on the next panel's first tile. The tiles of a panel
// share the next panel's cache lines out, each issuing its share evenly over its k loop.
struct NextPanel {
  const char* line = nullptr;  // the next line to prefetch
  int64_t lines = 0;           // lines this tile prefetches
  int64_t k_steps = 1;         // steps of the tile's k loop
  int64_t credit = 0;

  inline void step() {  // once per k step
    credit += lines;
    while (credit >= k_steps) {
      __builtin_prefetch(line, 0, 3);
      line += 64;
      credit -= k_steps;
    }
  }
};

// ---- the tiles: MT rows x one panel, over all of K ---------------------------------------------

// fp32 weights [K, 32], fp32 rows.
template <int MT, typename T>
void tile_fp32(const float* x, int64_t x_stride, const float* w, int64_t k_size, const Epilogue<T>& epi,
               int64_t row0, int64_t panel, NextPanel next) {
  vfloat acc[MT][2] = {};
  for (int64_t k = 0; k < k_size; ++k, w += kPanel) {
    next.step();
    const vfloat w0 = load(w), w1 = load(w + kLanes);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const vfloat xm = splat(x[m * x_stride + k]);
      acc[m][0] += xm * w0;
      acc[m][1] += xm * w1;
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) epi.store(row0 + m, panel, acc[m][0], acc[m][1]);
}

// 16 columns x one k pair of the pair layout, widened to fp32: the even k and the odd k.
inline void widen_pairs(const c10::BFloat16* w, vfloat& even, vfloat& odd) {
  const vuint bits = *reinterpret_cast<const vuint_unaligned*>(w);
  const vuint lo = bits << 16, hi = bits & 0xffff0000u;
  even = reinterpret_cast<const vfloat&>(lo);
  odd = reinterpret_cast<const vfloat&>(hi);
}

inline void widen_pairs(const int8_t* w, vfloat& even, vfloat& odd) {
  const vshort pair = *reinterpret_cast<const vshort_unaligned*>(w);  // little endian: even k in the low byte
  even = __builtin_convertvector((vshort)(pair << 8) >> 8, vfloat);
  odd = __builtin_convertvector(pair >> 8, vfloat);
}

// Pair-layout weights (bf16 or int8) widened to fp32, fp32 rows (K padded to even with a zero).
template <int MT, typename W, typename T>
void tile_pairs_fma(const float* x, int64_t x_stride, const W* w, int64_t pairs, const Epilogue<T>& epi,
                    int64_t row0, int64_t panel) {
  vfloat acc[MT][2] = {};
  for (int64_t j = 0; j < pairs; ++j, w += 2 * kPanel) {
    vfloat e0, o0, e1, o1;
    widen_pairs(w, e0, o0);
    widen_pairs(w + 2 * kLanes, e1, o1);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const vfloat xe = splat(x[m * x_stride + 2 * j]), xo = splat(x[m * x_stride + 2 * j + 1]);
      acc[m][0] += xe * e0;  // one FMA each
      acc[m][1] += xe * e1;
      acc[m][0] += xo * o0;
      acc[m][1] += xo * o1;
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) epi.store(row0 + m, panel, acc[m][0], acc[m][1]);
}

#if defined(__AVX512BF16__)
inline __m512bh pairs_bf16(const c10::BFloat16* w) { return (__m512bh)_mm512_loadu_si512(w); }

// 32 int8 -> 32 bf16 in the same order (exact: |v| <= 128).
inline __m512bh pairs_bf16(const int8_t* w) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kLanes))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// Pair-layout weights (bf16 or int8), bf16 rows with K even: vdpbf16ps.
template <int MT, typename W, typename T>
void tile_pairs_dot(const c10::BFloat16* x, int64_t x_stride, const W* w, int64_t pairs, const Epilogue<T>& epi,
                    int64_t row0, int64_t panel, NextPanel next) {
  // Few rows leave the dot products' latency exposed: then two sets of sums, over even and odd
  // steps of the loop (pairs is a multiple of 16).
  constexpr int U = MT <= 3 ? 2 : 1;
  __m512 acc[U][MT][2];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[u][m][0] = acc[u][m][1] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < pairs; j += U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u, w += 2 * kPanel) {
      next.step();
      const __m512bh w0 = pairs_bf16(w), w1 = pairs_bf16(w + kPanel);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        int32_t pair_bits;  // x[m][2j + 2u], x[m][2j + 2u + 1] as one 32-bit lane
        std::memcpy(&pair_bits, x + m * x_stride + 2 * (j + u), sizeof(pair_bits));
        const __m512bh xm = (__m512bh)_mm512_set1_epi32(pair_bits);
        acc[u][m][0] = _mm512_dpbf16_ps(acc[u][m][0], xm, w0);
        acc[u][m][1] = _mm512_dpbf16_ps(acc[u][m][1], xm, w1);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    const __m512 sum0 = U == 2 ? _mm512_add_ps(acc[0][m][0], acc[U - 1][m][0]) : acc[0][m][0];
    const __m512 sum1 = U == 2 ? _mm512_add_ps(acc[0][m][1], acc[U - 1][m][1]) : acc[0][m][1];
    epi.store(row0 + m, panel, reinterpret_cast<const vfloat&>(sum0), reinterpret_cast<const vfloat&>(sum1));
  }
}
#endif

// ---- dispatch ----------------------------------------------------------------------------------

// A run-time row count as the template argument of Tile.
template <template <int> class Tile, typename... Args>
void with_rows(int rows, Args&&... args) {
  switch (rows) {
    case 1: return Tile<1>::run(args...);
    case 2: return Tile<2>::run(args...);
    case 3: return Tile<3>::run(args...);
    case 4: return Tile<4>::run(args...);
    case 5: return Tile<5>::run(args...);
    case 6: return Tile<6>::run(args...);
    case 7: return Tile<7>::run(args...);
    case 8: return Tile<8>::run(args...);
    case 9: return Tile<9>::run(args...);
    case 10: return Tile<10>::run(args...);
    case 11: return Tile<11>::run(args...);
    default: return Tile<12>::run(args...);
  }
}

// What one call computes: the rows as the tiles read them, the packed weight, the epilogue.
template <typename W, typename X, typename T>
struct Problem {
  const X* x;
  int64_t x_stride;
  const W* packed;
  int64_t k_steps;         // K (fp32) or K2 / 2 (pairs)
  int64_t panel_elements;  // elements of W per panel
  Epilogue<T> epi;

  const W* panel(int64_t p) const { return packed + p * panel_elements; }
};

template <int MT>
struct Fp32Tile {
  template <typename T>
  static void run(const Problem<float, float, T>& p, int64_t row0, int64_t panel, NextPanel next) {
    tile_fp32<MT>(p.x + row0 * p.x_stride, p.x_stride, p.panel(panel), p.k_steps, p.epi, row0, panel, next);
  }
};

template <int MT>
struct PairsFmaTile {
  template <typename W, typename T>
  static void run(const Problem<W, float, T>& p, int64_t row0, int64_t panel, NextPanel) {
    tile_pairs_fma<MT>(p.x + row0 * p.x_stride, p.x_stride, p.panel(panel), p.k_steps, p.epi, row0, panel);
  }
};

#if defined(__AVX512BF16__)
template <int MT>
struct PairsDotTile {
  template <typename W, typename T>
  static void run(const Problem<W, c10::BFloat16, T>& p, int64_t row0, int64_t panel, NextPanel next) {
    tile_pairs_dot<MT>(p.x + row0 * p.x_stride, p.x_stride, p.panel(panel), p.k_steps, p.epi, row0, panel, next);
  }
};
#endif

// Panels [begin, end) x row tiles of at most kMaxTileRows (balanced: 13 rows are 7 + 6).
template <template <int> class Tile, typename W, typename X, typename T>
void vector_panels(const Problem<W, X, T>& p, int64_t rows, int64_t begin, int64_t end) {
  const int64_t tiles = (rows + kMaxTileRows - 1) / kMaxTileRows;
  const int64_t tile_rows = (rows + tiles - 1) / tiles;
  const int64_t panel_lines = p.panel_elements * static_cast<int64_t>(sizeof(W)) / 64;
  for (int64_t panel = begin; panel < end; ++panel) {
    const char* next_panel = reinterpret_cast<const char*>(p.panel(panel + 1));
    int64_t tile = 0, line = 0;
    for (int64_t row0 = 0; row0 < rows; row0 += tile_rows, ++tile) {
      NextPanel next;  // one row tile streams from DRAM on its own: the hardware prefetcher keeps up
      if (tiles > 1 && panel + 1 < end) {
        const int64_t upto = panel_lines * (tile + 1) / tiles;
        next.line = next_panel + 64 * line;
        next.lines = upto - line;
        next.k_steps = p.k_steps;
        line = upto;
      }
      with_rows<Tile>(static_cast<int>(std::min(tile_rows, rows - row0)), p, row0, panel, next);
    }
  }
}

#if defined(PAGED_CPU_AMX)
// Linux hands a process the AMX tile registers only once it asks (arch_prctl); false where it
// refuses (an old kernel), and the vector tiles run instead.
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Panels [begin, end) with AMX: tiles 0 and 1 sum the panel's two 16-column halves for up to 16
// rows, tile 2 holds 32 k of the rows, tiles 3 and 4 the matching 16 pairs x 16 columns of each
// half. int8 weights are widened to bf16 first: a chunk at a time into 2 KiB (one row tile), or
// the whole panel once when several row tiles reuse it. The rows (x) are padded to a whole number
// of A tiles. Tile state is per thread: each thread configures and releases it.
template <typename W, typename T>
void amx_panels(const Problem<W, c10::BFloat16, T>& p, int64_t rows, int64_t begin, int64_t end) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  constexpr int64_t pair_row = 2 * kPanel;  // elements from one k pair of a panel to the next
  const int tile_rows = static_cast<int>(std::min<int64_t>(rows, kAmxRows));
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = t < 3 ? tile_rows : kPairsPerChunk;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float sums[kAmxRows][kPanel];
  alignas(64) c10::BFloat16 chunk_bf16[kPairsPerChunk * pair_row];
  const bool widen_panel = kInt8 && rows > kAmxRows;
  std::vector<c10::BFloat16> panel_bf16(widen_panel ? p.panel_elements : 0);
  const int64_t chunks = p.k_steps / kPairsPerChunk;
  const int64_t x_bytes = p.x_stride * static_cast<int64_t>(sizeof(c10::BFloat16));
  auto widen = [](const int8_t* w, int64_t pairs, c10::BFloat16* out) {
    for (int64_t j = 0; j < pairs * pair_row; j += kPanel) {
      _mm512_storeu_si512(out + j, (__m512i)pairs_bf16(w + j));
    }
  };
  for (int64_t panel = begin; panel < end; ++panel) {
    const W* w_panel = p.panel(panel);
    if constexpr (kInt8) {
      if (widen_panel) widen(w_panel, p.k_steps, panel_bf16.data());
    }
    for (int64_t row0 = 0; row0 < rows; row0 += tile_rows) {
      const c10::BFloat16* x = p.x + row0 * p.x_stride;
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t offset = c * kPairsPerChunk * pair_row;
        const void* b = w_panel + offset;
        if constexpr (kInt8) {
          if (widen_panel) {
            b = panel_bf16.data() + offset;
          } else {
            widen(w_panel + offset, kPairsPerChunk, chunk_bf16);
            b = chunk_bf16;
          }
        }
        const auto* b16 = static_cast<const c10::BFloat16*>(b);
        _tile_loadd(2, x + c * 2 * kPairsPerChunk, x_bytes);
        _tile_loadd(3, b16, pair_row * sizeof(c10::BFloat16));
        _tile_loadd(4, b16 + kPanel, pair_row * sizeof(c10::BFloat16));
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, sums[0], kPanel * sizeof(float));
      _tile_stored(1, sums[0] + kLanes, kPanel * sizeof(float));
      for (int m = 0; m < tile_rows && row0 + m < rows; ++m) {
        p.epi.store(row0 + m, panel, load(sums[m]), load(sums[m] + kLanes));
      }
    }
  }
  _tile_release();
}
#endif

// Every panel, split over the threads; `body(begin, end)` computes a run of panels.
template <typename F>
void for_panels(int64_t panels, int64_t panel_bytes, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(panel_bytes, 1));
  at::parallel_for(0, panels, grain, body);
}

bool has_avx512_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

bool uses_amx() {
#if defined(PAGED_CPU_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// ---- the operator ------------------------------------------------------------------------------

// The instruction paths this build and process can take, for reports: "amx", "avx512_bf16", "fma".
std::string packed_linear_isa() {
  std::string isa = uses_amx() ? "amx," : "";
  return isa + (has_avx512_bf16() ? "avx512_bf16,fma" : "fma");
}


// x @ W.T (+ bias, SiLU(gate) * up) into `out` [rows, out_features] of x's dtype, rows contiguous.
void packed_linear_into(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scales,
                        bool silu_and_mul, c10::string_view isa, const at::Tensor& out) {
  TORCH_CHECK_VALUE(x.dim() == 2, "packed_linear: x must be [rows, in_features], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() && packed.device().is_cpu(), "packed_linear: CPU tensors only");
  const at::ScalarType dtype = x.scalar_type(), wtype = packed.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, "packed_linear: x must be float32 or bfloat16, got ",
                    dtype);
  TORCH_CHECK_VALUE(wtype == dtype || wtype == at::kChar, "packed_linear: a ", wtype, " weight does not take ", dtype,
                    " rows (the weight is x's dtype, or int8)");
  const int64_t rows = x.size(0), k_size = x.size(1);
  const bool pairs = wtype != at::kFloat;
  TORCH_CHECK_VALUE(packed.is_contiguous() && packed.dim() == (pairs ? 4 : 3) && packed.size(-1) == (pairs ? 2 : kPanel) &&
                        (!pairs || packed.size(2) == kPanel),
                    "packed_linear: packed must be [panels, K, 32] (float32) or [panels, K2 / 2, 32, 2] (K2: K rounded up to a "
                    "multiple of 32), contiguous, got ",
                    packed.sizes());
  const int64_t panels = packed.size(0), k_steps = packed.size(1);
  const int64_t chunk = 2 * kPairsPerChunk;
  TORCH_CHECK_VALUE(k_steps == (pairs ? (k_size + chunk - 1) / chunk * kPairsPerChunk : k_size), "packed_linear: x has ",
                    k_size, " features, the packed weight ", pairs ? 2 * k_steps : k_steps,
                    pairs ? " (in features rounded up to a multiple of 32)" : "");
  const int64_t padded_outputs = panels * kPanel;
  TORCH_CHECK_VALUE(out_features > 0 && (silu_and_mul ? 2 * out_features : out_features) <= padded_outputs &&
                        (silu_and_mul ? 2 * out_features : out_features) > padded_outputs - kPanel,
                    "packed_linear: out_features ", out_features, " does not fit ", panels, " panels",
                    silu_and_mul ? " (silu_and_mul: half the packed outputs)" : "");
  auto packed_vector = [&](const c10::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == padded_outputs,
                      "packed_linear: ", name, " must be float32 [", padded_outputs, "] in packed column order, got ",
                      t->scalar_type(), " ", t->sizes());
    return t->data_ptr<float>();
  };
  const float* bias_data = packed_vector(bias, "bias");
  const float* scale_data = packed_vector(scales, "scales");
  TORCH_CHECK_VALUE((scale_data != nullptr) == (wtype == at::kChar), "packed_linear: int8 weights need scales, ",
                    "others take none");

  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows && out.size(1) == out_features &&
                        out.scalar_type() == dtype && out.device().is_cpu() && out.stride(1) == 1,
                    "packed_linear: out must be ", dtype, " [", rows, ", ", out_features,
                    "] on the CPU with contiguous rows, got ", out.scalar_type(), " ", out.sizes());
  if (rows == 0) return;
  const int64_t panel_elements = k_steps * kPanel * (pairs ? 2 : 1);
  const int64_t panel_bytes = panel_elements * static_cast<int64_t>(packed.element_size());
  const bool bf16_rows = pairs && dtype == at::kBFloat16;
  // "auto": the fastest this CPU and build have; the others force one (for tests and benchmarks).
  const bool auto_isa = isa == "auto";
  TORCH_CHECK_VALUE(auto_isa || isa == "amx" || isa == "avx512_bf16" || isa == "fma",
                    "packed_linear: isa must be auto, amx, avx512_bf16 or fma, got ", std::string(isa));
  TORCH_CHECK_VALUE(auto_isa || isa == "fma" || (bf16_rows && (isa == "amx" ? uses_amx() : has_avx512_bf16())),
                    "packed_linear: isa ", std::string(isa), " needs bf16 rows, a bf16 or int8 weight and a CPU and ",
                    "build with it (here: ", packed_linear_isa(), ")");
  const bool amx = bf16_rows && (auto_isa ? uses_amx() : isa == "amx");
  const bool dot = bf16_rows && !amx && (auto_isa ? has_avx512_bf16() : isa == "avx512_bf16");
  // The rows as the tiles read them: as given where their layout fits, else a zero-padded copy
  // (K to the packed K; for AMX the rows to whole A tiles), in fp32 for the widening FMA tiles.
  const int64_t x_cols = pairs ? 2 * k_steps : k_size;
  const int64_t x_rows = amx && rows > kAmxRows ? (rows + kAmxRows - 1) / kAmxRows * kAmxRows : rows;
  at::Tensor xs = x;
  if ((pairs && !bf16_rows) || (pairs && !amx && !dot)) {
    xs = at::zeros({rows, x_cols}, x.options().dtype(at::kFloat));
    xs.narrow(1, 0, k_size).copy_(x);
  } else if (x.stride(1) != 1 || x_cols != k_size || x_rows != rows) {
    xs = at::zeros({x_rows, x_cols}, x.options());
    xs.narrow(0, 0, rows).narrow(1, 0, k_size).copy_(x);
  }
  const int64_t x_stride = xs.stride(0);

  auto run = [&](auto w_tag, auto t_tag) {
    using W = decltype(w_tag);
    using T = decltype(t_tag);
    const Epilogue<T> epi{scale_data, bias_data, out.data_ptr<T>(), out.stride(0), out_features, silu_and_mul};
    const W* w = static_cast<const W*>(packed.data_ptr());
    if constexpr (std::is_same_v<W, float>) {
      const Problem<float, float, T> p{xs.data_ptr<float>(), x_stride, w, k_steps, panel_elements, epi};
      for_panels(panels, panel_bytes, [&](int64_t begin, int64_t end) { vector_panels<Fp32Tile>(p, rows, begin, end); });
      return;
    } else {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (amx || dot) {
          const Problem<W, c10::BFloat16, T> p{xs.data_ptr<c10::BFloat16>(), x_stride, w, k_steps, panel_elements,
                                               epi};
#if defined(PAGED_CPU_AMX)
          if (amx) {
            for_panels(panels, panel_bytes, [&](int64_t begin, int64_t end) { amx_panels(p, rows, begin, end); });
            return;
          }
#endif
          for_panels(panels, panel_bytes,
                     [&](int64_t begin, int64_t end) { vector_panels<PairsDotTile>(p, rows, begin, end); });
          return;
        }
      }
#endif
      const Problem<W, float, T> p{xs.data_ptr<float>(), x_stride, w, k_steps, panel_elements, epi};
      for_panels(panels, panel_bytes,
                 [&](int64_t begin, int64_t end) { vector_panels<PairsFmaTile>(p, rows, begin, end); });
    }
  };
  if (dtype == at::kFloat) {
    if (wtype == at::kChar) run(int8_t{}, float{}); else run(float{}, float{});
  } else {
    if (wtype == at::kChar) run(int8_t{}, c10::BFloat16{}); else run(c10::BFloat16{}, c10::BFloat16{});
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scales,
                         bool silu_and_mul, c10::string_view isa) {
  TORCH_CHECK_VALUE(x.dim() == 2, "packed_linear: x must be [rows, in_features], got ", x.sizes());
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  packed_linear_into(x, packed, out_features, bias, scales, silu_and_mul, isa, out);
  return out;
}

// The same product written into a caller's tensor (memory it reuses from call to call).
void packed_linear_out(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scales,
                       bool silu_and_mul, c10::string_view isa, const at::Tensor& out) {
  packed_linear_into(x, packed, out_features, bias, scales, silu_and_mul, isa, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(paged_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor packed, int out_features, Tensor? bias=None, Tensor? scales=None, "
        "bool silu_and_mul=False, str isa=\"auto\") -> Tensor");
  m.def("packed_linear_out(Tensor x, Tensor packed, int out_features, Tensor? bias, Tensor? scales, "
        "bool silu_and_mul, str isa, Tensor(a!) out) -> ()");
  m.def("packed_linear_isa() -> str", &packed_linear_isa);
}

TORCH_LIBRARY_IMPL(paged_cpu, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_linear_out", &packed_linear_out);
}

// Shapes only, for tracing (meta and fake tensors).
TORCH_LIBRARY_IMPL(paged_cpu, Meta, m) {
  m.impl("packed_linear", [](const at::Tensor& x, const at::Tensor&, int64_t out_features,
                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool,
                             c10::string_view) {
    return at::empty_symint({x.sym_size(0), c10::SymInt(out_features)}, x.options());
  });
}
