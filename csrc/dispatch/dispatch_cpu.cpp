// CPU kernels of the dispatch family: at::parallel_for over rows, contiguous inner loops that the compiler
// vectorises, and no atomics (every output row is written by exactly one task).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch/dispatch.h"

namespace visionmoe::dispatch::cpu {
namespace {

// Rows per task: large enough that scheduling costs little next to copying them.
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

// The assignment stored in expert row r, or kNoAssignment when the row is empty or dropped.
int64_t checked_assignment_of_row(const char* op, const PlanView& plan, int64_t r) {
  const int64_t a = assignment_of_row(plan, r);
  TORCH_CHECK_VALUE(a != kOutOfBounds, op,
                    ": plan is inconsistent: offsets must increase from 0 to M = ", plan.num_assignments,
                    " (call with validate=True for the details)");
  return a;
}

void check_token(const char* op, const PlanView& plan, int64_t a, int64_t token) {
  TORCH_CHECK_VALUE(token >= 0 && token < plan.num_tokens, op, ": token index out of range: sorted_token[", a,
                    "] = ", token, ", expected values in [0, ", plan.num_tokens, ")");
}

template <typename scalar_t>
void gather_rows_impl(const PlanView& plan, const scalar_t* x, scalar_t* out) {
  const int64_t dim = plan.dim;
  at::parallel_for(0, plan.num_rows(), row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* dst = out + r * dim;
      const int64_t a = checked_assignment_of_row("dispatch", plan, r);
      if (a == kNoAssignment) {
        std::fill(dst, dst + dim, scalar_t(0));
        continue;
      }
      const int64_t token = plan.sorted_token[a];
      check_token("dispatch", plan, a, token);
      std::memcpy(dst, x + token * dim, sizeof(scalar_t) * dim);
    }
  });
}

template <typename scalar_t>
void sum_rows_per_token_impl(const char* op, const PlanView& plan, const scalar_t* rows, const scalar_t* weight,
                             scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t dim = plan.dim;
  at::parallel_for(0, plan.num_tokens, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(dim);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      const int64_t first = plan.token_offsets[t], last = plan.token_offsets[t + 1];
      TORCH_CHECK_VALUE(
          0 <= first && first <= last && last <= plan.num_assignments, op,
          ": plan is inconsistent: token_offsets must increase from 0 to at most M = ", plan.num_assignments);
      for (int64_t j = first; j < last; ++j) {
        const int64_t a = plan.token_rows[j];
        TORCH_CHECK_VALUE(a >= 0 && a < plan.num_assignments, op, ": plan is inconsistent: token_rows[", j, "] = ", a,
                          " is not an assignment");
        const int64_t r = row_of_assignment(plan, a);
        if (r == kNoAssignment) continue;
        TORCH_CHECK_VALUE(r >= 0, op, ": plan is inconsistent: assignment ", a,
                          " (sorted_expert, slot) points outside the expert rows");
        const opmath_t w = weight == nullptr ? opmath_t(1) : static_cast<opmath_t>(weight[a]);
        const scalar_t* src = rows + r * dim;
        opmath_t* acc_data = acc.data();
        for (int64_t d = 0; d < dim; ++d) acc_data[d] += w * static_cast<opmath_t>(src[d]);
      }
      scalar_t* dst = out + t * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

template <typename scalar_t>
void combine_backward_impl(const PlanView& plan, const scalar_t* grad_y, const scalar_t* expert_out,
                           const scalar_t* weight, scalar_t* grad_expert_out, scalar_t* grad_weight) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t dim = plan.dim;
  // Dropped assignments receive no gradient; kept ones are overwritten below, each by the task owning its row.
  std::fill(grad_weight, grad_weight + plan.num_assignments, scalar_t(0));
  at::parallel_for(0, plan.num_rows(), row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* grad_row = grad_expert_out + r * dim;
      const int64_t a = checked_assignment_of_row("combine_backward", plan, r);
      if (a == kNoAssignment) {
        std::fill(grad_row, grad_row + dim, scalar_t(0));
        continue;
      }
      const int64_t token = plan.sorted_token[a];
      check_token("combine_backward", plan, a, token);
      const scalar_t* g = grad_y + token * dim;
      const scalar_t* out_row = expert_out + r * dim;
      const opmath_t w = static_cast<opmath_t>(weight[a]);
      // Independent partial sums let the compiler vectorise the dot product without reordering any one sum.
      constexpr int64_t kLanes = 16;
      opmath_t partial[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= dim; d += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const opmath_t gd = static_cast<opmath_t>(g[d + l]);
          grad_row[d + l] = static_cast<scalar_t>(w * gd);
          partial[l] += gd * static_cast<opmath_t>(out_row[d + l]);
        }
      }
      for (; d < dim; ++d) {
        const opmath_t gd = static_cast<opmath_t>(g[d]);
        grad_row[d] = static_cast<scalar_t>(w * gd);
        partial[d % kLanes] += gd * static_cast<opmath_t>(out_row[d]);
      }
      opmath_t dot = 0;
      for (int64_t l = 0; l < kLanes; ++l) dot += partial[l];
      grad_weight[a] = static_cast<scalar_t>(dot);
    }
  });
}

}  // namespace

