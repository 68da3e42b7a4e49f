// CPU kernels of the teacher-routing loss. Tokens are split into chunks of a fixed number of rows (independent
// of the thread count); a task owns whole chunks and handles each row in one visit, with vectorisable loops over
// its experts (see teacher_routing.h for the formulas). The mean and the sum add the tokens' losses of a chunk
// in token order and then the chunks' partials in chunk order: no atomics, and the same result whatever the
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/vectorized_math.h"
#include "teacher_routing/teacher_routing.h"

namespace visionmoe::teacher_routing::cpu {
namespace {

using vectorized_math::exp_opmath;
using vectorized_math::log_opmath;
using vectorized_math::max_of;
using vectorized_math::sum_of;

// Entries per chunk: enough work to outweigh scheduling a task, and enough chunks to share among the threads.
constexpr int64_t kChunkElements = 8192;

int64_t rows_per_chunk(const LossShape& shape) { return std::max<int64_t>(1, kChunkElements / shape.experts); }

// A row in the opmath type: the row itself for float32 and float64, else its conversion into `buffer`.
template <typename opmath_t, typename scalar_t>
const opmath_t* opmath_row(const scalar_t* row, int64_t experts, opmath_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return row;
  } else {
    for (int64_t e = 0; e < experts; ++e) buffer[e] = static_cast<opmath_t>(row[e]);
    return buffer;
  }
}

// Per-row scratch of one task, [E] each.
template <typename opmath_t>
struct RowBuffers {
  explicit RowBuffers(int64_t experts)
      : student(experts), teacher(experts), shifted_student(experts), weight(experts), term(experts) {}
  std::vector<opmath_t> student, teacher, shifted_student, weight, term;
};

template <typename scalar_t>
int64_t forward_impl(const LossShape& shape, const scalar_t* student_logits, const scalar_t* teacher,
                     at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* student_lse,
                     at::opmath_type<scalar_t>* teacher_lse) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = shape.tokens, E = shape.experts;
  const int64_t chunk_rows = rows_per_chunk(shape);
  const int64_t num_chunks = (T + chunk_rows - 1) / chunk_rows;
  const bool per_token = shape.reduction == Reduction::kNone;
  const bool teacher_logits = shape.teacher_format == TeacherFormat::kLogits;
  // The reductions add in double whatever the dtype: one addition per token, and the mean of many small losses
  // keeps its digits.
  std::vector<double> chunk_sum(num_chunks);
  std::vector<int64_t> chunk_invalid_token(num_chunks, -1);

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    RowBuffers<opmath_t> buffers(E);
    opmath_t* shifted_s = buffers.shifted_student.data();
    opmath_t* weight = buffers.weight.data();
    opmath_t* term = buffers.term.data();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double sum = 0;
      const int64_t first = chunk * chunk_rows, last = std::min(T, first + chunk_rows);
      for (int64_t t = first; t < last; ++t) {
        const opmath_t* s = opmath_row(student_logits + t * E, E, buffers.student.data());
        const opmath_t* p = opmath_row(teacher + t * E, E, buffers.teacher.data());
        // Student: s - m and log Z = log sum_e exp(s - m).
        const opmath_t s_max = max_of(s, E);
        for (int64_t e = 0; e < E; ++e) shifted_s[e] = s[e] - s_max;
        for (int64_t e = 0; e < E; ++e) weight[e] = exp_opmath(shifted_s[e]);
        const opmath_t log_z = std::log(sum_of<opmath_t>(weight, E));
        student_lse[t] = s_max + log_z;
        opmath_t kl;
        bool negative_probability = false;
        if (teacher_logits) {
          // p = w / Z_a with w = exp(a - m_a): KL = sum_e w ((a - m_a) - (s - m)) / Z_a + log Z - log Z_a.
          const opmath_t a_max = max_of(p, E);
          for (int64_t e = 0; e < E; ++e) weight[e] = exp_opmath(p[e] - a_max);
          const opmath_t z_a = sum_of<opmath_t>(weight, E);
          for (int64_t e = 0; e < E; ++e) term[e] = weight[e] * ((p[e] - a_max) - shifted_s[e]);
          teacher_lse[t] = a_max + std::log(z_a);
          kl = sum_of<opmath_t>(term, E) / z_a + log_z - std::log(z_a);
        } else {
          // KL = sum_e p (log p - (s - m)) + (sum_e p) log Z; log_opmath(0) is finite, so p = 0 adds exactly 0.
          int negative = 0;
          for (int64_t e = 0; e < E; ++e) negative |= p[e] < 0;
          for (int64_t e = 0; e < E; ++e) term[e] = p[e] * (log_opmath(p[e]) - shifted_s[e]);
          kl = sum_of<opmath_t>(term, E) + sum_of<opmath_t>(p, E) * log_z;
          negative_probability = negative != 0;
        }
        // Non-finite inputs always give a non-finite loss (an infinite logit makes its row's maximum or one term
        // infinite, and 0 * inf is NaN), so this one test per token validates them.
        if ((negative_probability || !std::isfinite(kl)) && chunk_invalid_token[chunk] < 0) {
          chunk_invalid_token[chunk] = t;
        }
        if (per_token) loss[t] = kl;
        sum += static_cast<double>(kl);
      }
      chunk_sum[chunk] = sum;
    }
  });

  for (const int64_t token : chunk_invalid_token) {
    if (token >= 0) return token;
  }
  if (!per_token) {
    double total = 0;
    for (const double sum : chunk_sum) total += sum;
    *loss = static_cast<opmath_t>(shape.reduction == Reduction::kMean ? total / static_cast<double>(T) : total);
  }
  return -1;
}

