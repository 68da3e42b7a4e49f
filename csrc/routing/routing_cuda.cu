// CUDA selection kernel of the routing family: one thread per token keeps its k best experts in registers
// (k <= kMaxK), ties to the lower expert index. Grouping and ordering are ATen steps in routing.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "routing/routing.h"

namespace visionmoe::routing::cuda {
namespace {

template <typename scalar_t>
__global__ void select_topk_kernel(const scalar_t* __restrict__ scores, int64_t num_tokens, int64_t num_experts,
                                   int64_t k, int64_t* __restrict__ experts, scalar_t* __restrict__ top_score) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t token = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (token >= num_tokens) return;
  // Kept sorted, best first; the candidate sweeps down the list and swaps in where it is strictly better, so
  // equal scores keep the earlier (lower) expert. Loops are unrolled so the arrays stay in registers.
  opmath_t best_value[kMaxK];
  int64_t best_expert[kMaxK];
#pragma unroll
  for (int64_t i = 0; i < kMaxK; ++i) {
    best_value[i] = -std::numeric_limits<opmath_t>::infinity();
    best_expert[i] = i;
  }
  const scalar_t* row = scores + token * num_experts;
  for (int64_t e = 0; e < num_experts; ++e) {
    opmath_t value = static_cast<opmath_t>(row[e]);
    int64_t expert = e;
#pragma unroll
    for (int64_t i = 0; i < kMaxK; ++i) {
      if (i < k && value > best_value[i]) {
        const opmath_t displaced_value = best_value[i];
        const int64_t displaced_expert = best_expert[i];
        best_value[i] = value;
        best_expert[i] = expert;
        value = displaced_value;
        expert = displaced_expert;
      }
    }
  }
#pragma unroll
  for (int64_t i = 0; i < kMaxK; ++i) {
    if (i < k) experts[token * k + i] = best_expert[i];
  }
  // -0 becomes +0: the Batch Priority sort of long rows is a radix sort on the bits, which may rank -0 after +0.
  const scalar_t top = row[best_expert[0]];
  top_score[token] = static_cast<opmath_t>(top) == opmath_t(0) ? scalar_t(0) : top;
}

}  // namespace

void select_topk(const at::Tensor& scores, int64_t k, at::Tensor& experts, at::Tensor& top_score) {
  const int64_t num_tokens = scores.size(0) * scores.size(1);
  if (num_tokens == 0) return;
  const int threads = 128;
  const auto blocks = static_cast<unsigned>((num_tokens + threads - 1) / threads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "visionmoe_select_topk_cuda", [&] {
    select_topk_kernel<scalar_t><<<blocks, threads, 0, stream>>>(scores.const_data_ptr<scalar_t>(), num_tokens,
                                                                 scores.size(2), k, experts.mutable_data_ptr<int64_t>(),
                                                                 top_score.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace visionmoe::routing::cuda

namespace visionmoe::routing {
namespace {

PlanTuple topk_route_cuda(const at::Tensor& scores_in, int64_t k, bool batch_priority) {
  const at::Tensor scores = check_topk_route(scores_in, k);
  TORCH_CHECK_VALUE(k <= cuda::kMaxK, "topk_route: k must be at most ", cuda::kMaxK, " on CUDA, got ", k);
  const c10::DeviceGuard guard(scores.device());
  const int64_t num_tokens = scores.size(0) * scores.size(1);
  at::Tensor experts = at::empty({num_tokens, k}, scores.options().dtype(at::kLong));
  at::Tensor top_score = at::empty({num_tokens}, scores.options());
  cuda::select_topk(scores, k, experts, top_score);
  return plan_from_choices(scores, k, batch_priority, experts, top_score, &dispatch::cuda::make_plan,
                           &dispatch::cuda::token_major);
}

PlanTuple expert_choice_route_cuda(const at::Tensor& scores_in, int64_t capacity) {
  const at::Tensor scores = check_expert_choice_route(scores_in, capacity);
  const c10::DeviceGuard guard(scores.device());
  // Adding +0 turns -0 into +0, which ties it with +0 (lower token first, as on the CPU): torch's radix sort of
  // long columns orders floats by their bits, which may rank -0 below +0.
  const at::Tensor tokens =
      std::get<1>(scores.transpose(1, 2).add(0).sort(/*stable=*/true, /*dim=*/2, /*descending=*/true))
          .narrow(2, 0, tokens_taken(scores, capacity));
  return plan_from_top_tokens(scores, tokens, &dispatch::cuda::token_major);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("topk_route", &topk_route_cuda);
  m.impl("expert_choice_route", &expert_choice_route_cuda);
}

}  // namespace visionmoe::routing