void stable_counting_sort(const int64_t* keys, int64_t n, int64_t num_buckets, int64_t* order, int64_t* offsets,
                          const char* op, const char* key_name) {
  constexpr int64_t kChunk = 1 << 14;
  // A fixed split into chunks, independent of the thread count, keeps the result the same on every machine.
  const int64_t num_chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<int64_t> counts(num_chunks * num_buckets, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* chunk_counts = counts.data() + c * num_buckets;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
        const int64_t key = keys[i];
        TORCH_CHECK_VALUE(key >= 0 && key < num_buckets, op, ": ", key_name, " out of range: ", key_name, "[", i,
                          "] = ", key, ", expected values in [0, ", num_buckets, ")");
        ++chunk_counts[key];
      }
    }
  });
  // Exclusive prefix sum in bucket-major, chunk-minor order: bucket b's chunk-c elements start at counts[c][b].
  int64_t running = 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    offsets[b] = running;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = counts[c * num_buckets + b];
      counts[c * num_buckets + b] = running;
      running += count;
    }
  }
  offsets[num_buckets] = running;
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* next = counts.data() + c * num_buckets;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) order[next[keys[i]]++] = i;
    }
  });
}

void gather_rows(const PlanView& plan, const at::Tensor& x, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "visionmoe_dispatch_cpu", [&] {
    gather_rows_impl<scalar_t>(plan, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

void sum_rows_per_token(const char* op, const PlanView& plan, const at::Tensor& rows, const at::Tensor* weight,
                        at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "visionmoe_combine_cpu", [&] {
    sum_rows_per_token_impl<scalar_t>(op, plan, rows.const_data_ptr<scalar_t>(),
                                      weight == nullptr ? nullptr : weight->const_data_ptr<scalar_t>(),
                                      out.mutable_data_ptr<scalar_t>());
  });
}

void combine_backward(const PlanView& plan, const at::Tensor& grad_y, const at::Tensor& expert_out,
                      const at::Tensor& weight, at::Tensor& grad_expert_out, at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "visionmoe_combine_bwd_cpu", [&] {
    combine_backward_impl<scalar_t>(plan, grad_y.const_data_ptr<scalar_t>(), expert_out.const_data_ptr<scalar_t>(),
                                    weight.const_data_ptr<scalar_t>(), grad_expert_out.mutable_data_ptr<scalar_t>(),
                                    grad_weight.mutable_data_ptr<scalar_t>());
  });
}

namespace {

void validate_tokens_on_host(const at::Tensor& token_index, int64_t num_tokens) {
  const int64_t* tokens = token_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < token_index.size(0); ++i) {
    TORCH_CHECK_VALUE(tokens[i] >= 0 && tokens[i] < num_tokens, "make_plan: token_index out of range: token_index[", i,
                      "] = ", tokens[i], ", expected values in [0, ", num_tokens, ")");
  }
}

}  // namespace

