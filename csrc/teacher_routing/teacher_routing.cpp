// Host code of the teacher-routing loss, shared by the backends: argument checks, output allocation, and the
// report of invalid input that the CPU kernel detects on its way. Each backend's file registers its kernels.
#include "teacher_routing/teacher_routing.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"

namespace visionmoe::teacher_routing {
namespace {

Reduction parse_reduction(const char* op, c10::string_view name) {
  if (name == "none") return Reduction::kNone;
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, op, ": reduction must be \"none\", \"mean\" or \"sum\", got \"", std::string(name), "\"");
}

TeacherFormat parse_teacher_format(const char* op, c10::string_view name) {
  if (name == "probabilities") return TeacherFormat::kProbabilities;
  if (name == "logits") return TeacherFormat::kLogits;
  TORCH_CHECK_VALUE(false, op, ": teacher_format must be \"probabilities\" or \"logits\", got \"", std::string(name),
                    "\"");
}

LossShape check_inputs(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher,
                       c10::string_view reduction, c10::string_view teacher_format) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2, op, ": student_logits must have shape [T, E], got ",
                    student_logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(student_logits.scalar_type()), op,
                   ": student_logits must be a floating-point tensor, got ", student_logits.scalar_type());
  TORCH_CHECK_VALUE(student_logits.size(1) >= 1, op, ": student_logits must have E >= 1 experts, got shape ",
                    student_logits.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student_logits.sizes(), op, ": teacher must have the shape of student_logits (",
                    student_logits.sizes(), "), got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student_logits.scalar_type(), op,
                   ": teacher must have the dtype of student_logits (", student_logits.scalar_type(), "), got ",
                   teacher.scalar_type());
  check_device(op, "teacher", teacher, "student_logits", student_logits);
  LossShape shape;
  shape.tokens = student_logits.size(0);
  shape.experts = student_logits.size(1);
  shape.reduction = parse_reduction(op, reduction);
  shape.teacher_format = parse_teacher_format(op, teacher_format);
  return shape;
}

std::vector<int64_t> loss_sizes(const LossShape& shape) {
  if (shape.reduction == Reduction::kNone) return {shape.tokens};
  return {};
}

int64_t teacher_lse_length(const LossShape& shape) {
  return shape.teacher_format == TeacherFormat::kLogits ? shape.tokens : 0;
}

// A kernel found a token whose loss is not finite, or a negative teacher probability: names the first
// offending entry of that token, in student_logits before teacher.
[[noreturn]] void report_invalid_token(const LossShape& shape, const at::Tensor& student_logits,
                                       const at::Tensor& teacher, int64_t token) {
  constexpr const char* op = "teacher_routing_loss";
  const at::Tensor student_row = student_logits[token].to(at::kCPU, at::kDouble);
  const at::Tensor teacher_row = teacher[token].to(at::kCPU, at::kDouble);
  const double* s = student_row.const_data_ptr<double>();
  const double* p = teacher_row.const_data_ptr<double>();
  for (int64_t e = 0; e < shape.experts; ++e) {
    TORCH_CHECK_VALUE(std::isfinite(s[e]), op, ": student_logits must be finite, got student_logits[", token, ", ", e,
                      "] = ", s[e]);
  }
  for (int64_t e = 0; e < shape.experts; ++e) {
    if (shape.teacher_format == TeacherFormat::kLogits) {
      TORCH_CHECK_VALUE(std::isfinite(p[e]), op,
                        ": teacher must be finite logits (teacher_format=\"logits\"), got teacher[", token, ", ", e,
                        "] = ", p[e]);
    } else {
      TORCH_CHECK_VALUE(std::isfinite(p[e]) && p[e] >= 0, op,
                        ": teacher must hold probabilities, finite and >= 0 (teacher_format=\"probabilities\"), got "
                        "teacher[",
                        token, ", ", e, "] = ", p[e]);
    }
  }
  TORCH_CHECK_VALUE(false, op, ": the loss of token ", token,
                    " is not finite although its inputs are: differences between its logits exceed the range of ",
                    student_logits.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_teacher_routing_loss(ForwardKernel kernel,
                                                                        const at::Tensor& student_in,
                                                                        const at::Tensor& teacher_in,
                                                                        c10::string_view reduction,
                                                                        c10::string_view teacher_format) {
  constexpr const char* op = "teacher_routing_loss";
  const LossShape shape = check_inputs(op, student_in, teacher_in, reduction, teacher_format);
  const at::Tensor student_logits = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const c10::DeviceGuard guard(student_logits.device());
  const auto opmath_options = student_logits.options().dtype(at::toOpMathType(student_logits.scalar_type()));
  at::Tensor loss = at::empty(loss_sizes(shape), opmath_options);
  at::Tensor student_lse = at::empty({shape.tokens}, opmath_options);
  at::Tensor teacher_lse = at::empty({teacher_lse_length(shape)}, opmath_options);
  if (shape.tokens == 0) {
    loss.zero_();  // the sum, and by convention the mean, of no tokens' losses
    return {loss, student_lse, teacher_lse};
  }
  const int64_t invalid_token = kernel(shape, student_logits, teacher, loss, student_lse, teacher_lse);
  if (invalid_token >= 0) report_invalid_token(shape, student_logits, teacher, invalid_token);
  return {loss, student_lse, teacher_lse};
}

at::Tensor run_teacher_routing_loss_backward(BackwardKernel kernel, const at::Tensor& grad_in,
                                             const at::Tensor& student_in, const at::Tensor& teacher_in,
                                             const at::Tensor& student_lse_in, const at::Tensor& teacher_lse_in,
                                             c10::string_view reduction, c10::string_view teacher_format) {
  constexpr const char* op = "teacher_routing_loss_backward";
  const LossShape shape = check_inputs(op, student_in, teacher_in, reduction, teacher_format);
  const at::ScalarType opmath_dtype = at::toOpMathType(student_in.scalar_type());
  const auto check_saved = [&](const at::Tensor& tensor, const char* name, at::IntArrayRef sizes) {
    TORCH_CHECK_VALUE(tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", tensor.sizes());
    TORCH_CHECK_TYPE(tensor.scalar_type() == opmath_dtype, op, ": ", name, " must have dtype ", opmath_dtype,
                     " (the opmath type of student_logits' ", student_in.scalar_type(), "), got ",
                     tensor.scalar_type());
    check_device(op, name, tensor, "student_logits", student_in);
  };
  check_saved(grad_in, "grad_loss", loss_sizes(shape));
  check_saved(student_lse_in, "student_lse", {shape.tokens});
  check_saved(teacher_lse_in, "teacher_lse", {teacher_lse_length(shape)});
  const at::Tensor grad_loss = grad_in.contiguous();
  const at::Tensor student_logits = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor student_lse = student_lse_in.contiguous();
  const at::Tensor teacher_lse = teacher_lse_in.contiguous();
  const c10::DeviceGuard guard(student_logits.device());
  at::Tensor grad_student_logits = at::empty_like(student_logits);
  if (shape.tokens == 0) return grad_student_logits;
  kernel(shape, grad_loss, student_logits, teacher, student_lse, teacher_lse, grad_student_logits);
  return grad_student_logits;
}

}  // namespace visionmoe::teacher_routing
