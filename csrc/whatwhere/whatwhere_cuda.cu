// CUDA kernels of the what-where attention family (the math is in whatwhere.h).
//
// One block per head (b, h) walks the head's N tokens in chunks of `rows` tokens (as many as fit the chunk's
// [rows, S] tiles in 48 KB of shared memory, at most kMaxChunkRows):
//   forward   pass 1: logits of the chunk (one thread per (token, slot) pair, a dot product over dh), the
//                     tokens' log-sum-exps over the slots (one warp per token), and a running log-sum-exp over
//                     the tokens for every slot (one thread per slot, through the chunk's tokens in order);
//             pass 2: both probability tiles of the chunk, token_update rows (one thread per (token, feature))
//                     and slot_update partial sums (one thread per (slot, feature), the same thread in every
//                     chunk, so it alone reads and writes its running sum);
//   backward  pass 1 (with grad_token_update only): the column sums sum_n P_N G_N of the softmax over tokens;
//             pass 2: dL of the chunk, then grad_q and grad_v_tokens rows, and grad_k and grad_v_slots partial
//                     sums as in the forward.
// Running sums across chunks live in an opmath workspace [B * H, S, width] (only when N needs more than one
// chunk); the last chunk writes the output. Every sum runs in a fixed order and every element has one writer:
// the kernels are deterministic and use no atomics. B * H blocks: small batches leave SMs idle.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/device_math.cuh"
#include "common/warp_reduce.cuh"
#include "whatwhere/whatwhere.h"

