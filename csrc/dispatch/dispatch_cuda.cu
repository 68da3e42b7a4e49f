// CUDA kernels of the dispatch family. Row kernels give each expert or token row to one warp, which moves it in
// 16-byte packs; sums over a token's assignments run in a fixed order, so every kernel here is deterministic and
// none uses floating-point atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <limits>

#include "common/warp_reduce.cuh"
#include "dispatch/dispatch.h"

namespace visionmoe::dispatch::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Plans are not validated here (that would take a synchronisation): an index that points outside the tensors
// makes its row or term count as empty instead (see dispatch.h).
__device__ __forceinline__ bool is_token(const PlanView& plan, int64_t token) {
  return token >= 0 && token < plan.num_tokens;
}

// ---- grouping assignments by expert: a histogram, a scan of E counts, then one stable compaction per expert ----

__global__ void count_experts_kernel(const int64_t* __restrict__ expert_index, int64_t n, int64_t num_experts,
                                     unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int block_counts[];
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = expert_index[i];
    CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts);
    atomicAdd(&block_counts[e], 1u);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    if (block_counts[e] != 0) atomicAdd(&counts[e], static_cast<unsigned long long>(block_counts[e]));
  }
}

// Block e walks all assignments in order and keeps those of expert e; a block-wide exclusive scan gives each
// kept assignment its rank, which is its slot, so earlier assignments keep priority.
__global__ void compact_expert_kernel(const int64_t* __restrict__ token_index, const int64_t* __restrict__ expert_index,
                                      int64_t n, const int64_t* __restrict__ offsets, int64_t* __restrict__ order,
                                      int64_t* __restrict__ sorted_token, int64_t* __restrict__ sorted_expert,
                                      int64_t* __restrict__ slot) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int64_t e = blockIdx.x;
  const int64_t base = offsets[e];
  int64_t rank_base = 0;
  constexpr int64_t kTile = int64_t(kScanThreads) * kScanItems;
  for (int64_t tile = 0; tile < n; tile += kTile) {
    const int64_t first = tile + int64_t(threadIdx.x) * kScanItems;
    int mine = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) mine += (first + k < n && expert_index[first + k] == e) ? 1 : 0;
    int before = 0, tile_total = 0;
    BlockScan(scan_storage).ExclusiveSum(mine, before, tile_total);
    int64_t rank = rank_base + before;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t i = first + k;
      if (i < n && expert_index[i] == e) {
        const int64_t p = base + rank;
        order[p] = i;
        sorted_token[p] = token_index[i];
        sorted_expert[p] = e;
        slot[p] = rank;
        ++rank;
      }
    }
    rank_base += tile_total;
    __syncthreads();  // scan_storage is reused by the next tile
  }
}

// ---- row kernels ----

template <typename scalar_t, int VEC>
__global__ void gather_rows_kernel(PlanView plan, const scalar_t* __restrict__ x, scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, VEC>;
  const int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (r >= plan.num_rows()) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = plan.dim / VEC;
  P* dst = reinterpret_cast<P*>(out + r * plan.dim);
  const int64_t a = assignment_of_row(plan, r);
  const int64_t token = a < 0 ? -1 : plan.sorted_token[a];
  if (!is_token(plan, token)) {
    P zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.v[k] = scalar_t(0);
    for (int64_t i = lane; i < packs; i += kWarp) dst[i] = zero;
    return;
  }
  const P* src = reinterpret_cast<const P*>(x + token * plan.dim);
  for (int64_t i = lane; i < packs; i += kWarp) dst[i] = src[i];
}