template <typename scalar_t>
void backward_impl(const LossShape& shape, const at::opmath_type<scalar_t>* grad_loss, const scalar_t* student_logits,
                   const scalar_t* teacher, const at::opmath_type<scalar_t>* student_lse,
                   const at::opmath_type<scalar_t>* teacher_lse, scalar_t* grad_student_logits) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = shape.tokens, E = shape.experts;
  const bool per_token = shape.reduction == Reduction::kNone;
  const bool teacher_logits = shape.teacher_format == TeacherFormat::kLogits;
  const opmath_t shared_grad =
      per_token ? opmath_t(0) : (shape.reduction == Reduction::kMean ? grad_loss[0] / static_cast<opmath_t>(T)
                                                                      : grad_loss[0]);
  at::parallel_for(0, T, rows_per_chunk(shape), [&](int64_t begin, int64_t end) {
    RowBuffers<opmath_t> buffers(E);
    opmath_t* grad = buffers.term.data();
    opmath_t* teacher_probability = buffers.weight.data();
    for (int64_t t = begin; t < end; ++t) {
      const opmath_t* s = opmath_row(student_logits + t * E, E, buffers.student.data());
      const opmath_t* p = opmath_row(teacher + t * E, E, buffers.teacher.data());
      // dKL/ds = (sum_e p) q - p: the teacher's mass is 1 for logits, and whatever the given row sums to.
      opmath_t teacher_mass = 1;
      if (teacher_logits) {
        const opmath_t a_lse = teacher_lse[t];
        for (int64_t e = 0; e < E; ++e) teacher_probability[e] = exp_opmath(p[e] - a_lse);
        p = teacher_probability;
      } else {
        teacher_mass = sum_of<opmath_t>(p, E);
      }
      const opmath_t g = per_token ? grad_loss[t] : shared_grad;
      const opmath_t g_mass = g * teacher_mass;
      const opmath_t s_lse = student_lse[t];
      scalar_t* out = grad_student_logits + t * E;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        for (int64_t e = 0; e < E; ++e) out[e] = g_mass * exp_opmath(s[e] - s_lse) - g * p[e];
      } else {
        for (int64_t e = 0; e < E; ++e) grad[e] = g_mass * exp_opmath(s[e] - s_lse) - g * p[e];
        for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(grad[e]);
      }
    }
  });
}

}  // namespace

int64_t forward(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher,
                at::Tensor& loss, at::Tensor& student_lse, at::Tensor& teacher_lse) {
  int64_t invalid_token = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(),
                                  "visionmoe_teacher_routing_loss_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    invalid_token = forward_impl<scalar_t>(shape, student_logits.const_data_ptr<scalar_t>(),
                                           teacher.const_data_ptr<scalar_t>(), loss.mutable_data_ptr<opmath_t>(),
                                           student_lse.mutable_data_ptr<opmath_t>(),
                                           teacher_lse.mutable_data_ptr<opmath_t>());
  });
  return invalid_token;
}

void backward(const LossShape& shape, const at::Tensor& grad_loss, const at::Tensor& student_logits,
              const at::Tensor& teacher, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
              at::Tensor& grad_student_logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(),
                                  "visionmoe_teacher_routing_loss_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t>(shape, grad_loss.const_data_ptr<opmath_t>(), student_logits.const_data_ptr<scalar_t>(),
                            teacher.const_data_ptr<scalar_t>(), student_lse.const_data_ptr<opmath_t>(),
                            teacher_lse.const_data_ptr<opmath_t>(), grad_student_logits.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace visionmoe::teacher_routing::cpu