namespace visionmoe::whatwhere::cuda {
namespace {

using device_math::negative_infinity;
using warp_reduce::warp_max;
using warp_reduce::warp_sum;

constexpr int kWarp = warp_reduce::kWarpSize;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kMaxChunkRows = 64;
constexpr int64_t kSharedBytes = 48 * 1024;  // available to every block without opting in

// sum_d x[d] * y[d] in opmath, in order.
template <typename T, typename scalar_t>
__device__ __forceinline__ T dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t length) {
  T sum = 0;
  for (int64_t d = 0; d < length; ++d) sum += static_cast<T>(x[d]) * static_cast<T>(y[d]);
  return sum;
}

// A running sum over the chunks, owned by one thread: starts at zero, lives in the workspace between chunks,
// and the last chunk writes `scale` times it to the output.
template <typename T, typename scalar_t>
__device__ __forceinline__ void add_to_running_sum(T partial, int64_t index, int64_t chunk, int64_t chunks, T scale,
                                                   T* __restrict__ workspace, scalar_t* __restrict__ out) {
  const T total = chunk == 0 ? partial : workspace[index] + partial;
  if (chunk == chunks - 1) {
    out[index] = static_cast<scalar_t>(scale * total);
  } else {
    workspace[index] = total;
  }
}

struct Grid {
  int64_t tokens, slots, head_dim, value_dim;
  int64_t rows;    // tokens per chunk
  int64_t chunks;  // chunks per head
};

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Grid grid, T scale, const scalar_t* __restrict__ q_all, const scalar_t* __restrict__ k_all,
                   const scalar_t* __restrict__ v_tokens_all, const scalar_t* __restrict__ v_slots_all,
                   const scalar_t* __restrict__ where_all, scalar_t* __restrict__ token_update_all,
                   scalar_t* __restrict__ slot_update_all, scalar_t* __restrict__ logits_all,
                   T* __restrict__ token_logsumexp_all, T* __restrict__ slot_logsumexp_all,
                   T* __restrict__ workspace_all) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t N = grid.tokens, S = grid.slots, dh = grid.head_dim, dv = grid.value_dim, R = grid.rows;
  T* tile = reinterpret_cast<T*>(shared_bytes);  // logits of the chunk, then P_N     [R, S]
  T* p_slots = tile + R * S;                     // P_S of the chunk                  [R, S]
  T* column_max = p_slots + R * S;               // running max over tokens           [S]
  T* column_sum = column_max + S;                // running sum of exp(L - max)       [S]
  const int64_t h = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const scalar_t* q = q_all + h * N * dh;
  const scalar_t* k = k_all + h * S * dh;
  const scalar_t* v_tokens = v_tokens_all + h * N * dv;
  const scalar_t* v_slots = v_slots_all + h * S * dv;
  const scalar_t* where = where_all + h * N * S;
  scalar_t* logits = logits_all + h * N * S;
  T* token_logsumexp = token_logsumexp_all + h * N;
  T* slot_logsumexp = slot_logsumexp_all + h * S;
  T* workspace = workspace_all == nullptr ? nullptr : workspace_all + h * S * dv;

  for (int64_t s = threadIdx.x; s < S; s += kThreads) {
    column_max[s] = negative_infinity<T>();
    column_sum[s] = 0;
  }
  for (int64_t chunk = 0; chunk < grid.chunks; ++chunk) {
    const int64_t n0 = chunk * R, rows = min(R, N - n0);
    for (int64_t i = threadIdx.x; i < rows * S; i += kThreads) {
      const int64_t r = i / S, s = i % S, n = n0 + r;
      // Rounded to the output dtype first: the backward recomputes the softmaxes from the rounded logits.
      const scalar_t value =
          static_cast<scalar_t>(static_cast<T>(where[n * S + s]) + scale * dot<T>(q + n * dh, k + s * dh, dh));
      logits[n * S + s] = value;
      tile[r * S + s] = static_cast<T>(value);
    }
    __syncthreads();
    for (int64_t r = warp; r < rows; r += kWarps) {
      T row_max = negative_infinity<T>();
      for (int64_t s = lane; s < S; s += kWarp) row_max = max(row_max, tile[r * S + s]);
      row_max = warp_max(row_max);
      T sum = 0;
      for (int64_t s = lane; s < S; s += kWarp) sum += exp(tile[r * S + s] - row_max);
      sum = warp_sum(sum);
      if (lane == 0) token_logsumexp[n0 + r] = row_max + log(sum);
    }
    for (int64_t s = threadIdx.x; s < S; s += kThreads) {
      T chunk_max = negative_infinity<T>();
      for (int64_t r = 0; r < rows; ++r) chunk_max = max(chunk_max, tile[r * S + s]);
      const T new_max = max(column_max[s], chunk_max);
      if (new_max == negative_infinity<T>()) continue;  // no finite logit in this column yet
      T sum = column_sum[s] * exp(column_max[s] - new_max);
      for (int64_t r = 0; r < rows; ++r) sum += exp(tile[r * S + s] - new_max);
      column_max[s] = new_max;
      column_sum[s] = sum;
    }
    __syncthreads();  // the tile is overwritten by the next chunk
  }
  for (int64_t s = threadIdx.x; s < S; s += kThreads) {
    const T value = column_max[s] + log(column_sum[s]);
    column_max[s] = value;  // from here on: slot_logsumexp
    slot_logsumexp[s] = value;
  }
  __syncthreads();
  const T* column_logsumexp = column_max;

  for (int64_t chunk = 0; chunk < grid.chunks; ++chunk) {
    const int64_t n0 = chunk * R, rows = min(R, N - n0);
    for (int64_t i = threadIdx.x; i < rows * S; i += kThreads) {
      const int64_t r = i / S, s = i % S, n = n0 + r;
      const T value = static_cast<T>(logits[n * S + s]);
      tile[i] = exp(value - column_logsumexp[s]);
      p_slots[i] = exp(value - token_logsumexp[n]);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < rows * dv; i += kThreads) {
      const int64_t r = i / dv, d = i % dv;
      T sum = 0;
      for (int64_t s = 0; s < S; ++s) sum += tile[r * S + s] * static_cast<T>(v_slots[s * dv + d]);
      token_update_all[(h * N + n0 + r) * dv + d] = static_cast<scalar_t>(sum);
    }
    for (int64_t i = threadIdx.x; i < S * dv; i += kThreads) {
      const int64_t s = i / dv, d = i % dv;
      T sum = 0;
      for (int64_t r = 0; r < rows; ++r) sum += p_slots[r * S + s] * static_cast<T>(v_tokens[(n0 + r) * dv + d]);
      add_to_running_sum(sum, i, chunk, grid.chunks, T(1), workspace, slot_update_all + h * S * dv);
    }
    __syncthreads();  // the tiles are overwritten by the next chunk
  }
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Grid grid, T scale, const scalar_t* __restrict__ grad_token_update_all,
                    const scalar_t* __restrict__ grad_slot_update_all, const scalar_t* __restrict__ grad_logits_all,
                    const scalar_t* __restrict__ q_all, const scalar_t* __restrict__ k_all,
                    const scalar_t* __restrict__ v_tokens_all, const scalar_t* __restrict__ v_slots_all,
                    const scalar_t* __restrict__ logits_all, const T* __restrict__ token_logsumexp_all,
                    const T* __restrict__ slot_logsumexp_all, scalar_t* __restrict__ grad_q_all,
                    scalar_t* __restrict__ grad_k_all, scalar_t* __restrict__ grad_v_tokens_all,
                    scalar_t* __restrict__ grad_v_slots_all, scalar_t* __restrict__ grad_where_all,
                    T* __restrict__ key_workspace_all, T* __restrict__ value_workspace_all) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t N = grid.tokens, S = grid.slots, dh = grid.head_dim, dv = grid.value_dim, R = grid.rows;
  T* grad_tile = reinterpret_cast<T*>(shared_bytes);  // dL of the chunk                       [R, S]
  T* p_tokens = grad_tile + R * S;                    // P_N of the chunk                      [R, S]
  T* p_slots = p_tokens + R * S;                      // P_S of the chunk                      [R, S]
  T* g_slots = p_slots + R * S;                       // G_S; in pass 1, P_N * G_N             [R, S]
  T* column_sum = g_slots + R * S;                    // sum_n P_N G_N                         [S]
  T* row_sum = column_sum + S;                        // sum_s P_S G_S of the chunk's tokens   [R]
  const int64_t h = blockIdx.x;
  const bool has_grad_token_update = grad_token_update_all != nullptr;
  const bool has_grad_slot_update = grad_slot_update_all != nullptr;
  const scalar_t* grad_token_update = has_grad_token_update ? grad_token_update_all + h * N * dv : nullptr;
  const scalar_t* grad_slot_update = has_grad_slot_update ? grad_slot_update_all + h * S * dv : nullptr;
  const scalar_t* grad_logits = grad_logits_all == nullptr ? nullptr : grad_logits_all + h * N * S;
  const scalar_t* q = q_all + h * N * dh;
  const scalar_t* k = k_all + h * S * dh;
  const scalar_t* v_tokens = v_tokens_all + h * N * dv;
  const scalar_t* v_slots = v_slots_all + h * S * dv;
  const scalar_t* logits = logits_all + h * N * S;
  const T* token_logsumexp = token_logsumexp_all + h * N;
  const T* slot_logsumexp = slot_logsumexp_all + h * S;
  T* key_workspace = key_workspace_all == nullptr ? nullptr : key_workspace_all + h * S * dh;
  T* value_workspace = value_workspace_all == nullptr ? nullptr : value_workspace_all + h * S * dv;

  for (int64_t s = threadIdx.x; s < S; s += kThreads) column_sum[s] = 0;
  if (has_grad_token_update) {
    for (int64_t chunk = 0; chunk < grid.chunks; ++chunk) {
      const int64_t n0 = chunk * R, rows = min(R, N - n0);
      for (int64_t i = threadIdx.x; i < rows * S; i += kThreads) {
        const int64_t r = i / S, s = i % S, n = n0 + r;
        const T p = exp(static_cast<T>(logits[n * S + s]) - slot_logsumexp[s]);
        g_slots[i] = p * dot<T>(grad_token_update + n * dv, v_slots + s * dv, dv);
      }
      __syncthreads();
      for (int64_t s = threadIdx.x; s < S; s += kThreads) {
        T sum = column_sum[s];
        for (int64_t r = 0; r < rows; ++r) sum += g_slots[r * S + s];
        column_sum[s] = sum;
      }
      __syncthreads();
    }
  }

  for (int64_t chunk = 0; chunk < grid.chunks; ++chunk) {
    const int64_t n0 = chunk * R, rows = min(R, N - n0);
    for (int64_t i = threadIdx.x; i < rows * S; i += kThreads) {
      const int64_t r = i / S, s = i % S, n = n0 + r;
      const T value = static_cast<T>(logits[n * S + s]);
      T grad = grad_logits == nullptr ? T(0) : static_cast<T>(grad_logits[n * S + s]);
      if (has_grad_token_update) {
        const T p = exp(value - slot_logsumexp[s]);
        grad += p * (dot<T>(grad_token_update + n * dv, v_slots + s * dv, dv) - column_sum[s]);
        p_tokens[i] = p;
      }
      if (has_grad_slot_update) {
        p_slots[i] = exp(value - token_logsumexp[n]);
        g_slots[i] = dot<T>(v_tokens + n * dv, grad_slot_update + s * dv, dv);
      }
      grad_tile[i] = grad;
    }
    __syncthreads();
    if (has_grad_slot_update) {
      for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
        T sum = 0;
        for (int64_t s = 0; s < S; ++s) sum += p_slots[r * S + s] * g_slots[r * S + s];
        row_sum[r] = sum;
      }
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < rows * S; i += kThreads) {
      const int64_t r = i / S;
      if (has_grad_slot_update) grad_tile[i] += p_slots[i] * (g_slots[i] - row_sum[r]);
      grad_where_all[(h * N + n0) * S + i] = static_cast<scalar_t>(grad_tile[i]);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < rows * dh; i += kThreads) {
      const int64_t r = i / dh, d = i % dh;
      T sum = 0;
      for (int64_t s = 0; s < S; ++s) sum += grad_tile[r * S + s] * static_cast<T>(k[s * dh + d]);
      grad_q_all[(h * N + n0 + r) * dh + d] = static_cast<scalar_t>(scale * sum);
    }
    for (int64_t i = threadIdx.x; i < rows * dv; i += kThreads) {
      const int64_t r = i / dv, d = i % dv;
      T sum = 0;
      if (has_grad_slot_update) {
        for (int64_t s = 0; s < S; ++s) sum += p_slots[r * S + s] * static_cast<T>(grad_slot_update[s * dv + d]);
      }
      grad_v_tokens_all[(h * N + n0 + r) * dv + d] = static_cast<scalar_t>(sum);
    }
    for (int64_t i = threadIdx.x; i < S * dh; i += kThreads) {
      const int64_t s = i / dh, d = i % dh;
      T sum = 0;
      for (int64_t r = 0; r < rows; ++r) sum += grad_tile[r * S + s] * static_cast<T>(q[(n0 + r) * dh + d]);
      add_to_running_sum(sum, i, chunk, grid.chunks, scale, key_workspace, grad_k_all + h * S * dh);
    }
    for (int64_t i = threadIdx.x; i < S * dv; i += kThreads) {
      const int64_t s = i / dv, d = i % dv;
      T sum = 0;
      if (has_grad_token_update) {
        for (int64_t r = 0; r < rows; ++r) {
          sum += p_tokens[r * S + s] * static_cast<T>(grad_token_update[(n0 + r) * dv + d]);
        }
      }
      add_to_running_sum(sum, i, chunk, grid.chunks, T(1), value_workspace, grad_v_slots_all + h * S * dv);
    }
    __syncthreads();  // the tiles are overwritten by the next chunk
  }
}