template <typename scalar_t, int VEC>
__global__ void sum_rows_per_token_kernel(PlanView plan, const scalar_t* __restrict__ rows,
                                          const scalar_t* __restrict__ weight, scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, VEC>;
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (t >= plan.num_tokens) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = plan.dim / VEC;
  const int64_t first = plan.token_offsets[t] < 0 ? 0 : plan.token_offsets[t];
  const int64_t end = plan.token_offsets[t + 1];
  const int64_t last = end > plan.num_assignments ? plan.num_assignments : end;
  P* dst = reinterpret_cast<P*>(out + t * plan.dim);
  for (int64_t i = lane; i < packs; i += kWarp) {
    opmath_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = opmath_t(0);
    for (int64_t j = first; j < last; ++j) {
      const int64_t a = plan.token_rows[j];
      if (a < 0 || a >= plan.num_assignments) continue;
      const int64_t row = row_of_assignment(plan, a);
      if (row < 0) continue;
      const opmath_t w = weight == nullptr ? opmath_t(1) : static_cast<opmath_t>(weight[a]);
      const P p = reinterpret_cast<const P*>(rows + row * plan.dim)[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += w * static_cast<opmath_t>(p.v[k]);
    }
    P result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) result.v[k] = static_cast<scalar_t>(acc[k]);
    dst[i] = result;
  }
}

template <typename scalar_t, int VEC>
__global__ void combine_backward_kernel(PlanView plan, const scalar_t* __restrict__ grad_y,
                                        const scalar_t* __restrict__ expert_out, const scalar_t* __restrict__ weight,
                                        scalar_t* __restrict__ grad_expert_out, scalar_t* __restrict__ grad_weight) {
  using P = Pack<scalar_t, VEC>;
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (r >= plan.num_rows()) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = plan.dim / VEC;
  P* grad_row = reinterpret_cast<P*>(grad_expert_out + r * plan.dim);
  const int64_t a = assignment_of_row(plan, r);
  const int64_t token = a < 0 ? -1 : plan.sorted_token[a];
  if (!is_token(plan, token)) {
    P zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.v[k] = scalar_t(0);
    for (int64_t i = lane; i < packs; i += kWarp) grad_row[i] = zero;
    return;
  }
  const P* g = reinterpret_cast<const P*>(grad_y + token * plan.dim);
  const P* out_row = reinterpret_cast<const P*>(expert_out + r * plan.dim);
  const opmath_t w = static_cast<opmath_t>(weight[a]);
  opmath_t dot = 0;
  for (int64_t i = lane; i < packs; i += kWarp) {
    const P gp = g[i];
    const P op = out_row[i];
    P result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const opmath_t gk = static_cast<opmath_t>(gp.v[k]);
      result.v[k] = static_cast<scalar_t>(w * gk);
      dot += gk * static_cast<opmath_t>(op.v[k]);
    }
    grad_row[i] = result;
  }
  // Lane 0's sum, the one written, is the butterfly's as before; the broadcast to the other lanes goes unused.
  dot = warp_reduce::warp_sum(dot);
  if (lane == 0) grad_weight[a] = static_cast<scalar_t>(dot);
}

// The widest pack (up to 16 bytes) that divides the row and keeps every pointer aligned.
template <typename scalar_t>
int pack_width(int64_t dim, std::initializer_list<const void*> pointers) {
  for (int width = 16 / int(sizeof(scalar_t)); width > 1; width /= 2) {
    bool ok = dim % width == 0;
    for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % (width * sizeof(scalar_t)) == 0;
    if (ok) return width;
  }
  return 1;
}

// Calls body with the pack width as a compile-time constant.
template <typename scalar_t, typename Body>
void with_pack_width(int width, Body&& body) {
  switch (width) {
    case 8:
      if constexpr (16 / sizeof(scalar_t) >= 8) {
        body(std::integral_constant<int, 8>{});
        return;
      }
      break;
    case 4:
      if constexpr (16 / sizeof(scalar_t) >= 4) {
        body(std::integral_constant<int, 4>{});
        return;
      }
      break;
    case 2:
      body(std::integral_constant<int, 2>{});
      return;
    default:
      break;
  }
  body(std::integral_constant<int, 1>{});
}

dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)); }

}  // namespace

