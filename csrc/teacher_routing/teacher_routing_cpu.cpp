// CPU kernels of the teacher-routing loss. Tokens are split into chunks of a fixed number of rows (independent
// of the thread count); a task owns whole chunks and handles each row in one visit, with vectorised loops over
// its experts (see teacher_routing.h for the formulas), compiled for AVX-512, AVX2 and the baseline
// (VISIONMOE_CPU_CLONES). The mean and the sum add the tokens' losses of a chunk in token order and then the
// chunks' partials in chunk order: no atomics, and the same result whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/vectorized_math.h"
#include "teacher_routing/teacher_routing.h"

namespace visionmoe::teacher_routing::cpu {
namespace {

using vectorized_math::exp_opmath;
using vectorized_math::kLanes;
using vectorized_math::log_opmath;
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

// Scratch of one task: a row in the opmath type and the backward's gradient row, [E] each; the forward's
// per-token sums of one chunk, [rows per chunk] each; and, for E < kLanes, a block of kLanes rows transposed,
// [E, kLanes] each.
template <typename opmath_t>
struct Buffers {
  Buffers(int64_t experts, int64_t chunk_rows)
      : student(experts),
        teacher(experts),
        grad(experts),
        student_max(chunk_rows),
        teacher_max(chunk_rows),
        student_sum(chunk_rows),
        teacher_sum(chunk_rows),
        cross(chunk_rows),
        kl(chunk_rows),
        negative(chunk_rows),
        student_block(experts < kLanes ? experts * kLanes : 0),
        teacher_block(student_block.size()) {}
  std::vector<opmath_t> student, teacher, grad;
  std::vector<opmath_t> student_max, teacher_max, student_sum, teacher_sum, cross, kl;
  std::vector<int> negative;
  std::vector<opmath_t> student_block, teacher_block;
};

template <typename scalar_t>
struct ForwardRows {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t experts;
  bool teacher_logits;
  const scalar_t* student_logits;
  const scalar_t* teacher;
  opmath_t* row_loss;  // [T] for reduction "none", else null
  opmath_t* student_lse;
  opmath_t* teacher_lse;  // [T] for teacher logits, else unused
};

struct ChunkResult {
  double loss_sum = 0;         // the chunk's losses added in token order, in double whatever the dtype
  int64_t invalid_token = -1;  // the chunk's first token with a non-finite loss or a negative probability
};

// The row's maximum. The `omp simd` reductions of the row loops let the compiler vectorise them with one partial
// result per vector lane, combined in an order fixed at compile time for each instruction set: deterministic on a
// machine, whatever the number of threads (OpenMP's simd pragmas only; no threads are involved).
template <typename opmath_t>
VISIONMOE_ALWAYS_INLINE opmath_t row_max(const opmath_t* __restrict__ x, int64_t n) {
  opmath_t result = -std::numeric_limits<opmath_t>::infinity();
#pragma omp simd reduction(max : result)
  for (int64_t e = 0; e < n; ++e) result = x[e] > result ? x[e] : result;
  return result;
}

// Per-token sums for tokens [first, first + R), into buffers' per-token arrays, for E >= kLanes: each row is
// visited once, its maxima, then one loop that sums the exponentials and the KL terms (see teacher_routing.h).
template <typename scalar_t>
VISIONMOE_ALWAYS_INLINE void row_sums(const ForwardRows<scalar_t>& rows, int64_t first, int64_t R,
                                      Buffers<at::opmath_type<scalar_t>>& buffers) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t E = rows.experts;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = first + r;
    const opmath_t* __restrict__ s = opmath_row(rows.student_logits + t * E, E, buffers.student.data());
    const opmath_t* __restrict__ p = opmath_row(rows.teacher + t * E, E, buffers.teacher.data());
    const opmath_t s_max = row_max(s, E);
    opmath_t z = 0, z_teacher = 0, cross_term = 0;
    int row_negative = 0;
    if (rows.teacher_logits) {
      // cross = sum_e w ((a - m_a) - (s - m)) with w = exp(a - m_a); the teacher's sum is Z_a = sum_e w.
      const opmath_t a_max = row_max(p, E);
#pragma omp simd reduction(+ : z, z_teacher, cross_term)
      for (int64_t e = 0; e < E; ++e) {
        const opmath_t shifted_s = s[e] - s_max, shifted_a = p[e] - a_max;
        const opmath_t w = exp_opmath(shifted_a);
        z += exp_opmath(shifted_s);
        z_teacher += w;
        cross_term += w * (shifted_a - shifted_s);
      }
      buffers.teacher_max[r] = a_max;
    } else {
      // cross = sum_e p (log p - (s - m)), where p = 0 adds 0 as log_opmath(0) is finite; the teacher's sum is
      // sum_e p.
#pragma omp simd reduction(+ : z, z_teacher, cross_term) reduction(| : row_negative)
      for (int64_t e = 0; e < E; ++e) {
        const opmath_t shifted_s = s[e] - s_max;
        z += exp_opmath(shifted_s);
        z_teacher += p[e];
        cross_term += p[e] * (log_opmath(p[e]) - shifted_s);
        row_negative |= p[e] < 0;
      }
    }
    buffers.student_max[r] = s_max;
    buffers.student_sum[r] = z;
    buffers.teacher_sum[r] = z_teacher;
    buffers.cross[r] = cross_term;
    buffers.negative[r] = row_negative;
  }
}

