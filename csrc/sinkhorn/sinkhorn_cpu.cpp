// CPU kernels of the Sinkhorn family. Each group's rows are split into chunks of a fixed size (independent of
// the thread count); a task owns one chunk, so it alone writes its rows, and per-expert sums over tokens add
// one partial per chunk, in chunk order. No atomics, and the same result whatever the number of threads.
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
#include "sinkhorn/sinkhorn.h"

namespace visionmoe::sinkhorn::cpu {
namespace {

using vectorized_math::exp_opmath;
using vectorized_math::max_of;
using vectorized_math::sum_of;

// Logits per chunk: enough work to outweigh scheduling a task, and few enough that the chunk's rows are still
// in cache when the column pass reads them again after the row pass.
constexpr int64_t kChunkElements = 8192;
// Experts per task when combining the chunks' partial column sums.
constexpr int64_t kCombineGrain = 64;
struct Chunks {
  explicit Chunks(const SinkhornShape& shape)
      : tokens(shape.tokens),
        rows(std::max<int64_t>(1, kChunkElements / shape.experts)),
        per_group((shape.tokens + rows - 1) / rows),
        count(shape.groups * per_group) {}
  int64_t group(int64_t chunk) const { return chunk / per_group; }
  int64_t first_token(int64_t chunk) const { return chunk % per_group * rows; }
  int64_t end_token(int64_t chunk) const { return std::min(tokens, first_token(chunk) + rows); }

  int64_t tokens;     // T
  int64_t rows;       // tokens per chunk (the last chunk of a group may hold fewer)
  int64_t per_group;  // chunks per group
  int64_t count;      // chunks in all groups: the tasks of every pass
};

// log(T / E): the log of every expert's column sum in the plan.
template <typename opmath_t>
opmath_t log_column_mass(const SinkhornShape& shape) {
  return static_cast<opmath_t>(std::log(static_cast<double>(shape.tokens)) -
                               std::log(static_cast<double>(shape.experts)));
}

// The column step needs logsumexp_t(L_te + u_t) = log(sum_t P_te) - v'_e, with P_te = exp(L_te + v'_e + u_t) the
// row-normalised plan, whose entries the row step computes anyway: one exponential per entry and iteration
// instead of two, and no max pass over the columns. Entries of P below the smallest normal number m underflow,
// which changes a column sum of at least sqrt(m) by less than T m / sqrt(m) = T sqrt(m), relatively (2e-15 for
// float at T = 16384). A group with a smaller column sum (an expert whose entries of P are all below about
// e^-44 / T in float, e^-354 / T in double) takes the column step again, the stable way: a max pass, then the sum.
template <typename opmath_t>
opmath_t min_exact_column_sum() {
  return std::sqrt(std::numeric_limits<opmath_t>::min());
}

template <typename scalar_t>
void forward_impl(const SinkhornShape& shape, const scalar_t* logits, const at::opmath_type<scalar_t>* row_max,
                  scalar_t* log_plan, at::opmath_type<scalar_t>* row_potentials,
                  at::opmath_type<scalar_t>* column_potentials) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t G = shape.groups, T = shape.tokens, E = shape.experts, K = shape.iterations;
  const Chunks chunks(shape);
  const opmath_t column_mass = log_column_mass<opmath_t>(shape);
  constexpr opmath_t kNegInf = -std::numeric_limits<opmath_t>::infinity();
  // Per chunk and expert: sum_t P_te over the chunk's tokens; in a group that needs the max pass,
  // sum_t exp(L_te + u_t - max) with the maximum in chunk_max.
  std::vector<opmath_t> chunk_sum(chunks.count * E), chunk_max(chunks.count * E);
  std::vector<char> needs_max_pass(G);
  const std::vector<opmath_t> initial_column_potentials(E, opmath_t(0));
  auto previous_column_potentials = [&](int64_t g, int64_t k) {
    return k == 0 ? initial_column_potentials.data() : column_potentials + (g * K + k - 1) * E;
  };

