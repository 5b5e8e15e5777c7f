// Paged attention and KV-cache writes on CPU tensors: the kernels contract (kernels/paged_kernels/__init__.py)
// as torch operators, torch.ops.paged_cpu.paged_attention and torch.ops.paged_cpu.write_kv_cache, and
// its contiguous variant torch.ops.paged_cpu.contiguous_attention: the same attention over K/V laid
// out as [num_slots, max_model_len, num_kv_heads, head_dim], each sequence in one slot, read
// linearly with no block table (Layout::kContiguous below; the only code that differs is where a
// tile's rows start). Writes into such a cache are write_kv_cache with block_size = max_model_len.
//
// Attention is split into work items, each one (sequence, KV head, run of that sequence's new
// tokens), or, for a decode row in a batch with many of them, (sequence, all its KV heads). An
// item's query rows are those tokens times the query heads of each KV head's GQA group;
// it walks the sequence's keys through its block table up to the last key its rows may see, in
// tiles of kTile consecutive keys (a tile may span several blocks: small blocks cost no more
// softmax steps than large ones), and reads every K and V row of a tile once for all of its rows. Each row keeps an online softmax (running max, running sum, output
// accumulator) in float32 whatever the cache dtype. What must hold:
//   - no slot at or past a sequence's length is ever read (unused slots may hold NaN);
//   - a row at position p uses keys 0..p only (causal; the new tokens are the last q_len ones);
//   - the result does not depend on the number of threads (each item is computed by one thread).
// Items are handed to torch's own OpenMP threads (at::parallel_for) from a shared counter,
// largest first, so uneven lengths still balance and torch.set_num_threads is respected.
//
// The inner loops use the 16-float vectors of vec.h; K and V rows are widened to fp32 in registers
// (bf16 scores use AVX512_BF16 dot products where the host has them, see tile_scores_bf16).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

using namespace paged_cpu;

constexpr int kTile = kLanes;    // keys per online-softmax step: one score vector per row
constexpr int kMaxItemRows = 32; // query rows per work item when a sequence has several new tokens
// Decode rows take one item per sequence (all its KV heads) when there are at least this many of
// them per thread; fewer would leave threads idle, so they take one item per KV head.
constexpr int64_t kWholeSequenceItemsPerThread = 4;
// Tiles whose rows are requested ahead of the one being computed (prefetch_rows, prefetch_item_start).
constexpr int64_t kPrefetchTiles = 2;

// 2^x for x <= 0 (larger x works up to 127): 2^round(x) from the exponent bits times a degree-7
// Taylor polynomial of 2^f on f in [-1/2, 1/2] (truncation error < 1e-8 relative). Inputs below
// -126 (and -inf) give 2^-126, which callers only multiply into zeros or discard.
inline vfloat exp2v(vfloat x) {
  constexpr float ln2 = 0.6931471805599453f;
  constexpr float c1 = ln2, c2 = c1 * ln2 / 2, c3 = c2 * ln2 / 3, c4 = c3 * ln2 / 4;
  constexpr float c5 = c4 * ln2 / 5, c6 = c5 * ln2 / 6, c7 = c6 * ln2 / 7;
  x = x < -126.0f ? splat(-126.0f) : x;
  // Truncation of a positive number is its floor: shift by 256 so round-half-up is a truncation.
  vint n = __builtin_convertvector(x + 256.5f, vint) - 256;
  vfloat f = x - __builtin_convertvector(n, vfloat);
  vfloat p = splat(c7);
  p = p * f + c6;
  p = p * f + c5;
  p = p * f + c4;
  p = p * f + c3;
  p = p * f + c2;
  p = p * f + c1;
  p = p * f + 1.0f;
  vint bits = (n + 127) << 23;
  return p * reinterpret_cast<vfloat&>(bits);
}