void make_plan(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
               std::optional<int64_t> num_tokens, bool validate, at::Tensor& order, at::Tensor& sorted_token,
               at::Tensor& sorted_expert, at::Tensor& slot, at::Tensor& offsets) {
  const int64_t n = token_index.size(0);
  // The CPU sort checks expert indices as it counts; tokens are checked only when their range is known.
  if (validate) validate_tokens_on_host(token_index, num_tokens.value_or(std::numeric_limits<int64_t>::max()));
  stable_counting_sort(expert_index.data_ptr<int64_t>(), n, num_experts, order.data_ptr<int64_t>(),
                       offsets.data_ptr<int64_t>(), "make_plan", "expert_index");
  sorted_expert.copy_(expert_index.index_select(0, order));
  sorted_token.copy_(token_index.index_select(0, order));
  slot.copy_(at::arange(n, token_index.options()) - offsets.index_select(0, sorted_expert));
}

std::tuple<at::Tensor, at::Tensor> token_major(const at::Tensor& sorted_token, int64_t num_tokens) {
  const auto index_options = sorted_token.options();
  at::Tensor token_offsets = at::empty({num_tokens + 1}, index_options);
  at::Tensor token_rows = at::empty({sorted_token.size(0)}, index_options);
  stable_counting_sort(sorted_token.data_ptr<int64_t>(), sorted_token.size(0), num_tokens,
                       token_rows.data_ptr<int64_t>(), token_offsets.data_ptr<int64_t>(), "token_major",
                       "sorted_token");
  return {token_offsets, token_rows};
}

}  // namespace visionmoe::dispatch::cpu

namespace visionmoe::dispatch {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_cpu(const at::Tensor& token_index,
                                                                                     const at::Tensor& expert_index,
                                                                                     int64_t num_experts,
                                                                                     std::optional<int64_t> num_tokens,
                                                                                     bool validate) {
  return run_make_plan(&cpu::make_plan, token_index, expert_index, num_experts, num_tokens, validate);
}

std::tuple<at::Tensor, at::Tensor> token_major_cpu(const at::Tensor& sorted_token, int64_t num_tokens) {
  return run_token_major(&cpu::token_major, sorted_token, num_tokens);
}

at::Tensor dispatch_cpu(const at::Tensor& x, const at::Tensor& sorted_token, const at::Tensor& sorted_expert,
                        const at::Tensor& slot, const at::Tensor& offsets, const at::Tensor& token_offsets,
                        const at::Tensor& token_rows, std::optional<int64_t> capacity, bool padded, bool validate) {
  return run_dispatch(&cpu::gather_rows, x, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows,
                      capacity, padded, validate);
}

at::Tensor dispatch_backward_cpu(const at::Tensor& grad_out, const at::Tensor& sorted_token,
                                 const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                                 const at::Tensor& token_offsets, const at::Tensor& token_rows,
                                 std::optional<int64_t> capacity) {
  return run_dispatch_backward(&cpu::sum_rows_per_token, grad_out, sorted_token, sorted_expert, slot, offsets,
                               token_offsets, token_rows, capacity);
}

at::Tensor combine_cpu(const at::Tensor& expert_out, const at::Tensor& weight, const at::Tensor& sorted_token,
                       const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                       const at::Tensor& token_offsets, const at::Tensor& token_rows, std::optional<int64_t> capacity,
                       bool validate) {
  return run_combine(&cpu::sum_rows_per_token, expert_out, weight, sorted_token, sorted_expert, slot, offsets,
                     token_offsets, token_rows, capacity, validate);
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                                        const at::Tensor& weight, const at::Tensor& sorted_token,
                                                        const at::Tensor& sorted_expert, const at::Tensor& slot,
                                                        const at::Tensor& offsets, std::optional<int64_t> capacity) {
  return run_combine_backward(&cpu::combine_backward, grad_y, expert_out, weight, sorted_token, sorted_expert, slot,
                              offsets, capacity);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("make_plan", &make_plan_cpu);
  m.impl("token_major", &token_major_cpu);
  m.impl("dispatch", &dispatch_cpu);
  m.impl("dispatch_backward", &dispatch_backward_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace visionmoe::dispatch
