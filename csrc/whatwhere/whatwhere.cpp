// Host code of the what-where attention family, shared by the backends: argument checks naming the argument,
// contiguous copies and output allocation. Each backend's file registers its kernels with the dispatcher.
//
// Inputs of any layout are accepted: non-contiguous ones are copied to contiguous memory here, once, so the
// kernels index plain [B * H, rows, columns] arrays.
#include "whatwhere/whatwhere.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <cmath>
#include <limits>

#include "common/checks.h"

namespace visionmoe::whatwhere {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// `t` must be a 4-D tensor [B, H, rows, columns] whose sizes equal `expected` where those are >= 0 (-1: any).
void check_operand(const char* op, const char* name, const char* letters, const at::Tensor& t,
                   std::array<int64_t, 4> expected, const char* why, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must have shape ", letters, ", got ", t.sizes());
  for (int64_t i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(expected[i] < 0 || t.size(i) == expected[i], op, ": ", name, " must have shape ", letters, " ",
                      why, ", got ", t.sizes(), " (dimension ", i, " must be ", expected[i], ")");
  }
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (", q.scalar_type(),
                   "), got ", t.scalar_type());
  check_device(op, name, t, "q", q);
}

// Checks the four attention inputs (and where, when given) and returns their shape.
WhatWhereShape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_tokens,
                            const at::Tensor& v_slots) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must have shape [B, H, N, dh], got ", q.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(q.scalar_type()), op, ": q must be float32, float64, float16 or bfloat16, got ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(q.size(3) >= 1, op,
                    ": q must have dh >= 1 features per head (the logits are scaled by 1 / sqrt(dh)), ", "got shape ",
                    q.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), dh = q.size(3);
  check_operand(op, "k", "[B, H, S, dh]", k, {B, H, -1, dh}, "with B, H and dh of q [B, H, N, dh]", q);
  check_operand(op, "v_tokens", "[B, H, N, dv]", v_tokens, {B, H, N, -1}, "with B, H and N of q [B, H, N, dh]", q);
  check_operand(op, "v_slots", "[B, H, S, dv]", v_slots, {B, H, k.size(2), v_tokens.size(3)},
                "with B, H of q, S of k [B, H, S, dh] and dv of v_tokens [B, H, N, dv]", q);
  WhatWhereShape shape;
  shape.heads = B * H;
  shape.tokens = N;
  shape.slots = k.size(2);
  shape.head_dim = dh;
  shape.value_dim = v_tokens.size(3);
  shape.scale = 1.0 / std::sqrt(static_cast<double>(dh));
  return shape;
}

void check_logits_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                       const WhatWhereShape& shape) {
  check_operand(op, name, "[B, H, N, S]", t, {q.size(0), q.size(1), shape.tokens, shape.slots},
                "with B, H, N of q [B, H, N, dh] and S of k [B, H, S, dh]", q);
}

void check_logsumexp(const char* op, const char* name, const char* letters, const at::Tensor& t, const at::Tensor& q,
                     int64_t length) {
  const at::ScalarType opmath = at::toOpMathType(q.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == length, op, ": ",
                    name, " must have shape ", letters, " = [", q.size(0), ", ", q.size(1), ", ", length, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == opmath, op, ": ", name, " must have dtype ", opmath, " (the opmath type of q's ",
                   q.scalar_type(), "), got ", t.scalar_type());
  check_device(op, name, t, "q", q);
}

