// CPU kernels of the what-where attention family (the math is in whatwhere.h).
//
// One task per head (b, h): its logits tile [N, S] and its probability tiles (S is small: a WWT's slots, 16 by
// default, so a tile is N * S * 4 = 12.5 KB at N = 196) stay in cache through the logits product, both
// softmaxes and both aggregations, in the forward as in the backward; nothing of size [N, S] is written to
// memory except the logits (and, in the backward, the gradient of where), which are outputs.
//
// Heads are independent, every output element has one writer and every sum runs in a fixed order: no atomics,
// and the same result whatever the number of threads. The tile loops put a contiguous dimension (S, dh or dv)
// innermost with no reduction along it, so the compiler vectorises them without reordering any sum,
// exponentials included (exp_opmath); the reductions along the rows (the softmax over slots) run over all rows at
// once, each row's in order (reduce_rows). Each head's worker is cloned for AVX-512, AVX2 and the baseline ISA
// (VISIONMOE_CPU_CLONES).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/vectorized_math.h"
#include "whatwhere/whatwhere.h"

namespace visionmoe::whatwhere::cpu {
namespace {

using vectorized_math::exp_opmath;
using vectorized_math::log_opmath;

// The opmath values of n inputs: the inputs themselves when they are opmath already, else a copy in `buffer`.
template <typename T, typename scalar_t>
VISIONMOE_ALWAYS_INLINE const T* in_opmath(const scalar_t* x, int64_t n, T* buffer) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<T>(x[i]);
    return buffer;
  }
}

// Brings the next head's large inputs and outputs into cache while this head computes, a few 64-byte lines at a
// time: the products call `advance()` once per block of rows, and each call requests the next share of the lines.
// A head reads each input in several products, not in one stream the hardware prefetcher would follow; and requesting
// all of a head's lines in one burst stalls on the few outstanding misses a core can have (software prefetches
// wait for a free fill buffer), so the requests are spread over the head's arithmetic instead. The share per
// call is learned from the number of calls the previous head made.
class Prefetcher {
 public:
  // Heads [.., end) are this worker's: there is nothing to prefetch beyond the last one.
  explicit Prefetcher(int64_t end) : end_head_(end) {}

  // Starts on head `head`'s part of each range (base pointer, elements per head; null: absent), given in the order
  // the head uses them, after requesting whatever the previous head's ranges still had unrequested; past the
  // worker's last head, on nothing. Ranges of mutable elements are outputs, requested for writing, so that the
  // head's stores to them find their lines already held instead of waiting on each line's read-for-ownership.
  template <typename... Ranges>
  void start(int64_t head, const Ranges&... ranges) {
    static_assert(sizeof...(Ranges) <= kMaxRanges, "more ranges than the prefetcher holds");
    request(std::numeric_limits<int64_t>::max());
    if (calls_ > 0) calls_per_head_ = calls_;
    calls_ = 0;
    count_ = 0;
    current_ = 0;
    if (head >= end_head_) return;
    int64_t lines = 0;
    (add(ranges.first, head, ranges.second, lines), ...);
    lines_per_call_ = std::max<int64_t>(1, (lines + calls_per_head_ - 1) / calls_per_head_);
  }

  void advance() {
    ++calls_;
    request(lines_per_call_);
  }

 private:
  static constexpr int kMaxRanges = 12;
  static constexpr int64_t kLine = 64;

  template <typename T>
  void add(T* base, int64_t head, int64_t n, int64_t& lines) {
    if (base == nullptr || n <= 0) return;
    next_[count_] = reinterpret_cast<const char*>(base + head * n);
    end_[count_] = next_[count_] + n * static_cast<int64_t>(sizeof(T));
    for_writing_[count_] = !std::is_const_v<T>;
    lines += (end_[count_] - next_[count_] + kLine - 1) / kLine;
    ++count_;
  }

  void request(int64_t lines) {
    for (; current_ < count_ && lines > 0; ++current_) {
      for (; next_[current_] < end_[current_] && lines > 0; next_[current_] += kLine, --lines) {
        if (for_writing_[current_]) {
          __builtin_prefetch(next_[current_], 1, 2);
        } else {
          __builtin_prefetch(next_[current_], 0, 2);
        }
      }
      if (next_[current_] < end_[current_]) return;
    }
  }