  for (int64_t k = 0; k < K; ++k) {
    // Row step, u_t = -logsumexp_e(L_te + v'_e), and the chunk's column sums of P_te = exp(L_te + v'_e + u_t).
    at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> plan_row(E);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t g = chunks.group(chunk);
        const opmath_t* v_prev = previous_column_potentials(g, k);
        opmath_t* u = row_potentials + (g * K + k) * T;
        opmath_t* column_sum = chunk_sum.data() + chunk * E;
        std::fill(column_sum, column_sum + E, opmath_t(0));
        for (int64_t t = chunks.first_token(chunk); t < chunks.end_token(chunk); ++t) {
          const scalar_t* row = logits + (g * T + t) * E;
          const opmath_t m_t = row_max[g * T + t];
          for (int64_t e = 0; e < E; ++e) plan_row[e] = (static_cast<opmath_t>(row[e]) - m_t) + v_prev[e];
          const opmath_t row_max = max_of(plan_row.data(), E);
          for (int64_t e = 0; e < E; ++e) plan_row[e] = exp_opmath(plan_row[e] - row_max);
          const opmath_t row_sum = sum_of<opmath_t>(plan_row.data(), E);
          u[t] = -(row_max + std::log(row_sum));
          const opmath_t inverse_row_sum = opmath_t(1) / row_sum;
          for (int64_t e = 0; e < E; ++e) column_sum[e] += plan_row[e] * inverse_row_sum;
        }
      }
    });
    // Column step, v_e = log(T / E) + v'_e - log(sum_t P_te), adding the chunks' sums in chunk order.
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const opmath_t* v_prev = previous_column_potentials(g, k);
        opmath_t* v = column_potentials + (g * K + k) * E;
        needs_max_pass[g] = false;
        for (int64_t e = 0; e < E; ++e) {
          opmath_t sum = 0;
          for (int64_t c = 0; c < chunks.per_group; ++c) sum += chunk_sum[(g * chunks.per_group + c) * E + e];
          needs_max_pass[g] |= !(sum >= min_exact_column_sum<opmath_t>());
          v[e] = column_mass + v_prev[e] - std::log(sum);
        }
      }
    });
    if (std::none_of(needs_max_pass.begin(), needs_max_pass.end(), [](char flag) { return flag; })) continue;

    // The column step again, with a max pass, in the groups that need it: each chunk's maximum of L_te + u_t and
    // sum of exp(L_te + u_t - max), then their merge in chunk order.
    at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t g = chunks.group(chunk);
        if (!needs_max_pass[g]) continue;
        const opmath_t* u = row_potentials + (g * K + k) * T;
        opmath_t* column_max = chunk_max.data() + chunk * E;
        opmath_t* column_sum = chunk_sum.data() + chunk * E;
        std::fill(column_max, column_max + E, kNegInf);
        for (int64_t t = chunks.first_token(chunk); t < chunks.end_token(chunk); ++t) {
          const scalar_t* row = logits + (g * T + t) * E;
          const opmath_t m_t = row_max[g * T + t], u_t = u[t];
          for (int64_t e = 0; e < E; ++e) {
            column_max[e] = std::max(column_max[e], (static_cast<opmath_t>(row[e]) - m_t) + u_t);
          }
        }
        std::fill(column_sum, column_sum + E, opmath_t(0));
        for (int64_t t = chunks.first_token(chunk); t < chunks.end_token(chunk); ++t) {
          const scalar_t* row = logits + (g * T + t) * E;
          const opmath_t m_t = row_max[g * T + t], u_t = u[t];
          for (int64_t e = 0; e < E; ++e) {
            column_sum[e] += exp_opmath((static_cast<opmath_t>(row[e]) - m_t) + u_t - column_max[e]);
          }
        }
      }
    });
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        if (!needs_max_pass[g]) continue;
        for (int64_t e = 0; e < E; ++e) {
          const int64_t first = g * chunks.per_group * E + e, last = first + chunks.per_group * E;
          opmath_t overall_max = kNegInf;
          for (int64_t p = first; p < last; p += E) overall_max = std::max(overall_max, chunk_max[p]);
          opmath_t sum = 0;
          for (int64_t p = first; p < last; p += E) sum += chunk_sum[p] * exp_opmath(chunk_max[p] - overall_max);
          column_potentials[(g * K + k) * E + e] = column_mass - (overall_max + std::log(sum));
        }
      }
    });
  }

  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t g = chunks.group(chunk);
      const opmath_t* u = row_potentials + (g * K + K - 1) * T;
      const opmath_t* v = column_potentials + (g * K + K - 1) * E;
      for (int64_t t = chunks.first_token(chunk); t < chunks.end_token(chunk); ++t) {
        const scalar_t* row = logits + (g * T + t) * E;
        scalar_t* out = log_plan + (g * T + t) * E;
        const opmath_t m_t = row_max[g * T + t], u_t = u[t];
        for (int64_t e = 0; e < E; ++e) {
          out[e] = static_cast<scalar_t>((static_cast<opmath_t>(row[e]) - m_t) + u_t + v[e]);
        }
      }
    }
  });
}