// Lane t of the result is the sum of the lanes of v[t]: a 16 x 16 transpose fused with the adds.
inline vfloat transpose_sum(vfloat* v) {
  vfloat w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    w[i] = SHUFFLE(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = SHUFFLE(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    y[i] = SHUFFLE(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return SHUFFLE(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Whole vectors through vec.h's widening loads (one shift per 16 bf16 lanes), then the tail.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load_float(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}


// Where a sequence's K/V live. kPaged: block_tables[seq] lists its blocks. kContiguous: the
// "table" is one slot id per sequence and the slot holds its keys 0..max_model_len-1 in order
// (block_size is then max_model_len): a tile is always evenly spaced rows.
enum class Layout { kPaged, kContiguous };

// One (sequence, KV heads kv_head .. kv_head + num_kv_heads - 1, run of new tokens) of the batch.
// A decode item takes every KV head of its sequence when the batch has sequences enough to keep
// the threads busy: a token's K (or V) rows for all heads are adjacent, so the item reads each
// block as one run the hardware prefetcher follows, where one item per head reads a slice of
// every row.
struct Item {
  int32_t seq;
  int32_t kv_head;
  int32_t num_kv_heads;
  int32_t first_token;  // index among the sequence's new tokens
  int32_t num_tokens;
  int64_t cost;         // query rows x keys read, for scheduling
};

struct Batch {
  int64_t num_heads, num_kv_heads, group, head_dim, padded_dim, block_size;
  float scale_log2;  // softmax scale times log2(e): scores live in the exp2 domain
  const int32_t* block_tables;
  int64_t table_stride;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
};

template <typename scalar_t>
struct Views {
  const scalar_t* query;
  int64_t q_token_stride, q_head_stride;
  const scalar_t* key_cache;
  const scalar_t* value_cache;
  int64_t k_block_stride, k_token_stride, k_head_stride;
  int64_t v_block_stride, v_token_stride, v_head_stride;
  scalar_t* out;
  int64_t o_token_stride, o_head_stride;
};

// Per-thread scratch, kept between calls. Query and accumulator rows are padded to
// padded_dim = chunks * kLanes floats; the padding of the converted key/value rows must stay zero
// (0 * stale inf would be NaN), so a new shape starts from fresh zeros.
struct Scratch {
  std::vector<float> q, acc, keys, values, probs, row_max, row_sum, alpha;
  std::vector<c10::BFloat16> q_bf16;  // the query rows as they came, for bf16 dot products
  std::vector<vfloat> partial;
  int64_t rows = 0, padded_dim = 0, head_dim = 0;

  void fit(int64_t rows_, int64_t padded_dim_, int64_t head_dim_) {
    if (rows_ == rows && padded_dim_ == padded_dim && head_dim_ == head_dim) return;
    rows = rows_, padded_dim = padded_dim_, head_dim = head_dim_;
    q.assign(rows * padded_dim, 0.0f);
    q_bf16.assign(rows * padded_dim, c10::BFloat16(0.0f));
    acc.assign(rows * padded_dim, 0.0f);
    keys.assign(kTile * padded_dim, 0.0f);
    values.assign(kTile * padded_dim, 0.0f);
    probs.assign(rows * kTile, 0.0f);
    row_max.assign(rows, 0.0f);
    row_sum.assign(rows, 0.0f);
    alpha.assign(rows, 0.0f);
    partial.assign(rows * kTile, vfloat{});
  }
};

// Where a tile's K or V rows lie: evenly spaced (inside one block, or converted into fp32
// scratch), or anywhere (a tile that spans blocks). Row t starts at rows[t]; T is the cache dtype
// (read in place and widened in registers) or float (the scratch).
template <typename T>
struct StridedRows {
  const T* base;
  int64_t stride;
  const T* operator[](int64_t t) const { return base + t * stride; }
};
template <typename T>
struct GatheredRows {
  const T* const* rows;
  int64_t offset;  // elements from each listed row to the head read
  const T* operator[](int64_t t) const { return rows[t] + offset; }
};

// Rows [0, R) of q against the tile's n keys (keys[t]: key t's row): partial[r * kTile + t] holds
// the lane-wise products of row r and key t (zero for t >= n), to be summed by transpose_sum. The
// R x C query vectors stay in registers while each key row is loaded once.
template <int C, int R, typename Rows>
inline void tile_scores(const float* q, int64_t q_stride, Rows keys, int64_t n, vfloat* partial) {
  vfloat qr[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) qr[r][c] = load(q + r * q_stride + c * kLanes);
  for (int64_t t = 0; t < n; ++t) {
    vfloat k[C];
    for (int c = 0; c < C; ++c) k[c] = load_float(keys[t] + c * kLanes);
    for (int r = 0; r < R; ++r) {
      vfloat even = qr[r][0] * k[0], odd{};  // two chains halve the FMA latency
      for (int c = 1; c < C; ++c) {
        if (c % 2) odd += qr[r][c] * k[c]; else even += qr[r][c] * k[c];
      }
      partial[r * kTile + t] = even + odd;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t t = n; t < kTile; ++t) partial[r * kTile + t] = vfloat{};
}

// acc[r] = acc[r] * alpha[r] + sum_t probs[r][t] * values[t] for rows [0, R), the R x C
// accumulators in registers while each value row is loaded once.
template <int C, int R, typename Rows>
inline void tile_values(float* acc, int64_t acc_stride, const float* alpha, const float* probs, Rows values,
                        int64_t n) {
  vfloat a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = load(acc + r * acc_stride + c * kLanes) * alpha[r];
  for (int64_t t = 0; t < n; ++t) {
    vfloat v[C];
    for (int c = 0; c < C; ++c) v[c] = load_float(values[t] + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const vfloat p = splat(probs[r * kTile + t]);
      for (int c = 0; c < C; ++c) a[r][c] += p * v[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(acc + r * acc_stride + c * kLanes, a[r][c]);
}
// tile_scores / tile_values for the first n <= R rows, n known only at run time: the rows of
// a GQA group (3 for 9 query heads over 3 KV heads) share each key and value load.
template <int C, int R, typename Rows>
inline void tile_scores_rows(int64_t n_rows, const float* q, int64_t q_stride, Rows keys, int64_t n, vfloat* partial) {
  if constexpr (R > 1) {
    if (n_rows < R) return tile_scores_rows<C, R - 1>(n_rows, q, q_stride, keys, n, partial);
  }
  tile_scores<C, R>(q, q_stride, keys, n, partial);
}

#if defined(__AVX512BF16__)
// tile_scores for bf16 queries and keys with AVX512_BF16's dot product: 32 bf16 pairs per
// instruction into 16 fp32 lanes (each product exact, fp32 sums), half the instructions of
// widening to fp32 and FMAs, and no widening. The query rows are unscaled: softmax_step scales.
constexpr bool kBf16DotProducts = true;
template <int C, int R, typename Rows>
inline void tile_scores_bf16(const c10::BFloat16* q, int64_t q_stride, Rows keys, int64_t n, vfloat* partial) {
  static_assert(C % 2 == 0, "a row of whole 32-element bf16 vectors");
  constexpr int P = C / 2;
  __m512bh qr[R][P];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < P; ++c) qr[r][c] = (__m512bh)_mm512_loadu_si512(q + r * q_stride + c * 2 * kLanes);
  for (int64_t t = 0; t < n; ++t) {
    __m512bh k[P];
    for (int c = 0; c < P; ++c) k[c] = (__m512bh)_mm512_loadu_si512(keys[t] + c * 2 * kLanes);
    for (int r = 0; r < R; ++r) {
      __m512 even = _mm512_dpbf16_ps(_mm512_setzero_ps(), qr[r][0], k[0]), odd = _mm512_setzero_ps();
      for (int c = 1; c < P; ++c) {
        if (c % 2) odd = _mm512_dpbf16_ps(odd, qr[r][c], k[c]); else even = _mm512_dpbf16_ps(even, qr[r][c], k[c]);
      }
      partial[r * kTile + t] = (vfloat)_mm512_add_ps(even, odd);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t t = n; t < kTile; ++t) partial[r * kTile + t] = vfloat{};
}

template <int C, int R, typename Rows>
inline void tile_scores_bf16_rows(int64_t n_rows, const c10::BFloat16* q, int64_t q_stride, Rows keys, int64_t n,
                                  vfloat* partial) {
  if constexpr (R > 1) {
    if (n_rows < R) return tile_scores_bf16_rows<C, R - 1>(n_rows, q, q_stride, keys, n, partial);
  }
  tile_scores_bf16<C, R>(q, q_stride, keys, n, partial);
}
#else
constexpr bool kBf16DotProducts = false;
#endif

template <int C, int R, typename Rows>
inline void tile_values_rows(int64_t n_rows, float* acc, int64_t acc_stride, const float* alpha, const float* probs,
                             Rows values, int64_t n) {
  if constexpr (R > 1) {
    if (n_rows < R) return tile_values_rows<C, R - 1>(n_rows, acc, acc_stride, alpha, probs, values, n);
  }
  tile_values<C, R>(acc, acc_stride, alpha, probs, values, n);
}


// The online-softmax step of one row over one tile: the first `visible` keys count, the others
// get probability 0. Leaves the tile's probabilities and the factor that rescales the
// accumulator (alpha) for tile_values.
inline void softmax_step(vfloat* partial, int64_t visible, float& row_max, float& row_sum, float& alpha,
                         float* probs, float score_scale) {
  if (visible <= 0) {  // the whole tile lies after this row's position
    store(probs, vfloat{});
    alpha = 1.0f;
    return;
  }
  vfloat lane_index;
  for (int i = 0; i < kLanes; ++i) lane_index[i] = float(i);
  const vint masked = lane_index >= float(visible);
  vfloat scores = transpose_sum(partial) * score_scale;
  scores = masked ? splat(-std::numeric_limits<float>::infinity()) : scores;
  const float new_max = std::max(row_max, hmax(scores));
  vfloat p = exp2v(scores - new_max);
  p = masked ? vfloat{} : p;
  store(probs, p);
  alpha = new_max > row_max ? exp2v(splat(row_max - new_max))[0] : 1.0f;
  row_max = new_max;
  row_sum = row_sum * alpha + hsum(p);
}

// Up to kTile consecutive keys of one KV head. Inside one block (the common case) their rows are
// evenly spaced from keys[0] / values[0]; a tile that spans blocks lists every row.
template <typename scalar_t>
struct KeyTile {
  const scalar_t* keys[kTile];
  const scalar_t* values[kTile];
  int64_t n;
  bool one_block;
};

// Row t of the tile's keys and of its values.
template <typename scalar_t>
inline const scalar_t* key_row(const KeyTile<scalar_t>& tile, const Views<scalar_t>& v, int64_t t) {
  return tile.one_block ? tile.keys[0] + t * v.k_token_stride : tile.keys[t];
}
template <typename scalar_t>
inline const scalar_t* value_row(const KeyTile<scalar_t>& tile, const Views<scalar_t>& v, int64_t t) {
  return tile.one_block ? tile.values[0] + t * v.v_token_stride : tile.values[t];
}

// Keys [0, end) are what the item reads: up to its last new token's position.
inline int64_t item_end_key(const Item& item, const Batch& b) {
  const int64_t q_len = b.query_start_loc[item.seq + 1] - b.query_start_loc[item.seq];
  return b.seq_lens[item.seq] - q_len + item.first_token + item.num_tokens;
}

// The item's keys [key0, key0 + n) of its first KV head, n = min(kTile, end_key - key0), through
// the block table (kPaged) or the sequence's slot (kContiguous).
template <typename scalar_t, Layout L>
void tile_at(const Item& item, const Batch& b, const Views<scalar_t>& v, int64_t end_key, int64_t key0,
             KeyTile<scalar_t>& tile) {
  const int32_t* table = b.block_tables + int64_t(item.seq) * b.table_stride;
  tile.n = std::min<int64_t>(kTile, end_key - key0);
  if constexpr (L == Layout::kContiguous) {
    tile.keys[0] = v.key_cache + table[0] * v.k_block_stride + key0 * v.k_token_stride + item.kv_head * v.k_head_stride;
    tile.values[0] = v.value_cache + table[0] * v.v_block_stride + key0 * v.v_token_stride + item.kv_head * v.v_head_stride;
    tile.one_block = true;
    return;
  }
  int64_t offset = key0 % b.block_size;
  auto block_rows = [&](int64_t block, int64_t row) {
    tile.keys[row] = v.key_cache + block * v.k_block_stride + offset * v.k_token_stride + item.kv_head * v.k_head_stride;
    tile.values[row] = v.value_cache + block * v.v_block_stride + offset * v.v_token_stride + item.kv_head * v.v_head_stride;
  };
  block_rows(table[key0 / b.block_size], 0);
  tile.one_block = offset + tile.n <= b.block_size;
  if (tile.one_block) return;
  for (int64_t t = 1; t < tile.n; ++t) {
    if (++offset == b.block_size) {
      offset = 0;
      block_rows(table[(key0 + t) / b.block_size], t);
    } else {
      tile.keys[t] = tile.keys[t - 1] + v.k_token_stride;
      tile.values[t] = tile.values[t - 1] + v.v_token_stride;
    }
  }
}

// Requests every K and V row of the tile into the caches: `span` elements from each row's start
// (the item's heads of one token).
template <typename scalar_t>
inline void prefetch_rows(const KeyTile<scalar_t>& tile, const Views<scalar_t>& v, int64_t span) {
  for (int64_t t = 0; t < tile.n; ++t) {
    const char* k = reinterpret_cast<const char*>(key_row(tile, v, t));
    const char* val = reinterpret_cast<const char*>(value_row(tile, v, t));
    for (int64_t line = 0; line < span * int64_t(sizeof(scalar_t)); line += 64) {
      __builtin_prefetch(k + line, 0, 2);
      __builtin_prefetch(val + line, 0, 2);
    }
  }
}

// Requests the rows of the item's first kPrefetchTiles tiles: called for the next item while
// one runs, so an item (a decode row reads only a few tiles) does not start on a cache miss.
template <typename scalar_t, Layout L>
void prefetch_item_start(const Item& item, const Batch& b, const Views<scalar_t>& v) {
  const int64_t end_key = item_end_key(item, b);
  const int64_t span = (item.num_kv_heads - 1) * v.k_head_stride + b.head_dim;
  KeyTile<scalar_t> tile;
  for (int64_t key0 = 0; key0 < std::min(end_key, kPrefetchTiles * kTile); key0 += tile.n) {
    tile_at<scalar_t, L>(item, b, v, end_key, key0, tile);
    prefetch_rows(tile, v, span);
  }
}

template <typename scalar_t, int C, Layout L>
void attend(const Item& item, const Batch& b, const Views<scalar_t>& v, Scratch& s) {
  constexpr int R = C >= 16 ? 1 : 16 / C;  // rows per register block
  constexpr int64_t pdim = C * kLanes;
  const int64_t dim = b.head_dim;
  // Rows are head-major: KV head kv_head + h owns rows [h * head_rows, (h + 1) * head_rows),
  // token-major inside (row r of a head: new token r / group, query head r % group of the group).
  const int64_t head_rows = int64_t(item.num_tokens) * b.group;
  const int64_t rows = head_rows * item.num_kv_heads;
  const int64_t q_start = b.query_start_loc[item.seq];
  const int64_t end_key = item_end_key(item, b);
  const int64_t first_pos = end_key - item.num_tokens;  // position of the item's first token
  // Rows whose length is a whole number of vectors are read in place (widened in registers);
  // others are converted into zero-padded fp32 scratch.
  const bool in_place = dim == pdim;
  // bf16 rows of whole 32-element vectors take AVX512_BF16 dot products for the scores.
  constexpr bool bf16_dots = kBf16DotProducts && std::is_same_v<scalar_t, c10::BFloat16> && C % 2 == 0;
  const bool dot_in_bf16 = bf16_dots && in_place;
  const float score_scale = dot_in_bf16 ? b.scale_log2 : 1.0f;

  auto token_and_head = [&](int64_t r) {
    const int64_t local = r % head_rows;
    return std::pair<int64_t, int64_t>(q_start + item.first_token + local / b.group,
                                       (item.kv_head + r / head_rows) * b.group + local % b.group);
  };
  for (int64_t r = 0; r < rows; ++r) {
    const auto [token, head] = token_and_head(r);
    const scalar_t* src = v.query + token * v.q_token_stride + head * v.q_head_stride;
    float* dst = s.q.data() + r * pdim;
    if (dot_in_bf16) {
      std::memcpy(s.q_bf16.data() + r * pdim, src, dim * sizeof(scalar_t));
    } else if (in_place) {
      for (int c = 0; c < C; ++c) store(dst + c * kLanes, load_float(src + c * kLanes) * b.scale_log2);
    } else {
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]) * b.scale_log2;
      std::fill(dst + dim, dst + pdim, 0.0f);
    }
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * pdim, 0.0f);
  std::fill(s.row_max.begin(), s.row_max.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.row_sum.begin(), s.row_sum.begin() + rows, 0.0f);

  // Ask for the rows of the tile kPrefetchTiles ahead now, into L2 (a tile of all heads can be
  // 12 KiB: several would crowd L1). The block table hides their address from the hardware
  // prefetcher; and where rows are linear (kContiguous), leaving them to it measured 20-25% slower
  // decode than this on a Xeon (Emerald Rapids, bench/attention_layouts.py). The first tiles were
  // asked for while the previous item ran (prefetch_item_start).
  const int64_t span = (item.num_kv_heads - 1) * v.k_head_stride + dim;  // one token's rows of the item
  KeyTile<scalar_t> tile;
  for (int64_t key0 = 0; key0 < end_key; key0 += tile.n) {
    if (key0 + kPrefetchTiles * kTile < end_key) {
      tile_at<scalar_t, L>(item, b, v, end_key, key0 + kPrefetchTiles * kTile, tile);
      prefetch_rows(tile, v, span);
    }
    tile_at<scalar_t, L>(item, b, v, end_key, key0, tile);
    for (int64_t h = 0; h < item.num_kv_heads; ++h) {
      const int64_t k_off = h * v.k_head_stride, v_off = h * v.v_head_stride;
      const StridedRows<float> scratch_keys{s.keys.data(), pdim}, scratch_values{s.values.data(), pdim};
      const StridedRows<scalar_t> strided_keys{tile.keys[0] + k_off, v.k_token_stride},
          strided_values{tile.values[0] + v_off, v.v_token_stride};
      const GatheredRows<scalar_t> gathered_keys{tile.keys, k_off}, gathered_values{tile.values, v_off};
      if (!in_place) {
        for (int64_t t = 0; t < tile.n; ++t) {
          to_float(key_row(tile, v, t) + k_off, s.keys.data() + t * pdim, dim);
          to_float(value_row(tile, v, t) + v_off, s.values.data() + t * pdim, dim);
        }
      }
      for (int64_t r0 = h * head_rows; r0 < (h + 1) * head_rows;) {
        const int64_t block_rows = std::min<int64_t>(R, (h + 1) * head_rows - r0);
        // Rows are token-major within a head, so the block's last row sees the most keys.
        if (first_pos + (r0 + block_rows - 1 - h * head_rows) / b.group + 1 - key0 <= 0) {
          r0 += block_rows;
          continue;
        }
        float* q = s.q.data() + r0 * pdim;
        vfloat* partial = s.partial.data() + r0 * kTile;
        if (dot_in_bf16) {  // only where kBf16DotProducts, so the block below was compiled
#if defined(__AVX512BF16__)
          if constexpr (bf16_dots) {
            const c10::BFloat16* q16 = s.q_bf16.data() + r0 * pdim;
            if (tile.one_block) {
              tile_scores_bf16_rows<C, R>(block_rows, q16, pdim, strided_keys, tile.n, partial);
            } else {
              tile_scores_bf16_rows<C, R>(block_rows, q16, pdim, gathered_keys, tile.n, partial);
            }
          }
#endif
        } else if (!in_place) {
          tile_scores_rows<C, R>(block_rows, q, pdim, scratch_keys, tile.n, partial);
        } else if (tile.one_block) {
          tile_scores_rows<C, R>(block_rows, q, pdim, strided_keys, tile.n, partial);
        } else {
          tile_scores_rows<C, R>(block_rows, q, pdim, gathered_keys, tile.n, partial);
        }
        for (int64_t r = r0; r < r0 + block_rows; ++r) {
          const int64_t visible = std::min<int64_t>(tile.n, first_pos + (r - h * head_rows) / b.group + 1 - key0);
          softmax_step(s.partial.data() + r * kTile, visible, s.row_max[r], s.row_sum[r], s.alpha[r],
                       s.probs.data() + r * kTile, score_scale);
        }
        float* acc = s.acc.data() + r0 * pdim;
        const float* alpha = s.alpha.data() + r0;
        const float* probs = s.probs.data() + r0 * kTile;
        if (!in_place) {
          tile_values_rows<C, R>(block_rows, acc, pdim, alpha, probs, scratch_values, tile.n);
        } else if (tile.one_block) {
          tile_values_rows<C, R>(block_rows, acc, pdim, alpha, probs, strided_values, tile.n);
        } else {
          tile_values_rows<C, R>(block_rows, acc, pdim, alpha, probs, gathered_values, tile.n);
        }
        r0 += block_rows;
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const auto [token, head] = token_and_head(r);
    scalar_t* dst = v.out + token * v.o_token_stride + head * v.o_head_stride;
    const float inv = 1.0f / s.row_sum[r];
    const float* acc = s.acc.data() + r * pdim;
    if (in_place) {  // store_float rounds as static_cast does
      for (int c = 0; c < C; ++c) store_float(dst + c * kLanes, load(acc + c * kLanes) * inv);
    } else {
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inv);
    }
  }
}

// Splits the batch into items, largest first, after checking what a kernel must trust.
// num_blocks: blocks (kPaged) or slots (kContiguous) in the cache.
template <Layout L>
std::vector<Item> plan_items(const Batch& b, int64_t num_seqs, int64_t num_tokens, int64_t max_blocks,
                             int64_t num_blocks) {
  std::vector<Item> items;
  const int64_t tokens_per_item = std::max<int64_t>(1, kMaxItemRows / b.group);
  int64_t num_decode_seqs = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    num_decode_seqs += b.query_start_loc[seq + 1] - b.query_start_loc[seq] == 1;
  }
  const bool whole_sequence_items = num_decode_seqs >= kWholeSequenceItemsPerThread * at::get_num_threads();
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t start = b.query_start_loc[seq], end = b.query_start_loc[seq + 1];
    const int64_t kv_len = b.seq_lens[seq];
    TORCH_CHECK_VALUE(0 <= start && start <= end && end <= num_tokens,
                      "query_start_loc must be non-decreasing within [0, num_tokens]");
    TORCH_CHECK_VALUE(end - start <= kv_len, "sequence ", seq, " has more new tokens (", end - start,
                      ") than its seq_len (", kv_len, ")");
    if constexpr (L == Layout::kContiguous) {
      TORCH_CHECK_VALUE(kv_len <= b.block_size, "sequence ", seq, " has seq_len ", kv_len,
                        " beyond its slot (max_model_len ", b.block_size, ")");
    } else {
      TORCH_CHECK_VALUE(kv_len <= max_blocks * b.block_size, "sequence ", seq, " has seq_len ", kv_len,
                        " beyond its block table (", max_blocks, " blocks of ", b.block_size, ")");
    }
    if (end == start) continue;
    // The blocks it reads must exist: a bad id would read outside the cache.
    const int32_t* table = b.block_tables + seq * b.table_stride;
    if constexpr (L == Layout::kContiguous) {
      TORCH_CHECK_INDEX(0 <= table[0] && table[0] < num_blocks, "sequence ", seq, " reads slot ", table[0],
                        " outside the cache (", num_blocks, " slots)");
    } else {
      for (int64_t i = 0; i < (kv_len + b.block_size - 1) / b.block_size; ++i) {
        TORCH_CHECK_INDEX(0 <= table[i] && table[i] < num_blocks, "sequence ", seq, " reads block ", table[i],
                          " outside the cache (", num_blocks, " blocks)");
      }
    }
    if (whole_sequence_items && end - start == 1) {
      items.push_back({int32_t(seq), 0, int32_t(b.num_kv_heads), 0, 1, b.num_heads * kv_len});
      continue;
    }
    for (int64_t first = 0; first < end - start; first += tokens_per_item) {
      const int64_t count = std::min(tokens_per_item, end - start - first);
      const int64_t keys = kv_len - (end - start) + first + count;
      for (int64_t h = 0; h < b.num_kv_heads; ++h) {
        items.push_back({int32_t(seq), int32_t(h), 1, int32_t(first), int32_t(count), count * b.group * keys});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

// Below this many (row x key) products a step runs on the calling thread: waking the pool costs more.
constexpr int64_t kSerialCost = 4096;

// Vectors per head row that a kernel is compiled for; a head_dim is padded up to the next one.
constexpr int kChunkSizes[] = {4, 5, 6, 8, 16};  // head_dim 64, 80, 96, 128, 256
constexpr int64_t kMaxHeadDim = 16 * kLanes;

template <typename scalar_t, int C, Layout L>
void run_items(const std::vector<Item>& items, const Batch& b, const Views<scalar_t>& v) {
  int64_t total = 0;
  for (const Item& item : items) total += item.cost;
  const int64_t max_rows = std::max<int64_t>(kMaxItemRows, b.num_heads);
  std::atomic<int64_t> next{0};
  auto drain = [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    scratch.fit(max_rows, C * kLanes, b.head_dim);
    const int64_t count = int64_t(items.size());
    // The next item is claimed before this one runs, so its first rows can be on their way.
    for (int64_t i = next.fetch_add(1), following; i < count; i = following) {
      following = next.fetch_add(1);
      if (following < count) prefetch_item_start<scalar_t, L>(items[following], b, v);
      attend<scalar_t, C, L>(items[i], b, v, scratch);
    }
  };
  if (total < kSerialCost || at::get_num_threads() == 1) {
    drain(0, 1);
  } else {
    at::parallel_for(0, at::get_num_threads(), 1, drain);
  }
}

template <typename scalar_t, Layout L>
void run_items(const std::vector<Item>& items, const Batch& b, const Views<scalar_t>& v) {
  switch (b.padded_dim / kLanes) {
    case 4: return run_items<scalar_t, 4, L>(items, b, v);
    case 5: return run_items<scalar_t, 5, L>(items, b, v);
    case 6: return run_items<scalar_t, 6, L>(items, b, v);
    case 8: return run_items<scalar_t, 8, L>(items, b, v);
    default: return run_items<scalar_t, 16, L>(items, b, v);
  }
}

// Both layouts: block_tables is [num_seqs, max_blocks] (kPaged) or [num_seqs, 1] slot ids (kContiguous).
template <Layout L>
at::Tensor attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     const at::Tensor& query_start_loc, double scale) {
  TORCH_CHECK_VALUE(query.dim() == 3, "query must be [num_tokens, num_heads, head_dim]");
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
                    "caches must both be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(query.scalar_type() == key_cache.scalar_type() && value_cache.scalar_type() == key_cache.scalar_type(),
                    "query and caches must share a dtype");
  TORCH_CHECK_VALUE(query.size(2) == key_cache.size(3), "query and cache head_dim differ");
  TORCH_CHECK_VALUE(query.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
                    "head_dim must be the contiguous dimension of query and caches");
  for (const at::Tensor* t : {&block_tables, &seq_lens, &query_start_loc}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->is_contiguous(), "index tensors must be contiguous int32");
  }
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                    "num_heads (", num_heads, ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK_VALUE(query_start_loc.size(0) == num_seqs + 1 && block_tables.dim() == 2 && block_tables.size(0) == num_seqs,
                    L == Layout::kPaged ? "block_tables, seq_lens and query_start_loc disagree on the number of sequences"
                                        : "seq_slots, seq_lens and query_start_loc disagree on the number of sequences");

  at::Tensor out = at::empty(query.sizes(), query.options());
  if (num_seqs == 0 || query.size(0) == 0) return out;

  Batch b;
  b.num_heads = num_heads;
  b.num_kv_heads = num_kv_heads;
  b.group = num_heads / num_kv_heads;
  b.head_dim = query.size(2);
  TORCH_CHECK_VALUE(b.head_dim <= kMaxHeadDim, "head_dim ", b.head_dim, " is above ", kMaxHeadDim);
  for (int chunks : kChunkSizes) {
    if (chunks * kLanes >= b.head_dim) {
      b.padded_dim = chunks * kLanes;
      break;
    }
  }
  b.block_size = key_cache.size(1);
  b.scale_log2 = float(scale * 1.4426950408889634);
  b.block_tables = block_tables.data_ptr<int32_t>();
  b.table_stride = block_tables.size(1);
  b.seq_lens = seq_lens.data_ptr<int32_t>();
  b.query_start_loc = query_start_loc.data_ptr<int32_t>();
  const std::vector<Item> items = plan_items<L>(b, num_seqs, query.size(0), block_tables.size(1), key_cache.size(0));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_cpu", [&] {
    Views<scalar_t> v;
    v.query = query.data_ptr<scalar_t>();
    v.q_token_stride = query.stride(0);
    v.q_head_stride = query.stride(1);
    v.key_cache = key_cache.data_ptr<scalar_t>();
    v.value_cache = value_cache.data_ptr<scalar_t>();
    v.k_block_stride = key_cache.stride(0);
    v.k_token_stride = key_cache.stride(1);
    v.k_head_stride = key_cache.stride(2);
    v.v_block_stride = value_cache.stride(0);
    v.v_token_stride = value_cache.stride(1);
    v.v_head_stride = value_cache.stride(2);
    v.out = out.data_ptr<scalar_t>();
    v.o_token_stride = out.stride(0);
    v.o_head_stride = out.stride(1);
    run_items<scalar_t, L>(items, b, v);
  });
  return out;
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  return attention<Layout::kPaged>(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale);
}

// key_cache / value_cache [num_slots, max_model_len, num_kv_heads, head_dim] (any slot stride);
// seq_slots [num_seqs]: the slot holding each sequence's keys 0..seq_len-1.
at::Tensor contiguous_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& seq_slots, const at::Tensor& seq_lens,
                                const at::Tensor& query_start_loc, double scale) {
  TORCH_CHECK_VALUE(seq_slots.dim() == 1, "seq_slots must be [num_seqs]");
  return attention<Layout::kContiguous>(query, key_cache, value_cache, seq_slots.view({-1, 1}), seq_lens,
                                        query_start_loc, scale);
}

// Copies each token's K and V rows into its slot; slot -1 (or any negative slot) is skipped.
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(key.dim() == 3 && value.sizes() == key.sizes(), "key and value must be [num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
                    "caches must both be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3),
                    "key rows do not match the cache's [num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type() &&
                    value_cache.scalar_type() == key_cache.scalar_type(), "key, value and caches must share a dtype");
  TORCH_CHECK_VALUE(key.stride(2) == 1 && value.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
                    "head_dim must be the contiguous dimension");
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), "slot_mapping must be [num_tokens]");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1);
  const int64_t block_size = key_cache.size(1), num_slots = key_cache.size(0) * block_size;
  const int64_t row_bytes = key.size(2) * key.element_size();
  for (int64_t i = 0; i < num_tokens; ++i) {
    TORCH_CHECK_INDEX(slot[i] < num_slots, "slot ", slot[i], " is outside the cache (", num_slots, " slots)");
  }
  auto* k_src = static_cast<const char*>(key.data_ptr());
  auto* v_src = static_cast<const char*>(value.data_ptr());
  auto* k_dst = static_cast<char*>(key_cache.data_ptr());
  auto* v_dst = static_cast<char*>(value_cache.data_ptr());
  const int64_t esize = key.element_size();
  // Copies are small (a decode step moves a few hundred KiB): more than one thread rarely pays.
  at::parallel_for(0, num_tokens, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slot[i] < 0) continue;
      const int64_t block = slot[i] / block_size, offset = slot[i] % block_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::memcpy(k_dst + (block * key_cache.stride(0) + offset * key_cache.stride(1) + h * key_cache.stride(2)) * esize,
                    k_src + (i * key.stride(0) + h * key.stride(1)) * esize, row_bytes);
        std::memcpy(v_dst + (block * value_cache.stride(0) + offset * value_cache.stride(1) + h * value_cache.stride(2)) * esize,
                    v_src + (i * value.stride(0) + h * value.stride(1)) * esize, row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(paged_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, float scale) -> Tensor");
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> ()");
  m.def("contiguous_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor seq_slots, "
        "Tensor seq_lens, Tensor query_start_loc, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(paged_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv_cache", &write_kv_cache);
  m.impl("contiguous_attention", &contiguous_attention);
}

// Shapes only, for tracing (meta and fake tensors, torch.compile): the ops stay opaque calls.
TORCH_LIBRARY_IMPL(paged_cpu, Meta, m) {
  m.impl("paged_attention", [](const at::Tensor& query, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, double) {
    return at::empty(query.sizes(), query.options());
  });
  m.impl("write_kv_cache", [](const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) {});
  m.impl("contiguous_attention", [](const at::Tensor& query, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, double) {
    return at::empty(query.sizes(), query.options());
  });
}