  const int64_t end_head_;
  const char* next_[kMaxRanges] = {};
  const char* end_[kMaxRanges] = {};
  bool for_writing_[kMaxRanges] = {};
  int count_ = 0;
  int current_ = 0;
  int64_t calls_ = 0;
  int64_t calls_per_head_ = 64;  // a guess for the first head
  int64_t lines_per_call_ = 1;
};

// One block of a small matrix product: out[i][j] = scale * sum_k a[i * a_row + k * a_column] * b[k * ldb + j] for
// i < R and j < V * C, every sum running over k in order. The V * C columns are V GCC vectors of C elements
// (C = 16 floats: one AVX-512 register), so the R * V accumulators stay in registers: each k costs V loads of
// b's row, R broadcasts of a and R * V multiply-adds. R * V independent accumulators (up to 16) keep both FMA
// pipes busy through their latency, and V > 1 reuses each broadcast of a for several vectors.
template <int R, int V, int C, typename T, typename out_t>
VISIONMOE_ALWAYS_INLINE void product_block(int64_t K, const T* __restrict__ a, int64_t a_row, int64_t a_column,
                                           const T* __restrict__ b, int64_t ldb, T scale, out_t* __restrict__ out,
                                           int64_t ldc) {
  typedef T Columns __attribute__((vector_size(C * sizeof(T))));
  // The same vector, read from an address aligned for T only: a plain load that keeps b's row in registers
  // (a memcpy into an array of vectors goes through the stack).
  typedef T UnalignedColumns __attribute__((vector_size(C * sizeof(T)), aligned(sizeof(T))));
  Columns accumulator[R][V] = {};
  for (int64_t k = 0; k < K; ++k) {
    Columns b_row[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b_row[v] = *reinterpret_cast<const UnalignedColumns*>(b + k * ldb + v * C);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const T a_ik = a[i * a_row + k * a_column];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) accumulator[i][v] += a_ik * b_row[v];
    }
  }
  if (scale != T(1)) {
    for (int i = 0; i < R; ++i) {
      for (int v = 0; v < V; ++v) accumulator[i][v] *= scale;
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < V; ++v) {
      const Columns& result = accumulator[i][v];
      if constexpr (std::is_same_v<T, out_t>) {
        std::memcpy(out + i * ldc + v * C, &result, sizeof(Columns));
      } else {
        for (int j = 0; j < C; ++j) out[i * ldc + v * C + j] = static_cast<out_t>(result[j]);
      }
    }
  }
}

// The last columns of a product, fewer than a vector's worth, one at a time.
template <int R, typename T, typename out_t>
VISIONMOE_ALWAYS_INLINE void product_column(int64_t K, const T* __restrict__ a, int64_t a_row, int64_t a_column,
                                            const T* __restrict__ b, int64_t ldb, T scale, out_t* __restrict__ out,
                                            int64_t ldc) {
  T accumulator[R] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int i = 0; i < R; ++i) accumulator[i] += a[i * a_row + k * a_column] * b[k * ldb];
  }
  for (int i = 0; i < R; ++i) out[i * ldc] = static_cast<out_t>(scale * accumulator[i]);
}

// R rows of a product, in blocks of at most kMaxVectors vectors of 16 columns.
template <int R, int kMaxVectors, typename T, typename out_t>
VISIONMOE_ALWAYS_INLINE void product_rows(int64_t columns, int64_t K, const T* a, int64_t a_row, int64_t a_column,
                                          const T* b, int64_t ldb, T scale, out_t* out, int64_t ldc) {
  int64_t j = 0;
  if constexpr (kMaxVectors >= 4) {
    for (; j + 64 <= columns; j += 64) {
      product_block<R, 4, 16>(K, a, a_row, a_column, b + j, ldb, scale, out + j, ldc);
    }
  }
  if constexpr (kMaxVectors >= 2) {
    for (; j + 32 <= columns; j += 32) {
      product_block<R, 2, 16>(K, a, a_row, a_column, b + j, ldb, scale, out + j, ldc);
    }
  }
  for (; j + 16 <= columns; j += 16) product_block<R, 1, 16>(K, a, a_row, a_column, b + j, ldb, scale, out + j, ldc);
  for (; j + 8 <= columns; j += 8) product_block<R, 1, 8>(K, a, a_row, a_column, b + j, ldb, scale, out + j, ldc);
  for (; j < columns; ++j) product_column<R>(K, a, a_row, a_column, b + j, ldb, scale, out + j, ldc);
}