// Copies rows [first, first + rows) of a [T, E] tensor into block [E, kLanes], in the opmath type; the lanes
// of missing rows (at the end of a chunk) get zeros, which keep every lane finite.
template <typename opmath_t, typename scalar_t>
VISIONMOE_ALWAYS_INLINE void transpose_block(const scalar_t* x, int64_t E, int64_t first, int64_t rows,
                                             opmath_t* __restrict__ block) {
  for (int64_t l = 0; l < rows; ++l) {
    for (int64_t e = 0; e < E; ++e) block[e * kLanes + l] = static_cast<opmath_t>(x[(first + l) * E + e]);
  }
  for (int64_t l = rows; l < kLanes; ++l) {
    for (int64_t e = 0; e < E; ++e) block[e * kLanes + l] = opmath_t(0);
  }
}

// The same per-token sums for E < kLanes, where a row is shorter than a vector: kLanes rows at a time are
// transposed so that each token has one vector lane, and every step is an elementwise vector operation, the sums
// over the experts running in expert order.
template <typename scalar_t>
VISIONMOE_ALWAYS_INLINE void block_sums(const ForwardRows<scalar_t>& rows, int64_t first, int64_t R,
                                        Buffers<at::opmath_type<scalar_t>>& buffers) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t E = rows.experts;
  opmath_t* __restrict__ s = buffers.student_block.data();  // s[e * kLanes + l]: logit e of the block's token l
  opmath_t* __restrict__ p = buffers.teacher_block.data();
  for (int64_t block = 0; block < R; block += kLanes) {
    const int64_t block_rows = std::min(kLanes, R - block);
    transpose_block(rows.student_logits, E, first + block, block_rows, s);
    transpose_block(rows.teacher, E, first + block, block_rows, p);
    opmath_t s_max[kLanes], a_max[kLanes], z[kLanes] = {}, z_teacher[kLanes] = {}, cross_term[kLanes] = {};
    int row_negative[kLanes] = {};
    for (int64_t l = 0; l < kLanes; ++l) s_max[l] = s[l], a_max[l] = p[l];
    for (int64_t e = 1; e < E; ++e) {
      for (int64_t l = 0; l < kLanes; ++l) {
        s_max[l] = s[e * kLanes + l] > s_max[l] ? s[e * kLanes + l] : s_max[l];
        a_max[l] = p[e * kLanes + l] > a_max[l] ? p[e * kLanes + l] : a_max[l];
      }
    }
    if (rows.teacher_logits) {
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const opmath_t shifted_s = s[e * kLanes + l] - s_max[l], shifted_a = p[e * kLanes + l] - a_max[l];
          const opmath_t w = exp_opmath(shifted_a);
          z[l] += exp_opmath(shifted_s);
          z_teacher[l] += w;
          cross_term[l] += w * (shifted_a - shifted_s);
        }
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const opmath_t probability = p[e * kLanes + l], shifted_s = s[e * kLanes + l] - s_max[l];
          z[l] += exp_opmath(shifted_s);
          z_teacher[l] += probability;
          cross_term[l] += probability * (log_opmath(probability) - shifted_s);
          row_negative[l] |= probability < 0;
        }
      }
    }
    for (int64_t l = 0; l < block_rows; ++l) {
      buffers.student_max[block + l] = s_max[l];
      buffers.teacher_max[block + l] = a_max[l];
      buffers.student_sum[block + l] = z[l];
      buffers.teacher_sum[block + l] = z_teacher[l];
      buffers.cross[block + l] = cross_term[l];
      buffers.negative[block + l] = row_negative[l];
    }
  }
}