// Tokens per chunk: as many as fit `tiles` [rows, S] tiles and `extra_per_row` numbers per token, beside
// `fixed` numbers, in kSharedBytes.
Grid make_grid(const char* op, const WhatWhereShape& shape, int64_t element_bytes, int64_t tiles, int64_t extra_per_row,
               int64_t fixed) {
  const int64_t per_row = (tiles * shape.slots + extra_per_row) * element_bytes;
  const int64_t fitting_rows = (kSharedBytes - fixed * element_bytes) / per_row;
  const int64_t rows = std::min<int64_t>({kMaxChunkRows, shape.tokens, fitting_rows});
  TORCH_CHECK_VALUE(rows >= 1, op, ": k has too many slots (S = ", shape.slots,
                    ") for the CUDA kernel's shared memory");
  TORCH_CHECK_VALUE(shape.heads <= std::numeric_limits<int32_t>::max(), op, ": too many heads (B * H = ", shape.heads,
                    ") for one CUDA launch");
  return Grid{shape.tokens, shape.slots, shape.head_dim, shape.value_dim, rows, (shape.tokens + rows - 1) / rows};
}

size_t shared_memory_bytes(const Grid& grid, int64_t element_bytes, int64_t tiles, int64_t extra_per_row,
                           int64_t fixed) {
  return static_cast<size_t>(((tiles * grid.slots + extra_per_row) * grid.rows + fixed) * element_bytes);
}