// out [rows, columns] (row stride ldc) = scale * A B, where A [rows, K] is read as a[i * a_row + k * a_column]
// (so a transposed A costs nothing) and B [K, columns] is row-major with row stride ldb. Narrow products (a
// single vector of columns, such as the [N, S] logit-shaped ones) take 8 rows at a time, wide ones 4 rows of up
// to 4 vectors, so that either has 8 to 16 independent accumulators. `prefetcher` advances once per block of rows.
template <typename T, typename out_t>
VISIONMOE_ALWAYS_INLINE void product(int64_t rows, int64_t columns, int64_t K, const T* a, int64_t a_row,
                                     int64_t a_column, const T* b, int64_t ldb, T scale, out_t* out, int64_t ldc,
                                     Prefetcher& prefetcher) {
  int64_t i = 0;
  if (columns < 32) {
    for (; i + 8 <= rows; i += 8) {
      product_rows<8, 1>(columns, K, a + i * a_row, a_row, a_column, b, ldb, scale, out + i * ldc, ldc);
      prefetcher.advance();
    }
  }
  for (; i + 4 <= rows; i += 4) {
    product_rows<4, 4>(columns, K, a + i * a_row, a_row, a_column, b, ldb, scale, out + i * ldc, ldc);
    prefetcher.advance();
  }
  for (; i < rows; ++i) {
    product_rows<1, 4>(columns, K, a + i * a_row, a_row, a_column, b, ldb, scale, out + i * ldc, ldc);
  }
}

// out [columns, rows] = x^T for x [rows, columns].
template <typename T>
VISIONMOE_ALWAYS_INLINE void transpose(const T* __restrict__ x, int64_t rows, int64_t columns, T* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) out[c * rows + r] = x[r * columns + c];
  }
}

// out[n] = combine(...combine(combine(value(n * S), value(n * S + 1)), ...), value(n * S + S - 1)) for each of N
// rows: a reduction along each row of an [N, S] tile, in order. Eight rows at a time, each in its own scalar
// accumulator, so that eight independent chains run side by side. (A loop vectorised along a row would end each
// row in a horizontal reduction across one vector, a chain of dependent scalar operations per row; and a loop
// written with the rows innermost is interchanged back into that by the compiler.)
template <typename T, typename Value, typename Combine>
VISIONMOE_ALWAYS_INLINE void reduce_rows(int64_t N, int64_t S, T* __restrict__ out, const Value& value,
                                         const Combine& combine) {
  constexpr int kRows = 8;
  int64_t n = 0;
  for (; n + kRows <= N; n += kRows) {
    T accumulator[kRows];
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) accumulator[i] = value((n + i) * S);
    for (int64_t s = 1; s < S; ++s) {
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) accumulator[i] = combine(accumulator[i], value((n + i) * S + s));
    }
    for (int i = 0; i < kRows; ++i) out[n + i] = accumulator[i];
  }
  for (; n < N; ++n) {
    T accumulator = value(n * S);
    for (int64_t s = 1; s < S; ++s) accumulator = combine(accumulator, value(n * S + s));
    out[n] = accumulator;
  }
}

template <typename T>
VISIONMOE_ALWAYS_INLINE T add(T a, T b) {
  return a + b;
}

// Softmax over slots of each row of L [N, S] into p [N, S], and the rows' log-sum-exps [N]; `row_max` and
// `row_sum` are [N] scratch.
template <typename T>
VISIONMOE_ALWAYS_INLINE void softmax_over_slots(const T* __restrict__ L, int64_t N, int64_t S, T* __restrict__ p,
                                                T* __restrict__ logsumexp, T* __restrict__ row_max,
                                                T* __restrict__ row_sum) {
  reduce_rows(N, S, row_max, [L](int64_t i) { return L[i]; }, [](T a, T b) { return b > a ? b : a; });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) p[n * S + s] = exp_opmath(L[n * S + s] - row_max[n]);
  }
  reduce_rows(N, S, row_sum, [p](int64_t i) { return p[i]; }, add<T>);
  for (int64_t n = 0; n < N; ++n) {
    logsumexp[n] = row_max[n] + log_opmath(row_sum[n]);
    row_sum[n] = T(1) / row_sum[n];
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) p[n * S + s] *= row_sum[n];
  }
}

