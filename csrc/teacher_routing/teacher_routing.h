// The routing-distillation loss of TGR-MoE (teacher-guided routing), fused: per token t,
//   KL(p_t || q_t) = sum_e p_te (log p_te - log q_te),   q_t = softmax(s_t),
// from the student router's logits s [T, E] and the teacher's routing distribution p [T, E], given either as
// probabilities (rows summing to 1; zeros allowed, with 0 log 0 = 0) or as logits that the operator softmaxes
// itself. The per-token losses are returned as they are ("none", [T]) or reduced to their mean or sum (a
// scalar; the mean of zero tokens is 0). The loss is in the opmath type of the inputs (float32 for float16,
// bfloat16 and float32; float64 for float64), and so is all arithmetic but the CPU's sums over tokens (double).
//
// With m = max_e s_te and Z = sum_e exp(s_te - m), log q_te = (s_te - m) - log Z, so per token
//   probabilities: KL = sum_e p_te log p_te - sum_e p_te (s_te - m) + (sum_e p_te) log Z,
//   logits a:      KL = sum_e w_e ((a_te - m_a) - (s_te - m)) / Z_a + log Z - log Z_a,
//                  with m_a = max_e a_te, w_e = exp(a_te - m_a), Z_a = sum_e w_e,
// where every exponent is <= 0, so nothing overflows. The teacher is a stop-gradient target: no gradient flows
// to it. The gradient with respect to the student's logits is
//   dLoss/ds_te = g_t (P_t q_te - p_te),   g_t = dLoss/dKL_t (the upstream gradient, divided by T for the mean),
// with P_t = sum_e p_te, which is 1 for teacher logits and normalised probabilities (rows are used as given).
// The backward recomputes q (and p from teacher logits) row by row from the inputs and the forward's per-token
// log-sum-exps (student_lse [T]; teacher_lse [T] for teacher logits, empty for probabilities): nothing of size
// [T, E] is saved beyond the inputs themselves.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>

namespace visionmoe::teacher_routing {

enum class Reduction { kNone, kMean, kSum };
enum class TeacherFormat { kProbabilities, kLogits };

struct LossShape {
  int64_t tokens = 0;   // T
  int64_t experts = 0;  // E
  Reduction reduction = Reduction::kMean;
  TeacherFormat teacher_format = TeacherFormat::kProbabilities;
};

// Backend kernels, with the signatures below; a forward kernel returns the first token whose input it found
// invalid (see cpu::forward), or -1.
using ForwardKernel = int64_t (*)(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher,
                                  at::Tensor& loss, at::Tensor& student_lse, at::Tensor& teacher_lse);
using BackwardKernel = void (*)(const LossShape& shape, const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                const at::Tensor& teacher, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
                                at::Tensor& grad_student_logits);

// Operator bodies shared by the backends (teacher_routing.cpp): argument checks, output allocation and the
// empty case, then `kernel` under a guard for the inputs' device. Each backend file passes its own kernel and
// registers the result with the dispatcher, so no host code branches on the device.
// Returns (loss [T] or [], student_lse [T], teacher_lse [T] for teacher logits or [0] for probabilities).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_teacher_routing_loss(ForwardKernel kernel,
                                                                        const at::Tensor& student_logits,
                                                                        const at::Tensor& teacher,
                                                                        c10::string_view reduction,
                                                                        c10::string_view teacher_format);
// Returns dLoss/dstudent_logits [T, E], in the dtype of student_logits.
at::Tensor run_teacher_routing_loss_backward(BackwardKernel kernel, const at::Tensor& grad_loss,
                                             const at::Tensor& student_logits, const at::Tensor& teacher,
                                             const at::Tensor& student_lse, const at::Tensor& teacher_lse,
                                             c10::string_view reduction, c10::string_view teacher_format);

// Backend kernels, for T >= 1. Every input is checked and contiguous, outputs are allocated, before these run.
namespace cpu {
// Returns the first token whose loss is not finite or whose teacher probabilities include a negative one, or
// -1 when there is none: the host code then finds the offending entry and reports it.
int64_t forward(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher, at::Tensor& loss,
                at::Tensor& student_lse, at::Tensor& teacher_lse);
void backward(const LossShape& shape, const at::Tensor& grad_loss, const at::Tensor& student_logits,
              const at::Tensor& teacher, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
              at::Tensor& grad_student_logits);
}  // namespace cpu

#ifdef VISIONMOE_WITH_CUDA
namespace cuda {
// Validates as the CPU kernel does: first_invalid_token [1] int64 (on the device, holding INT64_MAX before the
// call) receives the smallest token whose loss is not finite or whose teacher probabilities include a negative
// one, which the caller reads back (one device-to-host synchronisation) and reports.
void forward(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher, at::Tensor& loss,
             at::Tensor& student_lse, at::Tensor& teacher_lse, at::Tensor& first_invalid_token);
void backward(const LossShape& shape, const at::Tensor& grad_loss, const at::Tensor& student_logits,
              const at::Tensor& teacher, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
              at::Tensor& grad_student_logits);
}  // namespace cuda
#endif

}  // namespace visionmoe::teacher_routing
