// CUDA kernels of the Sinkhorn family. Each iteration runs one kernel over chunks of kChunkRows tokens (one
// block per chunk and group) and one small kernel that merges the chunks' per-expert partials:
//   rows:    one warp per token, its lanes striding over the experts, then a warp reduction;
//   columns: 32 experts at a time, one per lane, each of the block's warps taking every kWarps-th token of the
//            chunk; the warps' partials are merged by warp 0 in warp order, and the chunks' by the merge kernel
//            in chunk order.
// Every reduction runs in a fixed order and every output element has one writer: the kernels are
// deterministic and use no atomics. Logsumexps are computed online (a running maximum and a sum rescaled when
// the maximum grows), which is as stable as a separate max pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/device_math.cuh"
#include "common/warp_reduce.cuh"
#include "sinkhorn/sinkhorn.h"

namespace visionmoe::sinkhorn::cuda {
namespace {

using device_math::exp_opmath;
using device_math::log_opmath;
using device_math::negative_infinity;
using warp_reduce::warp_sum;

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarp * kWarps;
constexpr int kChunkRows = 64;  // tokens per block
constexpr int kMergeThreads = 256;

// A partial logsumexp: log(sum) + max over the values seen so far; sum = 0 and max = -inf when there were none.
// -inf values add nothing, as exp(-inf) = 0 (the check order would otherwise give exp(-inf + inf) = NaN).
template <typename T>
struct LogSumExp {
  T max = negative_infinity<T>();
  T sum = 0;

  __device__ void add(T x) {
    if (x == negative_infinity<T>()) return;
    if (x > max) {
      sum = sum * exp_opmath(max - x) + T(1);
      max = x;
    } else {
      sum += exp_opmath(x - max);
    }
  }
  __device__ void merge(T other_max, T other_sum) {
    const T new_max = other_max > max ? other_max : max;
    if (new_max == negative_infinity<T>()) return;  // both empty
    sum = sum * exp_opmath(max - new_max) + other_sum * exp_opmath(other_max - new_max);
    max = new_max;
  }
  __device__ T value() const { return max + log_opmath(sum); }
};

// The warp's merged logsumexp, as lane 0 computed it, in every lane.
template <typename T>
__device__ T warp_logsumexp(LogSumExp<T> partial) {
#pragma unroll
  for (int shift = kWarp / 2; shift > 0; shift /= 2) {
    partial.merge(__shfl_xor_sync(0xffffffffu, partial.max, shift), __shfl_xor_sync(0xffffffffu, partial.sum, shift));
  }
  return __shfl_sync(0xffffffffu, partial.value(), 0);
}

struct ChunkGrid {
  int64_t tokens, experts, iterations, chunks_per_group;