// Sums the chunks' partial column sums of every group, in chunk order: out [G, E].
template <typename opmath_t>
void sum_chunk_partials(const SinkhornShape& shape, const Chunks& chunks, const std::vector<opmath_t>& partials,
                        opmath_t* out) {
  const int64_t E = shape.experts;
  at::parallel_for(0, shape.groups * E, kCombineGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / E, e = i % E;
      const int64_t first = g * chunks.per_group * E + e, last = first + chunks.per_group * E;
      opmath_t sum = 0;
      for (int64_t p = first; p < last; p += E) sum += partials[p];
      out[i] = sum;
    }
  });
}

template <typename scalar_t>
void backward_impl(const SinkhornShape& shape, const scalar_t* grad_log_plan, const scalar_t* logits,
                   const at::opmath_type<scalar_t>* row_max, const at::opmath_type<scalar_t>* row_potentials,
                   const at::opmath_type<scalar_t>* column_potentials, scalar_t* grad_logits) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = shape.tokens, E = shape.experts, K = shape.iterations;
  const Chunks chunks(shape);
  const opmath_t column_mass = log_column_mass<opmath_t>(shape);
  // dLoss/dL gathers 2K terms; it accumulates in opmath, which for float32 and float64 is grad_logits itself.
  std::vector<opmath_t> grad_buffer;
  opmath_t* grad = nullptr;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    grad = grad_logits;
  } else {
    grad_buffer.resize(shape.groups * T * E);
    grad = grad_buffer.data();
  }
  std::vector<opmath_t> column_adjoint(shape.groups * E);  // a_v of the iteration being reversed, [G, E]
  std::vector<opmath_t> chunk_partial(chunks.count * E);
  const std::vector<opmath_t> initial_column_potentials(E, opmath_t(0));

  // y = L + u^K + v^K: dL = g and a_v^K = sum_t g_te (a_u^K = sum_e g_te is taken row by row below).
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t g = chunks.group(chunk);
      opmath_t* partial = chunk_partial.data() + chunk * E;
      std::fill(partial, partial + E, opmath_t(0));
      for (int64_t t = chunks.first_token(chunk); t < chunks.end_token(chunk); ++t) {
        const scalar_t* grad_row = grad_log_plan + (g * T + t) * E;
        opmath_t* out = grad + (g * T + t) * E;
        for (int64_t e = 0; e < E; ++e) {
          const opmath_t value = static_cast<opmath_t>(grad_row[e]);
          out[e] = value;
          partial[e] += value;
        }
      }
    }
  });
  sum_chunk_partials(shape, chunks, chunk_partial, column_adjoint.data());

  for (int64_t k = K - 1; k >= 0; --k) {
    at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> column_scale(E), row_plan(E), column_term(E);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t g = chunks.group(chunk);
        const opmath_t* u = row_potentials + (g * K + k) * T;
        const opmath_t* v = column_potentials + (g * K + k) * E;
        const opmath_t* v_prev = k == 0 ? initial_column_potentials.data() : column_potentials + (g * K + k - 1) * E;
        const opmath_t* a_v = column_adjoint.data() + g * E;
        // Q_te = exp(L_te + u_t + v_e - c) = P_te / sum_t P_te = P_te * exp(v_e - v'_e - c): one exponential per
        // entry, unless P's column sums were too small for P to hold Q's significant entries (see
        // min_exact_column_sum). The test is on the exponents, which may be far above exp_opmath's range.
        for (int64_t e = 0; e < E; ++e) column_scale[e] = v[e] - v_prev[e] - column_mass;
        const bool q_from_p = max_of(column_scale.data(), E) <= -std::log(min_exact_column_sum<opmath_t>());
        if (q_from_p) {
          for (int64_t e = 0; e < E; ++e) column_scale[e] = exp_opmath(column_scale[e]);
        }
        opmath_t* partial = chunk_partial.data() + chunk * E;
        std::fill(partial, partial + E, opmath_t(0));
        for (int64_t t = chunks.first_token(chunk); t < chunks.end_token(chunk); ++t) {
          const scalar_t* row = logits + (g * T + t) * E;
          opmath_t* grad_row = grad + (g * T + t) * E;
          const opmath_t m_t = row_max[g * T + t], u_t = u[t];
          for (int64_t e = 0; e < E; ++e) {
            row_plan[e] = exp_opmath((static_cast<opmath_t>(row[e]) - m_t) + v_prev[e] + u_t);
          }
          // Column step: dL_te -= a_v_e Q_te.
          if (q_from_p) {
            for (int64_t e = 0; e < E; ++e) column_term[e] = a_v[e] * column_scale[e] * row_plan[e];
          } else {
            for (int64_t e = 0; e < E; ++e) {
              const opmath_t exponent = (static_cast<opmath_t>(row[e]) - m_t) + u_t + v[e] - column_mass;
              column_term[e] = a_v[e] * exp_opmath(exponent);
            }
          }
          for (int64_t e = 0; e < E; ++e) grad_row[e] -= column_term[e];
          const opmath_t a_u = (k == K - 1 ? sum_of<opmath_t>(grad_log_plan + (g * T + t) * E, E) : opmath_t(0)) -
                               sum_of<opmath_t>(column_term.data(), E);
          // Row step: dL_te -= a_u_t P_te, and a_v'_e -= a_u_t P_te summed over the tokens.
          for (int64_t e = 0; e < E; ++e) {
            const opmath_t term = a_u * row_plan[e];
            grad_row[e] -= term;
            partial[e] -= term;
          }
        }
      }
    });
    // a_v^{k-1}; v^0 is a constant, so the first iteration's row step ends the chain.
    if (k > 0) sum_chunk_partials(shape, chunks, chunk_partial, column_adjoint.data());
  }

  if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
    at::parallel_for(0, shape.groups * T * E, kChunkElements, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) grad_logits[i] = static_cast<scalar_t>(grad[i]);
    });
  }
}

}  // namespace