// A contiguous [B * H, rows, columns] view of a [B, H, rows, columns] tensor (or [B * H, rows] of [B, H, rows]).
at::Tensor flat_heads(const at::Tensor& t) { return t.contiguous().flatten(0, 1); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_whatwhere_attention(
    ForwardKernel kernel, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_tokens_in,
    const at::Tensor& v_slots_in, const at::Tensor& where_in) {
  constexpr const char* op = "whatwhere_attention";
  const WhatWhereShape shape = check_inputs(op, q_in, k_in, v_tokens_in, v_slots_in);
  check_logits_like(op, "where", where_in, q_in, shape);
  const c10::DeviceGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = shape.tokens, S = shape.slots, dv = shape.value_dim;
  const auto options = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  const auto opmath_options = options.dtype(at::toOpMathType(q_in.scalar_type()));
  at::Tensor token_update = at::empty({B, H, N, dv}, options);
  at::Tensor slot_update = at::empty({B, H, S, dv}, options);
  at::Tensor logits = at::empty({B, H, N, S}, options);
  at::Tensor token_logsumexp = at::empty({B, H, N}, opmath_options);
  at::Tensor slot_logsumexp = at::empty({B, H, S}, opmath_options);
  if (shape.heads == 0) return {token_update, slot_update, logits, token_logsumexp, slot_logsumexp};
  if (N == 0 || S == 0) {
    // Softmaxes over an empty axis: every update is an empty sum, every log-sum-exp that of an empty set.
    token_update.zero_();
    slot_update.zero_();
    token_logsumexp.fill_(-std::numeric_limits<double>::infinity());
    slot_logsumexp.fill_(-std::numeric_limits<double>::infinity());
    return {token_update, slot_update, logits, token_logsumexp, slot_logsumexp};
  }
  const at::Tensor q = flat_heads(q_in), k = flat_heads(k_in), v_tokens = flat_heads(v_tokens_in);
  const at::Tensor v_slots = flat_heads(v_slots_in), where = flat_heads(where_in);
  at::Tensor token_update_flat = token_update.flatten(0, 1), slot_update_flat = slot_update.flatten(0, 1);
  at::Tensor logits_flat = logits.flatten(0, 1);
  at::Tensor token_logsumexp_flat = token_logsumexp.flatten(0, 1), slot_logsumexp_flat = slot_logsumexp.flatten(0, 1);
  const ForwardTensors tensors{q,
                               k,
                               v_tokens,
                               v_slots,
                               where,
                               token_update_flat,
                               slot_update_flat,
                               logits_flat,
                               token_logsumexp_flat,
                               slot_logsumexp_flat};
  kernel(shape, tensors);
  return {token_update, slot_update, logits, token_logsumexp, slot_logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_whatwhere_attention_backward(
    BackwardKernel kernel, const std::optional<at::Tensor>& grad_token_update_in,
    const std::optional<at::Tensor>& grad_slot_update_in, const std::optional<at::Tensor>& grad_logits_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_tokens_in, const at::Tensor& v_slots_in,
    const at::Tensor& logits_in, const at::Tensor& token_logsumexp_in, const at::Tensor& slot_logsumexp_in) {
  constexpr const char* op = "whatwhere_attention_backward";
  const WhatWhereShape shape = check_inputs(op, q_in, k_in, v_tokens_in, v_slots_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = shape.tokens, S = shape.slots, dv = shape.value_dim;
  check_logits_like(op, "logits", logits_in, q_in, shape);
  check_logsumexp(op, "token_logsumexp", "[B, H, N]", token_logsumexp_in, q_in, N);
  check_logsumexp(op, "slot_logsumexp", "[B, H, S]", slot_logsumexp_in, q_in, S);
  const bool has_grad_token_update = grad_token_update_in.has_value() && grad_token_update_in->defined();
  const bool has_grad_slot_update = grad_slot_update_in.has_value() && grad_slot_update_in->defined();
  const bool has_grad_logits = grad_logits_in.has_value() && grad_logits_in->defined();
  if (has_grad_token_update) {
    check_operand(op, "grad_token_update", "[B, H, N, dv]", *grad_token_update_in, {B, H, N, dv}, "like token_update",
                  q_in);
  }
  if (has_grad_slot_update) {
    check_operand(op, "grad_slot_update", "[B, H, S, dv]", *grad_slot_update_in, {B, H, S, dv}, "like slot_update",
                  q_in);
  }
  if (has_grad_logits) check_logits_like(op, "grad_logits", *grad_logits_in, q_in, shape);
  const c10::DeviceGuard guard(q_in.device());
  const auto options = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = at::empty({B, H, N, shape.head_dim}, options);
  at::Tensor grad_k = at::empty({B, H, S, shape.head_dim}, options);
  at::Tensor grad_v_tokens = at::empty({B, H, N, dv}, options);
  at::Tensor grad_v_slots = at::empty({B, H, S, dv}, options);
  at::Tensor grad_where = at::empty({B, H, N, S}, options);
  if (shape.heads == 0 || N == 0 || S == 0) {
    for (at::Tensor* grad : {&grad_q, &grad_k, &grad_v_tokens, &grad_v_slots}) grad->zero_();
    return {grad_q, grad_k, grad_v_tokens, grad_v_slots, grad_where};
  }
  const at::Tensor grad_token_update = has_grad_token_update ? flat_heads(*grad_token_update_in) : at::Tensor();
  const at::Tensor grad_slot_update = has_grad_slot_update ? flat_heads(*grad_slot_update_in) : at::Tensor();
  const at::Tensor grad_logits = has_grad_logits ? flat_heads(*grad_logits_in) : at::Tensor();
  const at::Tensor q = flat_heads(q_in), k = flat_heads(k_in), v_tokens = flat_heads(v_tokens_in);
  const at::Tensor v_slots = flat_heads(v_slots_in), logits = flat_heads(logits_in);
  const at::Tensor token_logsumexp = flat_heads(token_logsumexp_in), slot_logsumexp = flat_heads(slot_logsumexp_in);
  at::Tensor grad_q_flat = grad_q.flatten(0, 1), grad_k_flat = grad_k.flatten(0, 1);
  at::Tensor grad_v_tokens_flat = grad_v_tokens.flatten(0, 1), grad_v_slots_flat = grad_v_slots.flatten(0, 1);
  at::Tensor grad_where_flat = grad_where.flatten(0, 1);
  const BackwardTensors tensors{grad_token_update,
                                grad_slot_update,
                                grad_logits,
                                q,
                                k,
                                v_tokens,
                                v_slots,
                                logits,
                                token_logsumexp,
                                slot_logsumexp,
                                grad_q_flat,
                                grad_k_flat,
                                grad_v_tokens_flat,
                                grad_v_slots_flat,
                                grad_where_flat};
  kernel(shape, tensors);
  return {grad_q, grad_k, grad_v_tokens, grad_v_slots, grad_where};
}

}  // namespace visionmoe::whatwhere
