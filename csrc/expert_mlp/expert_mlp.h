// Grouped expert MLPs: every expert e applies Linear(D -> F), an activation and Linear(F -> D) to its own rows.
//
// Weights: w1 [E, D, F'], b1 [E, F'], w2 [E, F, D], b2 [E, D], where F' = F for "gelu" (exact erf GELU) and
// F' = 2F for "silu_gated" (SwiGLU: the first F columns of x w1 + b1 are the gate g, the last F the value u,
// and the hidden activation is silu(g) * u).
//
// Rows come in one of two layouts:
//   padded [E, C, D]: expert e's rows are x[e] (capacity-padded; empty slots are zero rows whose outputs the
//                     combine ignores, so computing them is harmless);
//   packed [M, D]:    expert e's rows are x[offsets[e] : offsets[e + 1]], with expert_offsets [E + 1] int64 on
//                     x's device (offsets[0] = 0, non-decreasing, offsets[E] = M).
//
// The forward returns the pre-activation P = x w1 + b1 [rows, F'] beside y: autograd saves P (and x and the
// weights) and the backward recomputes the activation from it, an elementwise pass, instead of keeping the
// hidden activation too (as eager autograd does: two [rows, F] tensors) or recomputing the first GEMM (a
// seventh GEMM per forward + backward).
//
// Backward, per expert, with H = act(P):
//   grad_H = grad_y w2^T;  grad_P = grad_H * act'(P);  grad_w2 = H^T grad_y;  grad_b2 = sum_rows grad_y;
//   grad_w1 = x^T grad_P;  grad_b1 = sum_rows grad_P;  grad_x = grad_P w1^T.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace visionmoe::expert_mlp {

enum class Activation { kGelu, kSiluGated };

Activation parse_activation(const char* op, c10::string_view name);

// x [E, C, D] or [M, D] -> (y like x, pre_activation [E, C, F'] or [M, F']).
std::tuple<at::Tensor, at::Tensor> expert_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                              const at::Tensor& w2, const at::Tensor& b2,
                                              const std::optional<at::Tensor>& expert_offsets,
                                              c10::string_view activation);
// -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, c10::string_view activation);

// Bias and activation over a block of rows: pre += bias (broadcast over rows), hidden = act(pre). The block is
// meant to fit in cache, so that both steps make one trip through memory. Reduced dtypes are computed in float32
// and rounded once.
void bias_activation_(at::Tensor& pre, const at::Tensor& bias, at::Tensor& hidden, Activation activation);
// hidden = act(pre), grad_pre = grad_hidden * act'(pre), over a block of rows.
void activation_backward(const at::Tensor& grad_hidden, const at::Tensor& pre, at::Tensor& grad_pre,
                         at::Tensor& hidden, Activation activation);

// The per-expert GEMM loop over row segments [offsets[e], offsets[e + 1]) of 2-D rows, with the offsets on the
// host. On CPU the experts run in parallel (at::parallel_for; the GEMMs inside run single-threaded); elsewhere
// they run in order. Every tensor is checked, contiguous and allocated by the caller.
struct SegmentTensors {
  const at::Tensor& w1;  // [E, D, F']
  const at::Tensor& b1;  // [E, F']
  const at::Tensor& w2;  // [E, F, D]
  const at::Tensor& b2;  // [E, D]
};
void segments_forward(const at::Tensor& x, const SegmentTensors& weights, const std::vector<int64_t>& offsets,
                      Activation activation, at::Tensor& y, at::Tensor& pre);
void segments_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       const at::Tensor& pre, const std::vector<int64_t>& offsets, Activation activation,
                       at::Tensor& grad_x, at::Tensor& grad_w1, at::Tensor& grad_b1, at::Tensor& grad_w2,
                       at::Tensor& grad_b2);

}  // namespace visionmoe::expert_mlp