template <typename T>
T* optional_workspace(bool needed, int64_t heads, int64_t slots, int64_t width, const at::Tensor& like,
                      at::Tensor& storage) {
  if (!needed) return nullptr;
  storage = at::empty({heads, slots, width}, like.options().dtype(c10::CppTypeToScalarType<T>::value));
  return storage.mutable_data_ptr<T>();
}

template <typename scalar_t>
const scalar_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// Forward: tiles logits/P_N and P_S; the running column statistics (2 S).
constexpr int64_t kForwardTiles = 2;
// Backward: tiles dL, P_N, P_S, G_S; the column sums (S) and one row sum per token.
constexpr int64_t kBackwardTiles = 4;

}  // namespace

void forward(const WhatWhereShape& shape, const ForwardTensors& t) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.q.scalar_type(), "visionmoe_whatwhere_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const int64_t bytes = sizeof(T);
    const Grid grid = make_grid("whatwhere_attention", shape, bytes, kForwardTiles, 0, 2 * shape.slots);
    at::Tensor workspace;
    T* workspace_data =
        optional_workspace<T>(grid.chunks > 1, shape.heads, shape.slots, shape.value_dim, t.q, workspace);
    forward_kernel<scalar_t, T><<<static_cast<unsigned>(shape.heads), kThreads,
                                  shared_memory_bytes(grid, bytes, kForwardTiles, 0, 2 * shape.slots), stream>>>(
        grid, static_cast<T>(shape.scale), t.q.const_data_ptr<scalar_t>(), t.k.const_data_ptr<scalar_t>(),
        t.v_tokens.const_data_ptr<scalar_t>(), t.v_slots.const_data_ptr<scalar_t>(), t.where.const_data_ptr<scalar_t>(),
        t.token_update.mutable_data_ptr<scalar_t>(), t.slot_update.mutable_data_ptr<scalar_t>(),
        t.logits.mutable_data_ptr<scalar_t>(), t.token_logsumexp.mutable_data_ptr<T>(),
        t.slot_logsumexp.mutable_data_ptr<T>(), workspace_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward(const WhatWhereShape& shape, const BackwardTensors& t) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.q.scalar_type(), "visionmoe_whatwhere_bwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const int64_t bytes = sizeof(T);
    const Grid grid = make_grid("whatwhere_attention_backward", shape, bytes, kBackwardTiles, 1, shape.slots);
    at::Tensor key_workspace, value_workspace;
    T* key_workspace_data =
        optional_workspace<T>(grid.chunks > 1, shape.heads, shape.slots, shape.head_dim, t.q, key_workspace);
    T* value_workspace_data =
        optional_workspace<T>(grid.chunks > 1, shape.heads, shape.slots, shape.value_dim, t.q, value_workspace);
    backward_kernel<scalar_t, T><<<static_cast<unsigned>(shape.heads), kThreads,
                                   shared_memory_bytes(grid, bytes, kBackwardTiles, 1, shape.slots), stream>>>(
        grid, static_cast<T>(shape.scale), optional_data<scalar_t>(t.grad_token_update),
        optional_data<scalar_t>(t.grad_slot_update), optional_data<scalar_t>(t.grad_logits),
        t.q.const_data_ptr<scalar_t>(), t.k.const_data_ptr<scalar_t>(), t.v_tokens.const_data_ptr<scalar_t>(),
        t.v_slots.const_data_ptr<scalar_t>(), t.logits.const_data_ptr<scalar_t>(),
        t.token_logsumexp.const_data_ptr<T>(), t.slot_logsumexp.const_data_ptr<T>(),
        t.grad_q.mutable_data_ptr<scalar_t>(), t.grad_k.mutable_data_ptr<scalar_t>(),
        t.grad_v_tokens.mutable_data_ptr<scalar_t>(), t.grad_v_slots.mutable_data_ptr<scalar_t>(),
        t.grad_where.mutable_data_ptr<scalar_t>(), key_workspace_data, value_workspace_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace visionmoe::whatwhere::cuda

namespace visionmoe::whatwhere {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whatwhere_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens, const at::Tensor& v_slots,
    const at::Tensor& where) {
  return run_whatwhere_attention(&cuda::forward, q, k, v_tokens, v_slots, where);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whatwhere_attention_backward_cuda(
    const std::optional<at::Tensor>& grad_token_update, const std::optional<at::Tensor>& grad_slot_update,
    const std::optional<at::Tensor>& grad_logits, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens,
    const at::Tensor& v_slots, const at::Tensor& logits, const at::Tensor& token_logsumexp,
    const at::Tensor& slot_logsumexp) {
  return run_whatwhere_attention_backward(&cuda::backward, grad_token_update, grad_slot_update, grad_logits, q, k,
                                          v_tokens, v_slots, logits, token_logsumexp, slot_logsumexp);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("whatwhere_attention", &whatwhere_attention_cuda);
  m.impl("whatwhere_attention_backward", &whatwhere_attention_backward_cuda);
}

}  // namespace visionmoe::whatwhere