// Softmax over tokens of each column of L [N, S], in place, and the columns' log-sum-exps [S]; `column_max`
// and `column_sum` are [S] scratch.
template <typename T>
VISIONMOE_ALWAYS_INLINE void softmax_over_tokens_in_place(T* __restrict__ L, int64_t N, int64_t S,
                                                          T* __restrict__ logsumexp, T* __restrict__ column_max,
                                                          T* __restrict__ column_sum) {
  std::fill(column_max, column_max + S, -std::numeric_limits<T>::infinity());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) column_max[s] = std::max(column_max[s], L[n * S + s]);
  }
  std::fill(column_sum, column_sum + S, T(0));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) {
      L[n * S + s] = exp_opmath(L[n * S + s] - column_max[s]);
      column_sum[s] += L[n * S + s];
    }
  }
  for (int64_t s = 0; s < S; ++s) logsumexp[s] = column_max[s] + std::log(column_sum[s]);
  for (int64_t s = 0; s < S; ++s) column_sum[s] = T(1) / column_sum[s];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) L[n * S + s] *= column_sum[s];
  }
}

// Per-head workspace, allocated once per task: opmath tiles, and opmath copies of the inputs when these are
// float16 or bfloat16.
template <typename T>
class Workspace {
 public:
  T* take(int64_t n) {
    T* start = storage_.data() + used_;
    used_ += n;
    return start;
  }
  // Room for a copy of n inputs of type scalar_t; none when scalar_t is opmath.
  template <typename scalar_t>
  T* take_copy(int64_t n) {
    return take(std::is_same_v<T, scalar_t> ? 0 : n);
  }
  void reserve(int64_t n) { storage_.resize(n); }

 private:
  std::vector<T> storage_;
  int64_t used_ = 0;
};

template <typename scalar_t>
struct ForwardPointers {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v_tokens;
  const scalar_t* v_slots;
  const scalar_t* where;
  scalar_t* token_update;
  scalar_t* slot_update;
  scalar_t* logits;
  opmath_t* token_logsumexp;
  opmath_t* slot_logsumexp;
};

