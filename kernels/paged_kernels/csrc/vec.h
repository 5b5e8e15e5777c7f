// 16-float vectors for the CPU kernels, written with GCC/Clang vector extensions: the compiler maps
// them onto whatever SIMD the host has (-march=native): one AVX-512 register, two AVX2 ones, four
// NEON ones. Also the conversions between fp32 lanes and the 16-bit storage dtypes, which round
// exactly as c10::BFloat16 and c10::Half do (round to nearest even), so a kernel that computes in
// fp32 and stores bf16/fp16 gives the bits torch's own ops give.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace paged_cpu {

constexpr int kLanes = 16;

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t vushort __attribute__((vector_size(kLanes * sizeof(uint16_t))));
// The same vector types with element alignment, for loads and stores at any element address.
typedef float vfloat_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef uint16_t vushort_unaligned __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));

// Two-source shuffle with constant lane indices, in each compiler's spelling.
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vint{__VA_ARGS__})
#endif

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_unaligned*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat_unaligned*>(p) = v; }
// x - 0 is x for every x (0 + x is not: it turns -0 into +0), so the compiler may drop the
// subtraction: a pure broadcast, folded into an FMA's memory operand ({1to16}), where 0 + x cost
// an add and a shuffle per use (half the FMA rate of a GEMM's inner loop).
inline vfloat splat(float x) { return x - vfloat{}; }

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

inline float hmax(vfloat v) {
  vfloat a = vmax(SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7), v);
  vfloat b = vmax(SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3), a);
  vfloat c = vmax(SHUFFLE(b, b, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1), b);
  return std::max(c[0], c[1]);
}

inline float hsum(vfloat v) {
  vfloat a = SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7) + v;
  vfloat b = SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3) + a;
  vfloat c = SHUFFLE(b, b, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1) + b;
  return c[0] + c[1];
}

// ---- 16 elements of a storage dtype <-> 16 fp32 lanes ------------------------------------------

template <typename T>
inline vfloat load_float(const T* p);
template <typename T>
inline void store_float(T* p, vfloat v);

template <>
inline vfloat load_float(const float* p) { return load(p); }
// double is no cache dtype we serve; torch dispatches it to the kernels all the same.
template <>
inline vfloat load_float(const double* p) {
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
template <>
inline void store_float(double* p, vfloat v) {
  for (int i = 0; i < kLanes; ++i) p[i] = v[i];
}
template <>
inline void store_float(float* p, vfloat v) { store(p, v); }

// bf16 is the upper half of an fp32: widening is a shift.
template <>
inline vfloat load_float(const c10::BFloat16* p) {
  vuint bits = __builtin_convertvector(*reinterpret_cast<const vushort_unaligned*>(p), vuint) << 16;
  return reinterpret_cast<vfloat&>(bits);
}

// Round to nearest even on the dropped 16 bits; NaN stays a quiet NaN (c10::BFloat16's rule).
inline vuint bf16_bits(vfloat v) {
  vuint bits = reinterpret_cast<vuint&>(v);
  vuint rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) >> 16;
  return v != v ? vuint{} + 0x7fc0u : rounded;
}

template <>
inline void store_float(c10::BFloat16* p, vfloat v) {
  *reinterpret_cast<vushort_unaligned*>(p) = __builtin_convertvector(bf16_bits(v), vushort);
}

template <>
inline vfloat load_float(const c10::Half* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  vfloat v;
  _mm256_storeu_ps(reinterpret_cast<float*>(&v), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  _mm256_storeu_ps(reinterpret_cast<float*>(&v) + 8,
                   _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
  return v;
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

template <>
inline void store_float(c10::Half* p, vfloat v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  const float* f = reinterpret_cast<const float*>(&v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(_mm256_loadu_ps(f), _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(_mm256_loadu_ps(f + 8), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kLanes; ++i) p[i] = c10::Half(v[i]);
#endif
}

// The first n < kLanes elements, the other lanes zero; and the store of the first n lanes. Row
// tails go through these, so a kernel has one code path for every row length.
template <typename T>
inline vfloat load_float_partial(const T* p, int64_t n) {
  T buffer[kLanes] = {};
  std::copy(p, p + n, buffer);
  return load_float(buffer);
}

template <typename T>
inline void store_float_partial(T* p, vfloat v, int64_t n) {
  T buffer[kLanes];
  store_float(buffer, v);
  std::copy(buffer, buffer + n, p);
}

// v rounded to T's precision (and widened back): what a torch op on T tensors leaves between ops.
template <typename T>
inline vfloat round_to(vfloat v) {
  T buffer[kLanes];
  store_float(buffer, v);
  return load_float(buffer);
}

template <>
inline vfloat round_to<float>(vfloat v) { return v; }

template <>
inline vfloat round_to<c10::BFloat16>(vfloat v) {
  vuint bits = bf16_bits(v) << 16;
  return reinterpret_cast<vfloat&>(bits);
}

// ---- elementwise math -------------------------------------------------------------------------

// e^x in fp32 to ~1 ulp: e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two
// parts, so r is exact to fp32), |r| <= ln(2)/2, e^r by its degree-7 Taylor polynomial (truncation
// below 1e-8 relative). 2^n is built from exponent bits, as 2^(n-1) * 2 for n = 128 (e^x near
// FLT_MAX). Overflow gives inf, results below FLT_MIN give 0 (no denormals), NaN stays NaN.
inline vfloat expv(vfloat x) {
  constexpr float log2e = 1.4426950408889634f;
  constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  constexpr float max_finite = 88.72283f, min_normal = -87.33654f;  // ln(FLT_MAX), ln(FLT_MIN)
  const vfloat clamped = x < min_normal ? splat(min_normal) : (x > max_finite ? splat(max_finite) : x);
  // Truncation of a positive number is its floor: shift by 256 so round-half-up is a truncation.
  const vint n = __builtin_convertvector(clamped * log2e + 256.5f, vint) - 256;  // -126 .. 128
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (clamped - nf * ln2_hi) - nf * ln2_lo;
  vfloat p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint top = n > 127;  // all ones where n = 128
  const vint bits = (n + top + 127) << 23;
  vfloat result = p * reinterpret_cast<const vfloat&>(bits);
  result = top ? result * 2.0f : result;
  result = x > max_finite ? splat(__builtin_inff()) : result;
  result = x < min_normal ? vfloat{} : result;
  return x != x ? x : result;
}

}  // namespace paged_cpu