  __device__ int64_t group() const { return blockIdx.x / chunks_per_group; }
  __device__ int64_t first_token() const { return blockIdx.x % chunks_per_group * kChunkRows; }
  __device__ int rows() const {
    const int64_t remaining = tokens - first_token();
    return static_cast<int>(remaining < kChunkRows ? remaining : kChunkRows);
  }
  // Offset of expert e's partial for this block's chunk in a [G * chunks_per_group, E] buffer.
  __device__ int64_t partial_offset(int64_t e) const { return int64_t(blockIdx.x) * experts + e; }
};

// One Sinkhorn iteration k over one chunk: the row step for its tokens, then its partial column logsumexps.
template <typename scalar_t, typename opmath_t>
__global__ void forward_chunk_kernel(ChunkGrid grid, int64_t k, const scalar_t* __restrict__ logits,
                                     const opmath_t* __restrict__ row_max, opmath_t* __restrict__ row_potentials,
                                     const opmath_t* __restrict__ column_potentials, opmath_t* __restrict__ chunk_max,
                                     opmath_t* __restrict__ chunk_sum) {
  __shared__ opmath_t chunk_u[kChunkRows];
  __shared__ opmath_t chunk_m[kChunkRows];
  __shared__ opmath_t warp_max[kWarps][kWarp];
  __shared__ opmath_t warp_sum_of_exp[kWarps][kWarp];
  const int64_t T = grid.tokens, E = grid.experts, K = grid.iterations;
  const int64_t g = grid.group(), t0 = grid.first_token();
  const int rows = grid.rows();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const scalar_t* L = logits + (g * T + t0) * E;
  const opmath_t* m = row_max + g * T + t0;
  const opmath_t* v_prev = k == 0 ? nullptr : column_potentials + (g * K + k - 1) * E;

  // Row step: u_t = -logsumexp_e(L_te - m_t + v_e).
  for (int r = warp; r < rows; r += kWarps) {
    LogSumExp<opmath_t> partial;
    for (int64_t e = lane; e < E; e += kWarp) {
      partial.add((static_cast<opmath_t>(L[r * E + e]) - m[r]) + (v_prev == nullptr ? opmath_t(0) : v_prev[e]));
    }
    const opmath_t u = -warp_logsumexp(partial);
    if (lane == 0) {
      chunk_u[r] = u;
      chunk_m[r] = m[r];
      row_potentials[(g * K + k) * T + t0 + r] = u;
    }
  }
  __syncthreads();

  // This chunk's partial logsumexp_t(L_te + u_t), 32 experts at a time.
  for (int64_t e0 = 0; e0 < E; e0 += kWarp) {
    const int64_t e = e0 + lane;
    LogSumExp<opmath_t> partial;
    if (e < E) {
      for (int r = warp; r < rows; r += kWarps) {
        partial.add((static_cast<opmath_t>(L[r * E + e]) - chunk_m[r]) + chunk_u[r]);
      }
    }
    warp_max[warp][lane] = partial.max;
    warp_sum_of_exp[warp][lane] = partial.sum;
    __syncthreads();
    if (warp == 0 && e < E) {
      LogSumExp<opmath_t> merged;
      for (int w = 0; w < kWarps; ++w) merged.merge(warp_max[w][lane], warp_sum_of_exp[w][lane]);
      chunk_max[grid.partial_offset(e)] = merged.max;
      chunk_sum[grid.partial_offset(e)] = merged.sum;
    }
    __syncthreads();  // the shared partials are reused by the next 32 experts
  }
}

// Column step of iteration k: v_e = log(T / E) - logsumexp_t(L_te + u_t), merging the chunks in order.
template <typename opmath_t>
__global__ void merge_columns_kernel(int64_t groups, int64_t experts, int64_t iterations, int64_t chunks_per_group,
                                     int64_t k, opmath_t log_column_mass, const opmath_t* __restrict__ chunk_max,
                                     const opmath_t* __restrict__ chunk_sum, opmath_t* __restrict__ column_potentials) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= groups * experts) return;
  const int64_t g = i / experts, e = i % experts;
  LogSumExp<opmath_t> merged;
  for (int64_t c = 0; c < chunks_per_group; ++c) {
    const int64_t p = (g * chunks_per_group + c) * experts + e;
    merged.merge(chunk_max[p], chunk_sum[p]);
  }
  column_potentials[(g * iterations + k) * experts + e] = log_column_mass - merged.value();
}

template <typename scalar_t, typename opmath_t>
__global__ void log_plan_kernel(int64_t groups, int64_t tokens, int64_t experts, int64_t iterations,
                                const scalar_t* __restrict__ logits, const opmath_t* __restrict__ row_max,
                                const opmath_t* __restrict__ row_potentials,
                                const opmath_t* __restrict__ column_potentials, scalar_t* __restrict__ log_plan) {
  const int64_t n = groups * tokens * experts;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i % experts, t = i / experts % tokens, g = i / (experts * tokens);
    const int64_t last = g * iterations + iterations - 1;
    log_plan[i] = static_cast<scalar_t>((static_cast<opmath_t>(logits[i]) - row_max[g * tokens + t]) +
                                        row_potentials[last * tokens + t] + column_potentials[last * experts + e]);
  }
}

