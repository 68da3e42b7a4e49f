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
#include <c10/util/FunctionRef.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace visionmoe::expert_mlp {

enum class Activation { kGelu, kSiluGated };

Activation parse_activation(const char* op, c10::string_view name);

// Sizes of one call: E experts, D width, F hidden width, F' = F or 2F columns of x w1.
struct Sizes {
  int64_t experts = 0;
  int64_t dim = 0;
  int64_t hidden = 0;
  int64_t pre_width = 0;
  bool padded = false;
  int64_t rows = 0;  // M, or E * C when padded
};

// Backend kernels. Every argument is checked and contiguous, and a guard for x's device is held, before these run;
// the packed layout's expert_offsets are checked for shape, dtype and device but not for their values, which
// live on x's device.
// -> (y like x, pre_activation [E, C, F'] or [M, F']).
using ForwardKernel = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& x, const at::Tensor& w1,
                                                             const at::Tensor& b1, const at::Tensor& w2,
                                                             const at::Tensor& b2,
                                                             const std::optional<at::Tensor>& expert_offsets,
                                                             Activation activation, const Sizes& sizes);
// -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2).
using BackwardKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, Activation activation,
    const Sizes& sizes);

// Operator bodies shared by the backends (expert_mlp.cpp): argument checks naming the argument, contiguous
// copies, a device guard, then `kernel`. Each backend file passes its own kernel and registers the result with
// the dispatcher, so no host code branches on the device.
// x [E, C, D] or [M, D] -> (y like x, pre_activation [E, C, F'] or [M, F']).
std::tuple<at::Tensor, at::Tensor> run_expert_mlp(ForwardKernel kernel, const at::Tensor& x, const at::Tensor& w1,
                                                  const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                                  const std::optional<at::Tensor>& expert_offsets,
                                                  c10::string_view activation);
// -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_expert_mlp_backward(
    BackwardKernel kernel, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, c10::string_view activation);

// Bias and activation over a block of rows: pre += bias (broadcast over rows), hidden = act(pre). The block is
// meant to fit in cache, so that both steps make one trip through memory. Reduced dtypes are computed in float32
// and rounded once.
void bias_activation_(at::Tensor& pre, const at::Tensor& bias, at::Tensor& hidden, Activation activation);
// hidden = act(pre), grad_pre = grad_hidden * act'(pre), over a block of rows.
void activation_backward(const at::Tensor& grad_hidden, const at::Tensor& pre, at::Tensor& grad_pre, at::Tensor& hidden,
                         Activation activation);

// The per-expert GEMM loop over row segments [offsets[e], offsets[e + 1]) of the rows, with the offsets on the
// host (read and validated there: offsets[0] = 0, non-decreasing, offsets[E] = M; the padded layout is segments
// of C rows). Each expert's GEMMs are ATen GEMMs on views of its rows and weights; `for_each_expert` is the
// backend's schedule, which calls body(e) once for every expert e (the CPU runs experts in parallel, CUDA in
// order). `op` names the operator in errors.
using ExpertLoop = void (*)(const std::vector<int64_t>& offsets, c10::function_ref<void(int64_t)> body);
std::tuple<at::Tensor, at::Tensor> segments_forward(const char* op, ExpertLoop for_each_expert, const at::Tensor& x,
                                                    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                                    const at::Tensor& b2,
                                                    const std::optional<at::Tensor>& expert_offsets,
                                                    Activation activation, const Sizes& sizes);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> segments_backward(
    const char* op, ExpertLoop for_each_expert, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& pre, const std::optional<at::Tensor>& expert_offsets, Activation activation,
    const Sizes& sizes);

namespace cpu {
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                           const at::Tensor& w2, const at::Tensor& b2,
                                           const std::optional<at::Tensor>& expert_offsets, Activation activation,
                                           const Sizes& sizes);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, Activation activation,
    const Sizes& sizes);
}  // namespace cpu

#ifdef VISIONMOE_WITH_CUDA
namespace cuda {
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                           const at::Tensor& w2, const at::Tensor& b2,
                                           const std::optional<at::Tensor>& expert_offsets, Activation activation,
                                           const Sizes& sizes);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, Activation activation,
    const Sizes& sizes);
}  // namespace cuda
#endif

}  // namespace visionmoe::expert_mlp
