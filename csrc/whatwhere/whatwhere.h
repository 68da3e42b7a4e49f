// What-where attention (What-Where Transformer, arXiv 2605.12021; see PAPERS.md §5): tokens and slots attend
// to each other through one shared logit map, normalised along its two axes.
//
// Per head (b, h), with q [N, dh], k [S, dh], v_tokens [N, dv], v_slots [S, dv], where [N, S]:
//   L   = where + q k^T / sqrt(dh)                        logits [N, S], an output of its own
//   P_N = softmax of L over tokens (each column sums to 1)   P_S = softmax of L over slots (each row sums to 1)
//   token_update = P_N v_slots    [N, dv]                 slot_update = P_S^T v_tokens    [S, dv]
// The forward also returns, in opmath precision (float32 for float16, bfloat16 and float32; float64 for
// float64), the two log-sum-exps that normalise L:
//   token_logsumexp[n] = logsumexp_s L[n, s]   [N]     so that P_S[n, s] = exp(L[n, s] - token_logsumexp[n])
//   slot_logsumexp[s]  = logsumexp_n L[n, s]   [S]     so that P_N[n, s] = exp(L[n, s] - slot_logsumexp[s])
// Autograd saves the inputs, L (an output anyway) and these N + S numbers per head: the backward recomputes
// both probability tiles instead of keeping two [N, S] tensors alive from the forward to the backward. Every
// exponent is <= 0 up to rounding, so the recomputation cannot overflow. For float16 and bfloat16, L is rounded
// to the input dtype before it is normalised, so that the forward and the backward (which only has the rounded
// logits) normalise the same numbers.
//
// Backward, given T = dLoss/d token_update [N, dv], U = dLoss/d slot_update [S, dv] and Λ = dLoss/dL [N, S]
// (each may be absent, meaning zero):
//   dv_slots  = P_N^T T                      dv_tokens = P_S U
//   G_N = T v_slots^T [N, S]                 G_S = v_tokens U^T [N, S]        (dLoss/dP_N and dLoss/dP_S)
//   Softmax Jacobians, each along its own axis (the sums run over that axis):
//     over tokens: dL_N[n, s] = P_N[n, s] (G_N[n, s] - sum_n' P_N[n', s] G_N[n', s])
//     over slots:  dL_S[n, s] = P_S[n, s] (G_S[n, s] - sum_s' P_S[n, s'] G_S[n, s'])
//   dL = Λ + dL_N + dL_S;   dwhere = dL;   dq = dL k / sqrt(dh);   dk = dL^T q / sqrt(dh)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace visionmoe::whatwhere {

struct WhatWhereShape {
  int64_t heads = 0;      // B * H: independent (batch, head) pairs
  int64_t tokens = 0;     // N
  int64_t slots = 0;      // S
  int64_t head_dim = 0;   // dh, of q and k
  int64_t value_dim = 0;  // dv, of v_tokens and v_slots
  double scale = 0;       // 1 / sqrt(dh)
};

// Views of [B, H, ...] tensors flattened to [B * H, ...], all contiguous, with the checked shape above. An
// undefined output gradient is absent (zero).
struct ForwardTensors {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v_tokens;
  const at::Tensor& v_slots;
  const at::Tensor& where;
  at::Tensor& token_update;
  at::Tensor& slot_update;
  at::Tensor& logits;
  at::Tensor& token_logsumexp;
  at::Tensor& slot_logsumexp;
};

struct BackwardTensors {
  const at::Tensor& grad_token_update;
  const at::Tensor& grad_slot_update;
  const at::Tensor& grad_logits;
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v_tokens;
  const at::Tensor& v_slots;
  const at::Tensor& logits;
  const at::Tensor& token_logsumexp;
  const at::Tensor& slot_logsumexp;
  at::Tensor& grad_q;
  at::Tensor& grad_k;
  at::Tensor& grad_v_tokens;
  at::Tensor& grad_v_slots;
  at::Tensor& grad_where;
};

// Backend kernels, for heads >= 1 and tokens, slots, head_dim >= 1.
using ForwardKernel = void (*)(const WhatWhereShape& shape, const ForwardTensors& tensors);
using BackwardKernel = void (*)(const WhatWhereShape& shape, const BackwardTensors& tensors);

// Operator bodies shared by the backends (whatwhere.cpp): argument checks, contiguous copies where needed,
// output allocation and the empty cases, then `kernel` under a guard for q's device. Each backend file passes
// its own kernel and registers the result with the dispatcher, so no host code branches on the device.
// Returns (token_update, slot_update, logits, token_logsumexp, slot_logsumexp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_whatwhere_attention(
    ForwardKernel kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens,
    const at::Tensor& v_slots, const at::Tensor& where);
// Returns (grad_q, grad_k, grad_v_tokens, grad_v_slots, grad_where); absent output gradients count as zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_whatwhere_attention_backward(
    BackwardKernel kernel, const std::optional<at::Tensor>& grad_token_update,
    const std::optional<at::Tensor>& grad_slot_update, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens, const at::Tensor& v_slots,
    const at::Tensor& logits, const at::Tensor& token_logsumexp, const at::Tensor& slot_logsumexp);

namespace cpu {
void forward(const WhatWhereShape& shape, const ForwardTensors& tensors);
void backward(const WhatWhereShape& shape, const BackwardTensors& tensors);
}  // namespace cpu

#ifdef VISIONMOE_WITH_CUDA
namespace cuda {
void forward(const WhatWhereShape& shape, const ForwardTensors& tensors);
void backward(const WhatWhereShape& shape, const BackwardTensors& tensors);
}  // namespace cuda
#endif

}  // namespace visionmoe::whatwhere