// y = L + u^K + v^K: dL = g and this chunk's partial of a_v^K = sum_t g_te.
template <typename scalar_t, typename opmath_t>
__global__ void backward_init_kernel(ChunkGrid grid, const scalar_t* __restrict__ grad_log_plan,
                                     opmath_t* __restrict__ grad, opmath_t* __restrict__ chunk_partial) {
  __shared__ opmath_t warp_partial[kWarps][kWarp];
  const int64_t E = grid.experts;
  const int64_t offset = (grid.group() * grid.tokens + grid.first_token()) * E;
  const int rows = grid.rows();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t e0 = 0; e0 < E; e0 += kWarp) {
    const int64_t e = e0 + lane;
    opmath_t partial = 0;
    if (e < E) {
      for (int r = warp; r < rows; r += kWarps) {
        const opmath_t value = static_cast<opmath_t>(grad_log_plan[offset + r * E + e]);
        grad[offset + r * E + e] = value;
        partial += value;
      }
    }
    warp_partial[warp][lane] = partial;
    __syncthreads();
    if (warp == 0 && e < E) {
      opmath_t sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += warp_partial[w][lane];
      chunk_partial[grid.partial_offset(e)] = sum;
    }
    __syncthreads();
  }
}

// Reverses iteration k over one chunk (see sinkhorn.h for the formulas): the column step's and the row step's
// terms of dL for the chunk's tokens, then the chunk's partial of a_v^{k-1} = -sum_t a_u_t P_te.
template <typename scalar_t, typename opmath_t>
__global__ void backward_chunk_kernel(ChunkGrid grid, int64_t k, opmath_t log_column_mass,
                                      const scalar_t* __restrict__ grad_log_plan, const scalar_t* __restrict__ logits,
                                      const opmath_t* __restrict__ row_max, const opmath_t* __restrict__ row_potentials,
                                      const opmath_t* __restrict__ column_potentials,
                                      const opmath_t* __restrict__ column_adjoint, opmath_t* __restrict__ grad,
                                      opmath_t* __restrict__ chunk_partial) {
  __shared__ opmath_t chunk_a_u[kChunkRows];
  __shared__ opmath_t warp_partial[kWarps][kWarp];
  const int64_t T = grid.tokens, E = grid.experts, K = grid.iterations;
  const int64_t g = grid.group(), t0 = grid.first_token();
  const int rows = grid.rows();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t offset = (g * T + t0) * E;
  const scalar_t* L = logits + offset;
  const opmath_t* m = row_max + g * T + t0;
  const opmath_t* u = row_potentials + (g * K + k) * T + t0;
  const opmath_t* v = column_potentials + (g * K + k) * E;
  const opmath_t* v_prev = k == 0 ? nullptr : column_potentials + (g * K + k - 1) * E;
  const opmath_t* a_v = column_adjoint + g * E;

  for (int r = warp; r < rows; r += kWarps) {
    // a_u_t = [k = K - 1] sum_e g_te - sum_e a_v_e Q_te, with Q_te = exp(L_te + u_t + v_e - c).
    opmath_t partial = 0;
    for (int64_t e = lane; e < E; e += kWarp) {
      const opmath_t shifted = static_cast<opmath_t>(L[r * E + e]) - m[r];
      const opmath_t term = a_v[e] * exp_opmath(shifted + u[r] + v[e] - log_column_mass);
      grad[offset + r * E + e] -= term;
      partial -= term;
      if (k == K - 1) partial += static_cast<opmath_t>(grad_log_plan[offset + r * E + e]);
    }
    const opmath_t a_u = warp_sum(partial);
    // Row step, P_te = exp(L_te + v'_e + u_t).
    for (int64_t e = lane; e < E; e += kWarp) {
      const opmath_t v_prev_e = v_prev == nullptr ? opmath_t(0) : v_prev[e];
      grad[offset + r * E + e] -= a_u * exp_opmath((static_cast<opmath_t>(L[r * E + e]) - m[r]) + v_prev_e + u[r]);
    }
    if (lane == 0) chunk_a_u[r] = a_u;
  }
  __syncthreads();

  for (int64_t e0 = 0; e0 < E; e0 += kWarp) {
    const int64_t e = e0 + lane;
    opmath_t partial = 0;
    if (e < E) {
      const opmath_t v_prev_e = v_prev == nullptr ? opmath_t(0) : v_prev[e];
      for (int r = warp; r < rows; r += kWarps) {
        partial -= chunk_a_u[r] * exp_opmath((static_cast<opmath_t>(L[r * E + e]) - m[r]) + v_prev_e + u[r]);
      }
    }
    warp_partial[warp][lane] = partial;
    __syncthreads();
    if (warp == 0 && e < E) {
      opmath_t sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += warp_partial[w][lane];
      chunk_partial[grid.partial_offset(e)] = sum;
    }
    __syncthreads();
  }
}