void forward(const SinkhornShape& shape, const at::Tensor& logits, const at::Tensor& row_max, at::Tensor& log_plan,
             at::Tensor& row_potentials, at::Tensor& column_potentials) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "visionmoe_sinkhorn_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t>(shape, logits.const_data_ptr<scalar_t>(), row_max.const_data_ptr<opmath_t>(),
                           log_plan.mutable_data_ptr<scalar_t>(), row_potentials.mutable_data_ptr<opmath_t>(),
                           column_potentials.mutable_data_ptr<opmath_t>());
  });
}

void backward(const SinkhornShape& shape, const at::Tensor& grad_log_plan, const at::Tensor& logits,
              const at::Tensor& row_max, const at::Tensor& row_potentials, const at::Tensor& column_potentials,
              at::Tensor& grad_logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "visionmoe_sinkhorn_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t>(shape, grad_log_plan.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
                            row_max.const_data_ptr<opmath_t>(), row_potentials.const_data_ptr<opmath_t>(),
                            column_potentials.const_data_ptr<opmath_t>(), grad_logits.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace visionmoe::sinkhorn::cpu

namespace visionmoe::sinkhorn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& logits, int64_t num_iterations,
                                                            bool validate) {
  return run_sinkhorn(&cpu::forward, logits, num_iterations, validate);
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad_log_plan, const at::Tensor& logits,
                                 const at::Tensor& row_potentials, const at::Tensor& column_potentials) {
  return run_sinkhorn_backward(&cpu::backward, grad_log_plan, logits, row_potentials, column_potentials);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cpu);
}

}  // namespace visionmoe::sinkhorn
