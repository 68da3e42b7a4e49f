// CUDA kernels of the grouped expert MLP, all ATen calls (no kernels of our own):
//   padded [E, C, D]: batched GEMMs (at::bmm) over [E, C, *]; no offsets are involved.
//   packed [M, D]:    torch's grouped GEMM (at::_grouped_mm, offsets on the device) for bfloat16 when this torch
//                     has it and D and F are multiples of 8 (its 16-byte alignment): torch runs its CUTLASS kernel,
//                     without a host synchronisation, on sm90/sm100, and elsewhere its own fallback, which reads
//                     the offsets on the host. Other dtypes copy the offsets to the host once per call (one
//                     synchronisation) and run the per-expert loop of expert_mlp.cpp, experts in order.
// The bias adds and activations are ATen elementwise passes over whole tensors (the packed layout's biases
// gathered per row), not fused into the GEMMs' epilogues; this code is compile-checked only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "expert_mlp/expert_mlp.h"

#if __has_include(<ATen/ops/_grouped_mm.h>)
#define VISIONMOE_HAS_GROUPED_MM 1
#endif

namespace visionmoe::expert_mlp::cuda {
namespace {

// The experts one after another: their GEMMs queue on the current stream.
void for_each_expert_in_order(const std::vector<int64_t>& offsets, c10::function_ref<void(int64_t)> body) {
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t e = 0; e < num_experts; ++e) body(e);
}

#ifdef VISIONMOE_HAS_GROUPED_MM
// torch's grouped GEMM takes bfloat16 operands whose rows and base addresses are 16-byte aligned, and at least
// one row, one expert and one column of each operand.
bool use_grouped_mm(std::initializer_list<at::Tensor> operands, const Sizes& sizes) {
  if (operands.begin()->scalar_type() != at::kBFloat16 || sizes.dim % 8 != 0 || sizes.hidden % 8 != 0 ||
      sizes.rows == 0 || sizes.experts == 0 || sizes.dim == 0 || sizes.hidden == 0) {
    return false;
  }
  return std::all_of(operands.begin(), operands.end(),
                     [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; });
}

// The grouped GEMM's group ends, int32 on the device, clamped into [0, M] and made non-decreasing so that
// offsets that were not validated (that would take a synchronisation) can never index outside x.
at::Tensor group_ends(const at::Tensor& expert_offsets, int64_t rows) {
  const int64_t experts = expert_offsets.size(0) - 1;
  return std::get<0>(expert_offsets.narrow(0, 1, experts).clamp(0, rows).cummax(0));
}

// Expert of every row [M], for the bias adds.
at::Tensor row_experts(const at::Tensor& ends, int64_t rows) {
  const at::Tensor row = at::arange(rows, ends.options());
  return at::searchsorted(ends, row, /*out_int32=*/false, /*right=*/true).clamp_max_(ends.size(0) - 1);
}

// Column sums of rows [M, N] per expert -> [E, N], without reading the offsets on the host.
at::Tensor segment_sums(const at::Tensor& rows, const at::Tensor& ends) {
  const at::Tensor starts_and_ends = at::cat({at::zeros({1}, ends.options()), ends});
  return at::segment_reduce(rows, "sum", /*lengths=*/std::nullopt, /*indices=*/std::nullopt, starts_and_ends,
                            /*axis=*/0, /*unsafe=*/true, /*initial=*/0);
}

std::tuple<at::Tensor, at::Tensor> grouped_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                                   const at::Tensor& w2, const at::Tensor& b2,
                                                   const at::Tensor& expert_offsets, Activation activation,
                                                   const Sizes& sizes) {
  const at::Tensor ends = group_ends(expert_offsets, sizes.rows);
  const at::Tensor ends_int = ends.to(at::kInt);
  const at::Tensor experts = row_experts(ends, sizes.rows);
  at::Tensor pre = at::_grouped_mm(x, w1, ends_int);
  at::Tensor hidden = at::empty({sizes.rows, sizes.hidden}, x.options());
  bias_activation_(pre, b1.index_select(0, experts), hidden, activation);
  at::Tensor y = at::_grouped_mm(hidden, w2, ends_int);
  y.add_(b2.index_select(0, experts));
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    const at::Tensor& expert_offsets, Activation activation, const Sizes& sizes) {
  const at::Tensor ends = group_ends(expert_offsets, sizes.rows);
  const at::Tensor ends_int = ends.to(at::kInt);
  const at::Tensor grad_hidden = at::_grouped_mm(grad_y, w2.transpose(1, 2), ends_int);
  at::Tensor grad_pre = at::empty_like(pre);
  at::Tensor hidden = at::empty({sizes.rows, sizes.hidden}, x.options());
  activation_backward(grad_hidden, pre, grad_pre, hidden, activation);
  // An expert without rows has an empty reduction dimension in the weight-gradient GEMMs; its gradients are
  // zeroed explicitly rather than relying on how the grouped kernel treats K = 0.
  const at::Tensor starts = at::cat({at::zeros({1}, ends.options()), ends.narrow(0, 0, sizes.experts - 1)});
  const at::Tensor no_rows = ends.le(starts).view({sizes.experts, 1, 1});
  at::Tensor grad_w2 = at::_grouped_mm(hidden.t(), grad_y, ends_int).masked_fill_(no_rows, 0);
  at::Tensor grad_w1 = at::_grouped_mm(x.t(), grad_pre, ends_int).masked_fill_(no_rows, 0);
  at::Tensor grad_x = at::_grouped_mm(grad_pre, w1.transpose(1, 2), ends_int);
  return {grad_x, grad_w1, segment_sums(grad_pre, ends), grad_w2, segment_sums(grad_y, ends)};
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                           const at::Tensor& w2, const at::Tensor& b2,
                                           const std::optional<at::Tensor>& expert_offsets, Activation activation,
                                           const Sizes& sizes) {
  if (sizes.padded) {
    at::Tensor pre = at::bmm(x, w1);
    at::Tensor hidden = at::empty({sizes.experts, x.size(1), sizes.hidden}, x.options());
    bias_activation_(pre, b1.unsqueeze(1), hidden, activation);
    return {at::baddbmm(b2.unsqueeze(1), hidden, w2), pre};
  }
#ifdef VISIONMOE_HAS_GROUPED_MM
  if (use_grouped_mm({x, w1, w2}, sizes)) {
    return grouped_forward(x, w1, b1, w2, b2, *expert_offsets, activation, sizes);
  }
#endif
  return segments_forward("expert_mlp", &for_each_expert_in_order, x, w1, b1, w2, b2, expert_offsets, activation,
                          sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    const std::optional<at::Tensor>& expert_offsets, Activation activation, const Sizes& sizes) {
  if (sizes.padded) {
    const at::Tensor grad_hidden = at::bmm(grad_y, w2.transpose(1, 2));
    at::Tensor grad_pre = at::empty_like(pre);
    at::Tensor hidden = at::empty(grad_hidden.sizes(), x.options());
    activation_backward(grad_hidden, pre, grad_pre, hidden, activation);
    return {at::bmm(grad_pre, w1.transpose(1, 2)), at::bmm(x.transpose(1, 2), grad_pre), grad_pre.sum(1),
            at::bmm(hidden.transpose(1, 2), grad_y), grad_y.sum(1)};
  }
#ifdef VISIONMOE_HAS_GROUPED_MM
  if (use_grouped_mm({x, w1, w2, grad_y, pre}, sizes)) {
    return grouped_backward(grad_y, x, w1, w2, pre, *expert_offsets, activation, sizes);
  }
#endif
  return segments_backward("expert_mlp_backward", &for_each_expert_in_order, grad_y, x, w1, w2, pre, expert_offsets,
                           activation, sizes);
}

}  // namespace visionmoe::expert_mlp::cuda

namespace visionmoe::expert_mlp {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_mlp_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                                   const at::Tensor& w2, const at::Tensor& b2,
                                                   const std::optional<at::Tensor>& expert_offsets,
                                                   c10::string_view activation) {
  return run_expert_mlp(&cuda::forward, x, w1, b1, w2, b2, expert_offsets, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, c10::string_view activation) {
  return run_expert_mlp_backward(&cuda::backward, grad_y, x, w1, w2, pre_activation, expert_offsets, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("expert_mlp", &expert_mlp_cuda);
  m.impl("expert_mlp_backward", &expert_mlp_backward_cuda);
}

}  // namespace visionmoe::expert_mlp