// out[g, e] = sum over the group's chunks, in chunk order, of chunk_partial.
template <typename opmath_t>
__global__ void sum_chunks_kernel(int64_t groups, int64_t experts, int64_t chunks_per_group,
                                  const opmath_t* __restrict__ chunk_partial, opmath_t* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= groups * experts) return;
  const int64_t g = i / experts, e = i % experts;
  opmath_t sum = 0;
  for (int64_t c = 0; c < chunks_per_group; ++c) sum += chunk_partial[(g * chunks_per_group + c) * experts + e];
  out[i] = sum;
}

ChunkGrid make_grid(const SinkhornShape& shape) {
  return ChunkGrid{shape.tokens, shape.experts, shape.iterations, (shape.tokens + kChunkRows - 1) / kChunkRows};
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// Grid-stride kernels: enough blocks to fill the GPU, not one per element.
unsigned elementwise_blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(blocks_for(n, 256), 4096)); }

template <typename opmath_t>
opmath_t log_column_mass(const SinkhornShape& shape) {
  return static_cast<opmath_t>(std::log(static_cast<double>(shape.tokens)) -
                               std::log(static_cast<double>(shape.experts)));
}

}  // namespace

void forward(const SinkhornShape& shape, const at::Tensor& logits, const at::Tensor& row_max, at::Tensor& log_plan,
             at::Tensor& row_potentials, at::Tensor& column_potentials) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ChunkGrid grid = make_grid(shape);
  const int64_t num_chunks = shape.groups * grid.chunks_per_group;
  TORCH_CHECK_VALUE(num_chunks <= std::numeric_limits<int32_t>::max(),
                    "sinkhorn: logits has too many tokens (G * T = ", shape.groups * shape.tokens,
                    ") for one CUDA launch");
  const at::Tensor chunk_max = at::empty({num_chunks, shape.experts}, row_potentials.options());
  const at::Tensor chunk_sum = at::empty({num_chunks, shape.experts}, row_potentials.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "visionmoe_sinkhorn_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t column_mass = log_column_mass<opmath_t>(shape);
    for (int64_t k = 0; k < shape.iterations; ++k) {
      forward_chunk_kernel<scalar_t, opmath_t><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
          grid, k, logits.const_data_ptr<scalar_t>(), row_max.const_data_ptr<opmath_t>(),
          row_potentials.mutable_data_ptr<opmath_t>(), column_potentials.const_data_ptr<opmath_t>(),
          chunk_max.mutable_data_ptr<opmath_t>(), chunk_sum.mutable_data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_columns_kernel<opmath_t>
          <<<blocks_for(shape.groups * shape.experts, kMergeThreads), kMergeThreads, 0, stream>>>(
              shape.groups, shape.experts, shape.iterations, grid.chunks_per_group, k, column_mass,
              chunk_max.const_data_ptr<opmath_t>(), chunk_sum.const_data_ptr<opmath_t>(),
              column_potentials.mutable_data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    log_plan_kernel<scalar_t, opmath_t><<<elementwise_blocks(logits.numel()), 256, 0, stream>>>(
        shape.groups, shape.tokens, shape.experts, shape.iterations, logits.const_data_ptr<scalar_t>(),
        row_max.const_data_ptr<opmath_t>(), row_potentials.const_data_ptr<opmath_t>(),
        column_potentials.const_data_ptr<opmath_t>(), log_plan.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward(const SinkhornShape& shape, const at::Tensor& grad_log_plan, const at::Tensor& logits,
              const at::Tensor& row_max, const at::Tensor& row_potentials, const at::Tensor& column_potentials,
              at::Tensor& grad_logits) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ChunkGrid grid = make_grid(shape);
  const int64_t num_chunks = shape.groups * grid.chunks_per_group;
  TORCH_CHECK_VALUE(num_chunks <= std::numeric_limits<int32_t>::max(),
                    "sinkhorn_backward: logits has too many tokens (G * T = ", shape.groups * shape.tokens,
                    ") for one CUDA launch");
  const auto opmath_options = row_potentials.options();
  const at::Tensor chunk_partial = at::empty({num_chunks, shape.experts}, opmath_options);
  const at::Tensor column_adjoint = at::empty({shape.groups, shape.experts}, opmath_options);
  const unsigned merge_blocks = blocks_for(shape.groups * shape.experts, kMergeThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "visionmoe_sinkhorn_bwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t column_mass = log_column_mass<opmath_t>(shape);
    // dLoss/dL gathers 2K terms in opmath, which for float32 and float64 is grad_logits itself.
    at::Tensor grad_buffer = std::is_same_v<scalar_t, opmath_t> ? grad_logits : at::empty_like(logits, opmath_options);
    opmath_t* grad = grad_buffer.mutable_data_ptr<opmath_t>();
    backward_init_kernel<scalar_t, opmath_t><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
        grid, grad_log_plan.const_data_ptr<scalar_t>(), grad, chunk_partial.mutable_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_chunks_kernel<opmath_t><<<merge_blocks, kMergeThreads, 0, stream>>>(
        shape.groups, shape.experts, grid.chunks_per_group, chunk_partial.const_data_ptr<opmath_t>(),
        column_adjoint.mutable_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t k = shape.iterations - 1; k >= 0; --k) {
      backward_chunk_kernel<scalar_t, opmath_t><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
          grid, k, column_mass, grad_log_plan.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
          row_max.const_data_ptr<opmath_t>(), row_potentials.const_data_ptr<opmath_t>(),
          column_potentials.const_data_ptr<opmath_t>(), column_adjoint.const_data_ptr<opmath_t>(), grad,
          chunk_partial.mutable_data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // a_v^{k-1}; v^0 is a constant, so the first iteration's row step ends the chain.
      if (k > 0) {
        sum_chunks_kernel<opmath_t><<<merge_blocks, kMergeThreads, 0, stream>>>(
            shape.groups, shape.experts, grid.chunks_per_group, chunk_partial.const_data_ptr<opmath_t>(),
            column_adjoint.mutable_data_ptr<opmath_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (!grad_buffer.is_same(grad_logits)) grad_logits.copy_(grad_buffer);
  });
}

}  // namespace visionmoe::sinkhorn::cuda

namespace visionmoe::sinkhorn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_cuda(const at::Tensor& logits, int64_t num_iterations,
                                                             bool validate) {
  return run_sinkhorn(&cuda::forward, logits, num_iterations, validate);
}

at::Tensor sinkhorn_backward_cuda(const at::Tensor& grad_log_plan, const at::Tensor& logits,
                                  const at::Tensor& row_potentials, const at::Tensor& column_potentials) {
  return run_sinkhorn_backward(&cuda::backward, grad_log_plan, logits, row_potentials, column_potentials);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}

}  // namespace visionmoe::sinkhorn