template <typename scalar_t>
VISIONMOE_CPU_CLONES void forward_heads(const WhatWhereShape& shape, const ForwardPointers<scalar_t>& ptr,
                                        int64_t begin, int64_t end) {
  using T = at::opmath_type<scalar_t>;
  const int64_t N = shape.tokens, S = shape.slots, dh = shape.head_dim, dv = shape.value_dim;
  constexpr bool kConverts = !std::is_same_v<T, scalar_t>;
  Workspace<T> workspace;
  workspace.reserve(dh * S + 2 * N * S + 2 * S + 2 * N + (kConverts ? N * dh + S * dh + N * dv + S * dv : 0));
  T* k_t = workspace.take(dh * S);
  T* logits_tile = workspace.take(N * S);  // L, then the softmax over tokens P_N in place
  T* p_slots = workspace.take(N * S);      // P_S
  T* column_max = workspace.take(S);
  T* column_sum = workspace.take(S);
  T* row_max = workspace.take(N);
  T* row_sum = workspace.take(N);
  T* q_copy = workspace.template take_copy<scalar_t>(N * dh);
  T* k_copy = workspace.template take_copy<scalar_t>(S * dh);
  T* v_tokens_copy = workspace.template take_copy<scalar_t>(N * dv);
  T* v_slots_copy = workspace.template take_copy<scalar_t>(S * dv);
  const T scale = static_cast<T>(shape.scale);
  Prefetcher prefetcher(end);

  for (int64_t h = begin; h < end; ++h) {
    prefetcher.start(h + 1, std::pair{ptr.q, N * dh}, std::pair{ptr.k, S * dh}, std::pair{ptr.where, N * S},
                     std::pair{ptr.logits, N * S}, std::pair{ptr.v_slots, S * dv}, std::pair{ptr.token_update, N * dv},
                     std::pair{ptr.v_tokens, N * dv});
    const T* q = in_opmath(ptr.q + h * N * dh, N * dh, q_copy);
    const T* k = in_opmath(ptr.k + h * S * dh, S * dh, k_copy);
    transpose(k, S, dh, k_t);
    product(N, S, dh, q, dh, 1, k_t, S, T(1), logits_tile, S, prefetcher);
    const scalar_t* where = ptr.where + h * N * S;
    scalar_t* logits = ptr.logits + h * N * S;
    for (int64_t i = 0; i < N * S; ++i) {
      // Rounded to the output dtype first: the backward recomputes the softmaxes from the rounded logits.
      logits[i] = static_cast<scalar_t>(static_cast<T>(where[i]) + scale * logits_tile[i]);
      logits_tile[i] = static_cast<T>(logits[i]);
    }
    softmax_over_slots(logits_tile, N, S, p_slots, ptr.token_logsumexp + h * N, row_max, row_sum);
    softmax_over_tokens_in_place(logits_tile, N, S, ptr.slot_logsumexp + h * S, column_max, column_sum);
    const T* v_slots = in_opmath(ptr.v_slots + h * S * dv, S * dv, v_slots_copy);
    product(N, dv, S, logits_tile, S, 1, v_slots, dv, T(1), ptr.token_update + h * N * dv, dv, prefetcher);
    const T* v_tokens = in_opmath(ptr.v_tokens + h * N * dv, N * dv, v_tokens_copy);
    product(S, dv, N, p_slots, 1, S, v_tokens, dv, T(1), ptr.slot_update + h * S * dv, dv,  // P_S^T v_tokens
            prefetcher);
  }
}

template <typename scalar_t>
struct BackwardPointers {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_token_update;  // null when absent
  const scalar_t* grad_slot_update;   // null when absent
  const scalar_t* grad_logits;        // null when absent
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v_tokens;
  const scalar_t* v_slots;
  const scalar_t* logits;
  const opmath_t* token_logsumexp;
  const opmath_t* slot_logsumexp;
  scalar_t* grad_q;
  scalar_t* grad_k;
  scalar_t* grad_v_tokens;
  scalar_t* grad_v_slots;
  scalar_t* grad_where;
};

