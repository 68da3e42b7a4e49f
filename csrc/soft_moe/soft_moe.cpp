// Host code of the Soft MoE family: argument checks naming the argument, then softmax and batched GEMMs.
//
// Everything here is ATen, so one body serves CPU and CUDA: soft_moe_cpu.cpp and soft_moe_cuda.cu register
// these same functions for their backends (impl_kernels). Hand-written kernels were measured not to pay
// off: at G = 32, T = 196, S = 16, D = 384 on one CPU core, ATen's softmax over [G, T, S] takes 0.1 ms and
// its backward 0.05 ms against 0.6 ms for each of the six GEMMs of a forward + backward, and a portable
// kernel cannot use the vectorised exp that ATen selects at run time.
#include "soft_moe/soft_moe.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/checks.h"

namespace visionmoe::soft_moe {
namespace {

constexpr int64_t kTokenAxis = 1;  // of logits [G, T, S]: dispatch weights are a softmax over it
constexpr int64_t kSlotAxis = 2;   // combine weights are a softmax over it

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// float16 and bfloat16 softmaxes run in float32, so that their weights are rounded once, at the end.
at::ScalarType opmath_type(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

void check_features(const char* op, const char* name, const char* shape, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
                   like.scalar_type(), "), got ", t.scalar_type());
  check_device(op, name, t, like_name, like);
}

// x [G, T, D] and logits [G, T, S].
void check_dispatch_inputs(const char* op, const at::Tensor& x, const at::Tensor& logits) {
  check_features(op, "x", "[G, T, D]", x);
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must have shape [G, T, S], got ", logits.sizes());
  check_like(op, "logits", logits, "x", x);
  TORCH_CHECK_VALUE(logits.size(0) == x.size(0) && logits.size(1) == x.size(1), op,
                    ": logits must have shape [G, T, S] = [", x.size(0), ", ", x.size(1),
                    ", S] to match x [G, T, D], got ", logits.sizes());
  TORCH_CHECK_VALUE(
      x.size(1) > 0 || x.size(0) == 0 || logits.size(2) == 0, op,
      ": x has no tokens (T = 0), so the softmax over tokens that gives each slot its dispatch weights is "
      "undefined");
}

// y [G, S, D] and logits [G, T, S].
void check_combine_inputs(const char* op, const at::Tensor& y, const at::Tensor& logits) {
  check_features(op, "y", "[G, S, D]", y);
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must have shape [G, T, S], got ", logits.sizes());
  check_like(op, "logits", logits, "y", y);
  TORCH_CHECK_VALUE(logits.size(0) == y.size(0) && logits.size(2) == y.size(1), op,
                    ": logits must have shape [G, T, S] = [", y.size(0), ", T, ", y.size(1),
                    "] to match y [G, S, D], got ", logits.sizes());
  TORCH_CHECK_VALUE(y.size(1) > 0 || y.size(0) == 0 || logits.size(1) == 0, op,
                    ": y has no slots (S = 0), so the softmax over slots that gives each token its combine weights is "
                    "undefined");
}

void check_grad(const char* op, const char* name, const at::Tensor& grad, at::IntArrayRef shape, const char* like_name,
                const at::Tensor& like) {
  TORCH_CHECK_VALUE(grad.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", grad.sizes());
  check_like(op, name, grad, like_name, like);
}

at::Tensor softmax_in_opmath(const at::Tensor& logits, int64_t axis) {
  return at::softmax(logits, axis, opmath_type(logits.scalar_type()));
}

// weights * (grad_weights - sum_axis weights * grad_weights), from the softmax weights in opmath precision
// (not rounded to the logits' dtype first), rounded once to `dtype`.
at::Tensor softmax_backward(const at::Tensor& grad_weights, const at::Tensor& weights, int64_t axis,
                            at::ScalarType dtype) {
  const at::ScalarType opmath = weights.scalar_type();
  return at::_softmax_backward_data(grad_weights.to(opmath), weights, axis, opmath).to(dtype);
}

}  // namespace

at::Tensor soft_dispatch(const at::Tensor& x, const at::Tensor& logits) {
  check_dispatch_inputs("soft_dispatch", x, logits);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor weights = softmax_in_opmath(logits, kTokenAxis).to(x.scalar_type());
  return at::bmm(weights.transpose(1, 2), x);
}

std::tuple<at::Tensor, at::Tensor> soft_dispatch_backward(const at::Tensor& grad_slots, const at::Tensor& x,
                                                          const at::Tensor& logits) {
  constexpr const char* op = "soft_dispatch_backward";
  check_dispatch_inputs(op, x, logits);
  check_grad(op, "grad_slots", grad_slots, {x.size(0), logits.size(2), x.size(2)}, "x", x);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor weights = softmax_in_opmath(logits, kTokenAxis);
  // The [G, T, S] gradient of the weights is a temporary, freed before grad_x is allocated, so that the step's
  // peak holds one [G, T, S] tensor fewer.
  at::Tensor grad_logits =
      softmax_backward(at::bmm(x, grad_slots.transpose(1, 2)), weights, kTokenAxis, logits.scalar_type());
  at::Tensor grad_x = at::bmm(weights.to(x.scalar_type()), grad_slots);
  return {grad_x, grad_logits};
}

at::Tensor soft_combine(const at::Tensor& y, const at::Tensor& logits) {
  check_combine_inputs("soft_combine", y, logits);
  const c10::DeviceGuard guard(y.device());
  const at::Tensor weights = softmax_in_opmath(logits, kSlotAxis).to(y.scalar_type());
  return at::bmm(weights, y);
}

std::tuple<at::Tensor, at::Tensor> soft_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& logits) {
  constexpr const char* op = "soft_combine_backward";
  check_combine_inputs(op, y, logits);
  check_grad(op, "grad_out", grad_out, {y.size(0), logits.size(1), y.size(2)}, "y", y);
  const c10::DeviceGuard guard(y.device());
  const at::Tensor weights = softmax_in_opmath(logits, kSlotAxis);
  // As in soft_dispatch_backward: the weights' gradient is freed before grad_y is allocated.
  at::Tensor grad_logits =
      softmax_backward(at::bmm(grad_out, y.transpose(1, 2)), weights, kSlotAxis, logits.scalar_type());
  at::Tensor grad_y = at::bmm(weights.to(y.scalar_type()).transpose(1, 2), grad_out);
  return {grad_y, grad_logits};
}

void impl_kernels(torch::Library& m) {
  m.impl("soft_dispatch", &soft_dispatch);
  m.impl("soft_dispatch_backward", &soft_dispatch_backward);
  m.impl("soft_combine", &soft_combine);
  m.impl("soft_combine_backward", &soft_combine_backward);
}

}  // namespace visionmoe::soft_moe
