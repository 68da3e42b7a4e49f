// Soft MoE dispatch and combine (Puigcerver et al. 2023): dense mixing of tokens into slots and back.
//
// Per group g (e.g. one image) of T tokens, with logits L [G, T, S] over S = E * P slots:
//   dispatch  W = softmax over tokens of L (each slot's column sums to 1)   slots = W^T x      [G, S, D]
//   combine   C = softmax over slots of L (each token's row sums to 1)     out   = C y        [G, T, D]
// Each operator computes its softmax and its mixing in one call and keeps nothing: autograd saves only the
// inputs, and the backward operators recompute the softmax instead of storing it ([G, T, S] per call).
//
// Backward (the sums in grad_L run along the softmax's axis):
//   dispatch  grad_x = W grad_slots;   Gm = x grad_slots^T;  grad_L = W * (Gm - sum_t W * Gm)
//   combine   grad_y = C^T grad_out;   H  = grad_out y^T;    grad_L = C * (H - sum_s C * H)
//
// The GEMMs are ATen batched matmuls and the softmaxes ATen's, which run on every backend and dispatch to
// the CPU's best vector ISA at run time; for float16/bfloat16 the softmax and its backward are computed in
// float32 and rounded once, to the input's dtype, at the end.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace visionmoe::soft_moe {

// x [G, T, D], logits [G, T, S] -> slots [G, S, D].
at::Tensor soft_dispatch(const at::Tensor& x, const at::Tensor& logits);
// grad_slots [G, S, D] -> (grad_x [G, T, D], grad_logits [G, T, S]).
std::tuple<at::Tensor, at::Tensor> soft_dispatch_backward(const at::Tensor& grad_slots, const at::Tensor& x,
                                                          const at::Tensor& logits);
// y [G, S, D], logits [G, T, S] -> out [G, T, D].
at::Tensor soft_combine(const at::Tensor& y, const at::Tensor& logits);
// grad_out [G, T, D] -> (grad_y [G, S, D], grad_logits [G, T, S]).
std::tuple<at::Tensor, at::Tensor> soft_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& logits);

// Registers the four operators above in `m`, a TORCH_LIBRARY_IMPL block of one backend: the bodies are ATen and
// serve every backend, so each backend's file registers them with this one list.
void impl_kernels(torch::Library& m);

}  // namespace visionmoe::soft_moe