// The losses of tokens [first, last), at most one chunk: the per-token sums, then the logarithms of those sums
// as one vectorised loop over the chunk's tokens, then the chunk's total in token order.
template <typename scalar_t>
VISIONMOE_CPU_CLONES ChunkResult forward_rows(const ForwardRows<scalar_t>& rows, int64_t first, int64_t last,
                                              Buffers<at::opmath_type<scalar_t>>& buffers) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t R = last - first;
  if (rows.experts < kLanes) {
    block_sums(rows, first, R, buffers);
  } else {
    row_sums(rows, first, R, buffers);
  }
  const opmath_t* __restrict__ student_max = buffers.student_max.data();
  const opmath_t* __restrict__ teacher_max = buffers.teacher_max.data();
  const opmath_t* __restrict__ student_sum = buffers.student_sum.data();
  const opmath_t* __restrict__ teacher_sum = buffers.teacher_sum.data();
  const opmath_t* __restrict__ cross = buffers.cross.data();
  const int* __restrict__ negative = buffers.negative.data();
  opmath_t* __restrict__ kl = buffers.kl.data();

  // log Z = log sum_e exp(s - m) >= 0, and so is log Z_a: log_opmath's normal range.
  opmath_t* __restrict__ student_lse = rows.student_lse + first;
  if (rows.teacher_logits) {
    opmath_t* __restrict__ teacher_lse = rows.teacher_lse + first;
    for (int64_t r = 0; r < R; ++r) {
      const opmath_t log_z = log_opmath(student_sum[r]), log_z_a = log_opmath(teacher_sum[r]);
      student_lse[r] = student_max[r] + log_z;
      teacher_lse[r] = teacher_max[r] + log_z_a;
      kl[r] = cross[r] / teacher_sum[r] + log_z - log_z_a;  // KL = cross / Z_a + log Z - log Z_a
    }
  } else {
    for (int64_t r = 0; r < R; ++r) {
      const opmath_t log_z = log_opmath(student_sum[r]);
      student_lse[r] = student_max[r] + log_z;
      kl[r] = cross[r] + teacher_sum[r] * log_z;  // KL = cross + (sum_e p) log Z
    }
  }

  ChunkResult result;
  for (int64_t r = 0; r < R; ++r) {
    // A non-finite input always makes its token's cross term non-finite (an infinite logit makes the row's
    // maximum or one term infinite, 0 * inf is NaN, and NaN propagates), so this one test per token validates
    // the inputs.
    if ((negative[r] != 0 || !std::isfinite(kl[r])) && result.invalid_token < 0) result.invalid_token = first + r;
    result.loss_sum += static_cast<double>(kl[r]);
  }
  if (rows.row_loss != nullptr) std::copy(kl, kl + R, rows.row_loss + first);
  return result;
}

template <typename scalar_t>
int64_t forward_impl(const LossShape& shape, const ForwardRows<scalar_t>& rows, at::opmath_type<scalar_t>* loss) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = shape.tokens;
  const int64_t chunk_rows = rows_per_chunk(shape);
  const int64_t num_chunks = (T + chunk_rows - 1) / chunk_rows;
  std::vector<ChunkResult> chunks(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    Buffers<opmath_t> buffers(shape.experts, chunk_rows);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      chunks[chunk] = forward_rows(rows, chunk * chunk_rows, std::min(T, (chunk + 1) * chunk_rows), buffers);
    }
  });
  for (const ChunkResult& chunk : chunks) {
    if (chunk.invalid_token >= 0) return chunk.invalid_token;
  }
  if (shape.reduction != Reduction::kNone) {
    double total = 0;
    for (const ChunkResult& chunk : chunks) total += chunk.loss_sum;
    *loss = static_cast<opmath_t>(shape.reduction == Reduction::kMean ? total / static_cast<double>(T) : total);
  }
  return -1;
}

template <typename scalar_t>
struct BackwardRows {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t experts;
  bool teacher_logits;
  const opmath_t* grad_loss;  // [T] for reduction "none", else null
  opmath_t shared_grad;       // the upstream gradient of every token's loss for "mean" and "sum"
  const scalar_t* student_logits;
  const scalar_t* teacher;
  const opmath_t* student_lse;
  const opmath_t* teacher_lse;
  scalar_t* grad_student_logits;
};