template <typename scalar_t>
VISIONMOE_CPU_CLONES void backward_heads(const WhatWhereShape& shape, const BackwardPointers<scalar_t>& ptr,
                                         int64_t begin, int64_t end) {
  using T = at::opmath_type<scalar_t>;
  const int64_t N = shape.tokens, S = shape.slots, dh = shape.head_dim, dv = shape.value_dim;
  constexpr bool kConverts = !std::is_same_v<T, scalar_t>;
  Workspace<T> workspace;
  workspace.reserve(3 * N * S + dv * S + S * dh + S + N +
                    (kConverts ? N * S + N * dh + S * dh + 2 * N * dv + 2 * S * dv : 0));
  T* logits_copy = workspace.template take_copy<scalar_t>(N * S);
  T* scaled_k = workspace.take(S * dh);           // k / sqrt(dh)
  T* probabilities = workspace.take(N * S);       // P_N, then P_S
  T* grad_probabilities = workspace.take(N * S);  // G_N, then G_S
  T* grad_logits_tile = workspace.take(N * S);    // dL
  T* transposed = workspace.take(dv * S);         // v_slots^T, then grad_slot_update^T
  T* column_sum = workspace.take(S);
  T* row_sum = workspace.take(N);
  T* q_copy = workspace.template take_copy<scalar_t>(N * dh);
  T* k_copy = workspace.template take_copy<scalar_t>(S * dh);
  T* v_tokens_copy = workspace.template take_copy<scalar_t>(N * dv);
  T* v_slots_copy = workspace.template take_copy<scalar_t>(S * dv);
  T* grad_token_update_copy = workspace.template take_copy<scalar_t>(N * dv);
  T* grad_slot_update_copy = workspace.template take_copy<scalar_t>(S * dv);
  const T scale = static_cast<T>(shape.scale);
  Prefetcher prefetcher(end);
  for (int64_t h = begin; h < end; ++h) {
    prefetcher.start(h + 1, std::pair{ptr.logits, N * S}, std::pair{ptr.grad_logits, N * S},
                     std::pair{ptr.grad_token_update, N * dv}, std::pair{ptr.v_slots, S * dv},
                     std::pair{ptr.grad_slot_update, S * dv}, std::pair{ptr.v_tokens, N * dv},
                     std::pair{ptr.grad_v_tokens, N * dv}, std::pair{ptr.grad_where, N * S}, std::pair{ptr.q, N * dh},
                     std::pair{ptr.k, S * dh}, std::pair{ptr.grad_q, N * dh});
    const T* logits_tile = in_opmath(ptr.logits + h * N * S, N * S, logits_copy);
    if (ptr.grad_logits != nullptr) {
      const scalar_t* grad_logits = ptr.grad_logits + h * N * S;
      for (int64_t i = 0; i < N * S; ++i) grad_logits_tile[i] = static_cast<T>(grad_logits[i]);
    } else {
      std::fill(grad_logits_tile, grad_logits_tile + N * S, T(0));
    }

    // Through token_update = P_N v_slots: the softmax over tokens, whose sums run down each column.
    if (ptr.grad_token_update != nullptr) {
      const T* slot_logsumexp = ptr.slot_logsumexp + h * S;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) {
          probabilities[n * S + s] = exp_opmath(logits_tile[n * S + s] - slot_logsumexp[s]);
        }
      }
      const T* grad_token_update = in_opmath(ptr.grad_token_update + h * N * dv, N * dv, grad_token_update_copy);
      const T* v_slots = in_opmath(ptr.v_slots + h * S * dv, S * dv, v_slots_copy);
      transpose(v_slots, S, dv, transposed);
      product(N, S, dv, grad_token_update, dv, 1, transposed, S, T(1), grad_probabilities, S, prefetcher);
      std::fill(column_sum, column_sum + S, T(0));
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) column_sum[s] += probabilities[n * S + s] * grad_probabilities[n * S + s];
      }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) {
          grad_logits_tile[n * S + s] += probabilities[n * S + s] * (grad_probabilities[n * S + s] - column_sum[s]);
        }
      }
      product(S, dv, N, probabilities, 1, S, grad_token_update, dv, T(1), ptr.grad_v_slots + h * S * dv, dv,
              prefetcher);
    } else {
      std::fill(ptr.grad_v_slots + h * S * dv, ptr.grad_v_slots + (h + 1) * S * dv, scalar_t(0));
    }

    // Through slot_update = P_S^T v_tokens: the softmax over slots, whose sums run along each row.
    if (ptr.grad_slot_update != nullptr) {
      const T* token_logsumexp = ptr.token_logsumexp + h * N;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) {
          probabilities[n * S + s] = exp_opmath(logits_tile[n * S + s] - token_logsumexp[n]);
        }
      }
      const T* grad_slot_update = in_opmath(ptr.grad_slot_update + h * S * dv, S * dv, grad_slot_update_copy);
      const T* v_tokens = in_opmath(ptr.v_tokens + h * N * dv, N * dv, v_tokens_copy);
      transpose(grad_slot_update, S, dv, transposed);
      product(N, S, dv, v_tokens, dv, 1, transposed, S, T(1), grad_probabilities, S, prefetcher);
      reduce_rows(N, S, row_sum, [&](int64_t i) { return probabilities[i] * grad_probabilities[i]; }, add<T>);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) {
          grad_logits_tile[n * S + s] += probabilities[n * S + s] * (grad_probabilities[n * S + s] - row_sum[n]);
        }
      }
      product(N, dv, S, probabilities, S, 1, grad_slot_update, dv, T(1), ptr.grad_v_tokens + h * N * dv, dv,
              prefetcher);
    } else {
      std::fill(ptr.grad_v_tokens + h * N * dv, ptr.grad_v_tokens + (h + 1) * N * dv, scalar_t(0));
    }

    scalar_t* grad_where = ptr.grad_where + h * N * S;
    for (int64_t i = 0; i < N * S; ++i) grad_where[i] = static_cast<scalar_t>(grad_logits_tile[i]);
    const T* q = in_opmath(ptr.q + h * N * dh, N * dh, q_copy);
    const T* k = in_opmath(ptr.k + h * S * dh, S * dh, k_copy);
    for (int64_t i = 0; i < S * dh; ++i) scaled_k[i] = scale * k[i];  // so that the product has no scaling
    product(N, dh, S, grad_logits_tile, S, 1, scaled_k, dh, T(1), ptr.grad_q + h * N * dh, dh, prefetcher);
    product(S, dh, N, grad_logits_tile, 1, S, q, dh, scale, ptr.grad_k + h * S * dh, dh, prefetcher);  // dL^T q
  }
}