void group_by_expert(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
                     at::Tensor& order, at::Tensor& sorted_token, at::Tensor& sorted_expert, at::Tensor& slot,
                     at::Tensor& offsets) {
  const int64_t n = expert_index.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({num_experts}, expert_index.options());
  offsets.zero_();
  if (n > 0) {
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 1024));
    const size_t shared = sizeof(unsigned int) * num_experts;
    TORCH_CHECK_VALUE(shared <= 48 * 1024, "make_plan: num_experts must be at most ", 48 * 1024 / sizeof(unsigned int),
                      " on CUDA, got ", num_experts);
    count_experts_kernel<<<blocks, threads, shared, stream>>>(
        expert_index.const_data_ptr<int64_t>(), n, num_experts,
        reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  offsets.narrow(0, 1, num_experts).copy_(counts.cumsum(0));
  if (n > 0) {
    compact_expert_kernel<<<static_cast<unsigned>(num_experts), kScanThreads, 0, stream>>>(
        token_index.const_data_ptr<int64_t>(), expert_index.const_data_ptr<int64_t>(), n,
        offsets.const_data_ptr<int64_t>(), order.mutable_data_ptr<int64_t>(), sorted_token.mutable_data_ptr<int64_t>(),
        sorted_expert.mutable_data_ptr<int64_t>(), slot.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void gather_rows(const PlanView& plan, const at::Tensor& x, at::Tensor& out) {
  if (out.numel() == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "visionmoe_dispatch_cuda", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    with_pack_width<scalar_t>(pack_width<scalar_t>(plan.dim, {src, dst}), [&](auto width) {
      gather_rows_kernel<scalar_t, decltype(width)::value>
          <<<row_grid(plan.num_rows()), kWarp * kWarpsPerBlock, 0, stream>>>(plan, src, dst);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sum_rows_per_token(const PlanView& plan, const at::Tensor& rows, const at::Tensor* weight, at::Tensor& out) {
  if (out.numel() == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "visionmoe_combine_cuda", [&] {
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    const scalar_t* w = weight == nullptr ? nullptr : weight->const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    with_pack_width<scalar_t>(pack_width<scalar_t>(plan.dim, {src, dst}), [&](auto width) {
      sum_rows_per_token_kernel<scalar_t, decltype(width)::value>
          <<<row_grid(plan.num_tokens), kWarp * kWarpsPerBlock, 0, stream>>>(plan, src, w, dst);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void combine_backward(const PlanView& plan, const at::Tensor& grad_y, const at::Tensor& expert_out,
                      const at::Tensor& weight, at::Tensor& grad_expert_out, at::Tensor& grad_weight) {
  // Dropped assignments are never visited by a row and get no gradient.
  grad_weight.zero_();
  if (grad_expert_out.numel() == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, expert_out.scalar_type(), "visionmoe_combine_bwd_cuda", [&] {
        const scalar_t* g = grad_y.const_data_ptr<scalar_t>();
        const scalar_t* src = expert_out.const_data_ptr<scalar_t>();
        scalar_t* grad_src = grad_expert_out.mutable_data_ptr<scalar_t>();
        with_pack_width<scalar_t>(pack_width<scalar_t>(plan.dim, {g, src, grad_src}), [&](auto width) {
          combine_backward_kernel<scalar_t, decltype(width)::value>
              <<<row_grid(plan.num_rows()), kWarp * kWarpsPerBlock, 0, stream>>>(
                  plan, g, src, weight.const_data_ptr<scalar_t>(), grad_src, grad_weight.mutable_data_ptr<scalar_t>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

namespace {

// Above this many experts, CUDA grouping sorts instead of compacting once per expert.
constexpr int64_t kMaxExpertsForCompaction = 256;

// One synchronising read; make_plan callers whose indices are valid by construction (routers) skip it.
void validate_indices_on_device(const at::Tensor& index, int64_t bound, const char* name) {
  const at::Tensor bad = index.lt(0).logical_or_(index.ge(bound));
  if (!bad.any().item<bool>()) return;
  const int64_t position = bad.to(at::kByte).argmax().item<int64_t>();
  TORCH_CHECK_VALUE(false, "make_plan: ", name, " out of range: ", name, "[", position,
                    "] = ", index[position].item<int64_t>(), ", expected values in [0, ", bound, ")");
}

}  // namespace

void make_plan(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
               std::optional<int64_t> num_tokens, bool validate, at::Tensor& order, at::Tensor& sorted_token,
               at::Tensor& sorted_expert, at::Tensor& slot, at::Tensor& offsets) {
  if (validate) {
    validate_indices_on_device(expert_index, num_experts, "expert_index");
    validate_indices_on_device(token_index, num_tokens.value_or(std::numeric_limits<int64_t>::max()), "token_index");
  }
  if (num_experts <= kMaxExpertsForCompaction) {
    group_by_expert(token_index, expert_index, num_experts, order, sorted_token, sorted_expert, slot, offsets);
  } else {
    // One block per expert would read every assignment E times; a stable radix sort reads them a few times.
    const int64_t n = token_index.size(0);
    const auto index_options = token_index.options();
    const auto [keys, positions] = expert_index.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    order.copy_(positions);
    sorted_expert.copy_(keys);
    sorted_token.copy_(token_index.index_select(0, positions));
    offsets.copy_(at::searchsorted(keys, at::arange(num_experts + 1, index_options)));
    slot.copy_(at::arange(n, index_options) - offsets.index_select(0, keys));
  }
}

std::tuple<at::Tensor, at::Tensor> token_major(const at::Tensor& sorted_token, int64_t num_tokens) {
  // A stable radix sort keeps each token's assignments in increasing order, so sums over them are
  // deterministic; tokens outside [0, T) fall outside every segment and are ignored.
  const auto [tokens, rows] = sorted_token.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor token_offsets = at::searchsorted(tokens, at::arange(num_tokens + 1, sorted_token.options()));
  return {token_offsets, rows};
}

}  // namespace visionmoe::dispatch::cuda

namespace visionmoe::dispatch {
namespace {

// The CUDA kernel reports nothing by operator name (its checks are the host's), so it takes no op.
void sum_rows_per_token_cuda(const char* /*op*/, const PlanView& plan, const at::Tensor& rows, const at::Tensor* weight,
                             at::Tensor& out) {
  cuda::sum_rows_per_token(plan, rows, weight, out);
}

}  // namespace
}  // namespace visionmoe::dispatch

namespace visionmoe::dispatch {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_cuda(const at::Tensor& token_index,
                                                                                      const at::Tensor& expert_index,
                                                                                      int64_t num_experts,
                                                                                      std::optional<int64_t> num_tokens,
                                                                                      bool validate) {
  return run_make_plan(&cuda::make_plan, token_index, expert_index, num_experts, num_tokens, validate);
}

std::tuple<at::Tensor, at::Tensor> token_major_cuda(const at::Tensor& sorted_token, int64_t num_tokens) {
  return run_token_major(&cuda::token_major, sorted_token, num_tokens);
}

at::Tensor dispatch_cuda(const at::Tensor& x, const at::Tensor& sorted_token, const at::Tensor& sorted_expert,
                         const at::Tensor& slot, const at::Tensor& offsets, const at::Tensor& token_offsets,
                         const at::Tensor& token_rows, std::optional<int64_t> capacity, bool padded, bool validate) {
  return run_dispatch(&cuda::gather_rows, x, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows,
                      capacity, padded, validate);
}

at::Tensor dispatch_backward_cuda(const at::Tensor& grad_out, const at::Tensor& sorted_token,
                                  const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                                  const at::Tensor& token_offsets, const at::Tensor& token_rows,
                                  std::optional<int64_t> capacity) {
  return run_dispatch_backward(&sum_rows_per_token_cuda, grad_out, sorted_token, sorted_expert, slot, offsets,
                               token_offsets, token_rows, capacity);
}

at::Tensor combine_cuda(const at::Tensor& expert_out, const at::Tensor& weight, const at::Tensor& sorted_token,
                        const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                        const at::Tensor& token_offsets, const at::Tensor& token_rows, std::optional<int64_t> capacity,
                        bool validate) {
  return run_combine(&sum_rows_per_token_cuda, expert_out, weight, sorted_token, sorted_expert, slot, offsets,
                     token_offsets, token_rows, capacity, validate);
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                                         const at::Tensor& weight, const at::Tensor& sorted_token,
                                                         const at::Tensor& sorted_expert, const at::Tensor& slot,
                                                         const at::Tensor& offsets, std::optional<int64_t> capacity) {
  return run_combine_backward(&cuda::combine_backward, grad_y, expert_out, weight, sorted_token, sorted_expert, slot,
                              offsets, capacity);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("make_plan", &make_plan_cuda);
  m.impl("token_major", &token_major_cuda);
  m.impl("dispatch", &dispatch_cuda);
  m.impl("dispatch_backward", &dispatch_backward_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
}

}  // namespace visionmoe::dispatch