// dLoss/ds = g (P q - p) for tokens [first, last), with P = sum_e p, 1 for teacher logits.
template <typename scalar_t>
VISIONMOE_CPU_CLONES void backward_rows(const BackwardRows<scalar_t>& rows, int64_t first, int64_t last,
                                        Buffers<at::opmath_type<scalar_t>>& buffers) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kOpmathInput = std::is_same_v<scalar_t, opmath_t>;
  const int64_t E = rows.experts;
  for (int64_t t = first; t < last; ++t) {
    const opmath_t* __restrict__ s = opmath_row(rows.student_logits + t * E, E, buffers.student.data());
    const opmath_t* __restrict__ p = opmath_row(rows.teacher + t * E, E, buffers.teacher.data());
    scalar_t* __restrict__ out = rows.grad_student_logits + t * E;
    // Written in place for float32 and float64, else in the opmath type and then rounded.
    opmath_t* __restrict__ grad;
    if constexpr (kOpmathInput) {
      grad = out;
    } else {
      grad = buffers.grad.data();
    }
    const opmath_t g = rows.grad_loss != nullptr ? rows.grad_loss[t] : rows.shared_grad;
    const opmath_t s_lse = rows.student_lse[t];
    if (rows.teacher_logits) {
      const opmath_t a_lse = rows.teacher_lse[t];
      for (int64_t e = 0; e < E; ++e) grad[e] = g * (exp_opmath(s[e] - s_lse) - exp_opmath(p[e] - a_lse));
    } else {
      const opmath_t g_mass = g * sum_of<opmath_t>(p, E);
      for (int64_t e = 0; e < E; ++e) grad[e] = g_mass * exp_opmath(s[e] - s_lse) - g * p[e];
    }
    if constexpr (!kOpmathInput) {
      for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(grad[e]);
    }
  }
}

}  // namespace

int64_t forward(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher, at::Tensor& loss,
                at::Tensor& student_lse, at::Tensor& teacher_lse) {
  int64_t invalid_token = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student_logits.scalar_type(), "visionmoe_teacher_routing_loss_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const bool per_token = shape.reduction == Reduction::kNone;
        const ForwardRows<scalar_t> rows{shape.experts,
                                         shape.teacher_format == TeacherFormat::kLogits,
                                         student_logits.const_data_ptr<scalar_t>(),
                                         teacher.const_data_ptr<scalar_t>(),
                                         per_token ? loss.mutable_data_ptr<opmath_t>() : nullptr,
                                         student_lse.mutable_data_ptr<opmath_t>(),
                                         teacher_lse.mutable_data_ptr<opmath_t>()};
        invalid_token = forward_impl(shape, rows, loss.mutable_data_ptr<opmath_t>());
      });
  return invalid_token;
}

void backward(const LossShape& shape, const at::Tensor& grad_loss, const at::Tensor& student_logits,
              const at::Tensor& teacher, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
              at::Tensor& grad_student_logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student_logits.scalar_type(), "visionmoe_teacher_routing_loss_bwd_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t* grad = grad_loss.const_data_ptr<opmath_t>();
        const bool per_token = shape.reduction == Reduction::kNone;
        const opmath_t shared_grad = per_token ? opmath_t(0)
                                     : shape.reduction == Reduction::kMean
                                         ? grad[0] / static_cast<opmath_t>(shape.tokens)
                                         : grad[0];
        const BackwardRows<scalar_t> rows{shape.experts,
                                          shape.teacher_format == TeacherFormat::kLogits,
                                          per_token ? grad : nullptr,
                                          shared_grad,
                                          student_logits.const_data_ptr<scalar_t>(),
                                          teacher.const_data_ptr<scalar_t>(),
                                          student_lse.const_data_ptr<opmath_t>(),
                                          teacher_lse.const_data_ptr<opmath_t>(),
                                          grad_student_logits.mutable_data_ptr<scalar_t>()};
        at::parallel_for(0, shape.tokens, rows_per_chunk(shape), [&](int64_t begin, int64_t end) {
          Buffers<opmath_t> buffers(shape.experts, 0);
          backward_rows(rows, begin, end, buffers);
        });
      });
}

}  // namespace visionmoe::teacher_routing::cpu

namespace visionmoe::teacher_routing {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_routing_loss_cpu(const at::Tensor& student_logits,
                                                                        const at::Tensor& teacher,
                                                                        c10::string_view reduction,
                                                                        c10::string_view teacher_format) {
  return run_teacher_routing_loss(&cpu::forward, student_logits, teacher, reduction, teacher_format);
}

at::Tensor teacher_routing_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                             const at::Tensor& teacher, const at::Tensor& student_lse,
                                             const at::Tensor& teacher_lse, c10::string_view reduction,
                                             c10::string_view teacher_format) {
  return run_teacher_routing_loss_backward(&cpu::backward, grad_loss, student_logits, teacher, student_lse, teacher_lse,
                                           reduction, teacher_format);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("teacher_routing_loss", &teacher_routing_loss_cpu);
  m.impl("teacher_routing_loss_backward", &teacher_routing_loss_backward_cpu);
}

}  // namespace visionmoe::teacher_routing