template <typename scalar_t>
const scalar_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

}  // namespace

void forward(const WhatWhereShape& shape, const ForwardTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.q.scalar_type(), "visionmoe_whatwhere_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const ForwardPointers<scalar_t> ptr{t.q.const_data_ptr<scalar_t>(),
                                        t.k.const_data_ptr<scalar_t>(),
                                        t.v_tokens.const_data_ptr<scalar_t>(),
                                        t.v_slots.const_data_ptr<scalar_t>(),
                                        t.where.const_data_ptr<scalar_t>(),
                                        t.token_update.mutable_data_ptr<scalar_t>(),
                                        t.slot_update.mutable_data_ptr<scalar_t>(),
                                        t.logits.mutable_data_ptr<scalar_t>(),
                                        t.token_logsumexp.mutable_data_ptr<opmath_t>(),
                                        t.slot_logsumexp.mutable_data_ptr<opmath_t>()};
    at::parallel_for(0, shape.heads, 1,
                     [&](int64_t begin, int64_t end) { forward_heads<scalar_t>(shape, ptr, begin, end); });
  });
}

void backward(const WhatWhereShape& shape, const BackwardTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.q.scalar_type(), "visionmoe_whatwhere_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const BackwardPointers<scalar_t> ptr{optional_data<scalar_t>(t.grad_token_update),
                                         optional_data<scalar_t>(t.grad_slot_update),
                                         optional_data<scalar_t>(t.grad_logits),
                                         t.q.const_data_ptr<scalar_t>(),
                                         t.k.const_data_ptr<scalar_t>(),
                                         t.v_tokens.const_data_ptr<scalar_t>(),
                                         t.v_slots.const_data_ptr<scalar_t>(),
                                         t.logits.const_data_ptr<scalar_t>(),
                                         t.token_logsumexp.const_data_ptr<opmath_t>(),
                                         t.slot_logsumexp.const_data_ptr<opmath_t>(),
                                         t.grad_q.mutable_data_ptr<scalar_t>(),
                                         t.grad_k.mutable_data_ptr<scalar_t>(),
                                         t.grad_v_tokens.mutable_data_ptr<scalar_t>(),
                                         t.grad_v_slots.mutable_data_ptr<scalar_t>(),
                                         t.grad_where.mutable_data_ptr<scalar_t>()};
    at::parallel_for(0, shape.heads, 1,
                     [&](int64_t begin, int64_t end) { backward_heads<scalar_t>(shape, ptr, begin, end); });
  });
}

}  // namespace visionmoe::whatwhere::cpu

namespace visionmoe::whatwhere {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whatwhere_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens, const at::Tensor& v_slots,
    const at::Tensor& where) {
  return run_whatwhere_attention(&cpu::forward, q, k, v_tokens, v_slots, where);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whatwhere_attention_backward_cpu(
    const std::optional<at::Tensor>& grad_token_update, const std::optional<at::Tensor>& grad_slot_update,
    const std::optional<at::Tensor>& grad_logits, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens,
    const at::Tensor& v_slots, const at::Tensor& logits, const at::Tensor& token_logsumexp,
    const at::Tensor& slot_logsumexp) {
  return run_whatwhere_attention_backward(&cpu::backward, grad_token_update, grad_slot_update, grad_logits, q, k,
                                          v_tokens, v_slots, logits, token_logsumexp, slot_logsumexp);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("whatwhere_attention", &whatwhere_attention_cpu);
  m.impl("whatwhere_attention_backward", &whatwhere_attention_backward_cpu);
}

}  // namespace visionmoe::whatwhere
