// Host code of the Sinkhorn family: argument checks and output allocation, shared by the backends; each backend's
// file registers its kernels with the dispatcher, which picks the backend.
#include "sinkhorn/sinkhorn.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"

namespace visionmoe::sinkhorn {
namespace {

SinkhornShape check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must have shape [G, T, E], got ", logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op, ": logits must be a floating-point tensor, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.size(2) >= 1, op,
                    ": logits must have T >= 1 tokens and E >= 1 experts per group, got shape ", logits.sizes());
  SinkhornShape shape;
  shape.groups = logits.size(0);
  shape.tokens = logits.size(1);
  shape.experts = logits.size(2);
  return shape;
}

// One reduction and, on CUDA, one device-to-host synchronisation; callers whose logits are finite by
// construction pass validate=False.
void check_finite(const at::Tensor& logits) {
  const at::Tensor non_finite = at::isfinite(logits).logical_not_();
  if (!non_finite.any().item<bool>()) return;
  const int64_t flat = non_finite.flatten().to(at::kByte).argmax().item<int64_t>();
  const int64_t tokens = logits.size(1), experts = logits.size(2);
  TORCH_CHECK_VALUE(false, "sinkhorn: logits must be finite, got logits[", flat / (tokens * experts), ", ",
                    flat / experts % tokens, ", ", flat % experts, "] = ", logits.flatten()[flat].item<double>());
}

void check_potentials(const at::Tensor& potentials, const char* name, const char* length_letter, int64_t groups,
                      int64_t length, at::ScalarType dtype, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(potentials.dim() == 3 && potentials.size(0) == groups && potentials.size(2) == length,
                    "sinkhorn_backward: ", name, " must have shape [G, K, ", length_letter, "] = [", groups, ", K, ",
                    length, "], got ", potentials.sizes());
  TORCH_CHECK_TYPE(potentials.scalar_type() == dtype, "sinkhorn_backward: ", name, " must have dtype ", dtype,
                   " (the opmath type of logits' ", logits.scalar_type(), "), got ", potentials.scalar_type());
  check_device("sinkhorn_backward", name, potentials, "logits", logits);
}

// m_t = max_e L_te [G, T] in opmath, the shift the kernels subtract from each row (see sinkhorn.h).
at::Tensor row_maxima(const at::Tensor& logits) {
  return logits.amax(-1).to(at::toOpMathType(logits.scalar_type())).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_sinkhorn(ForwardKernel kernel, const at::Tensor& logits_in,
                                                            int64_t num_iterations, bool validate) {
  constexpr const char* op = "sinkhorn";
  SinkhornShape shape = check_logits(op, logits_in);
  TORCH_CHECK_VALUE(num_iterations >= 0, op, ": num_iterations must be >= 0, got ", num_iterations);
  shape.iterations = num_iterations;
  const at::Tensor logits = logits_in.contiguous();
  const c10::DeviceGuard guard(logits.device());
  if (validate) check_finite(logits);
  const auto potential_options = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor row_potentials = at::empty({shape.groups, shape.iterations, shape.tokens}, potential_options);
  at::Tensor column_potentials = at::empty({shape.groups, shape.iterations, shape.experts}, potential_options);
  if (shape.iterations == 0) return {logits.clone(), row_potentials, column_potentials};
  at::Tensor log_plan = at::empty_like(logits);
  if (logits.numel() == 0) return {log_plan, row_potentials, column_potentials};
  kernel(shape, logits, row_maxima(logits), log_plan, row_potentials, column_potentials);
  return {log_plan, row_potentials, column_potentials};
}

at::Tensor run_sinkhorn_backward(BackwardKernel kernel, const at::Tensor& grad_in, const at::Tensor& logits_in,
                                 const at::Tensor& row_in, const at::Tensor& column_in) {
  constexpr const char* op = "sinkhorn_backward";
  SinkhornShape shape = check_logits(op, logits_in);
  TORCH_CHECK_VALUE(grad_in.sizes() == logits_in.sizes(), op, ": grad_log_plan must have the shape of logits (",
                    logits_in.sizes(), "), got ", grad_in.sizes());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == logits_in.scalar_type(), op,
                   ": grad_log_plan must have the dtype of logits (", logits_in.scalar_type(), "), got ",
                   grad_in.scalar_type());
  check_device(op, "grad_log_plan", grad_in, "logits", logits_in);
  const at::ScalarType potential_dtype = at::toOpMathType(logits_in.scalar_type());
  check_potentials(row_in, "row_potentials", "T", shape.groups, shape.tokens, potential_dtype, logits_in);
  check_potentials(column_in, "column_potentials", "E", shape.groups, shape.experts, potential_dtype, logits_in);
  TORCH_CHECK_VALUE(row_in.size(1) == column_in.size(1), op,
                    ": row_potentials and column_potentials must hold the same number of iterations, got ",
                    row_in.size(1), " and ", column_in.size(1));
  shape.iterations = row_in.size(1);
  const at::Tensor grad_log_plan = grad_in.contiguous();
  if (shape.iterations == 0) return grad_log_plan.clone();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor row_potentials = row_in.contiguous();
  const at::Tensor column_potentials = column_in.contiguous();
  const c10::DeviceGuard guard(logits.device());
  at::Tensor grad_logits = at::empty_like(logits);
  if (logits.numel() == 0) return grad_logits;
  kernel(shape, grad_log_plan, logits, row_maxima(logits), row_potentials, column_potentials, grad_logits);
  return grad_logits;
}

}  // namespace visionmoe::sinkhorn
