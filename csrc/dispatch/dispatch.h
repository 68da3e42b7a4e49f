// Expert dispatch and combine: the routing plan's operators.
//
// A routing plan lists M assignments in expert-major order (stable within an expert, so earlier assignments
// have priority). For assignment a: sorted_token[a] is its token, sorted_expert[a] its expert, slot[a] its rank
// within the expert, and offsets[e] .. offsets[e + 1] the expert's segment. With a capacity C an assignment is
// kept when slot[a] < C; without one (dropless) every assignment is kept. The token-major view
// (token_offsets [T + 1], token_rows [M]) lists, per token, its assignments in increasing order.
//
// Expert rows live in one of two layouts:
//   padded [E, C, D]: assignment a is row sorted_expert[a] * C + slot[a]; empty slots are zero;
//   packed [M, D]:    assignment a is row a; dropped assignments' rows are zero.
//
// What the operators assume of a plan (make_plan and the routers produce plans that hold it by construction):
//   offsets[0] = 0, offsets non-decreasing, offsets[E] = A;
//   sorted_expert[a] = the e with offsets[e] <= a < offsets[e + 1], and slot[a] = a - offsets[sorted_expert[a]];
//   0 <= sorted_token[a] < T;
//   token_offsets[0] = 0, non-decreasing, token_offsets[T] = A, and token_rows[token_offsets[t] ..
//   token_offsets[t + 1]) lists, increasing, the assignments a with sorted_token[a] = t.
// dispatch and combine check all of it when called with validate=True (on CUDA with one device-to-host
// synchronisation). Without it an inconsistent plan gives unspecified values, but never a read or write outside
// the tensors: every kernel bounds-checks the indices it dereferences (raising on CPU, skipping the entry on
// CUDA, where a check costs nothing beside the memory traffic).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace visionmoe::dispatch {

// Raw views of the plan that every kernel takes.
struct PlanView {
  const int64_t* sorted_token = nullptr;   // [M]
  const int64_t* sorted_expert = nullptr;  // [M]
  const int64_t* slot = nullptr;           // [M]
  const int64_t* offsets = nullptr;        // [E + 1]
  const int64_t* token_offsets = nullptr;  // [T + 1]
  const int64_t* token_rows = nullptr;     // [M]
  int64_t num_assignments = 0;             // A
  int64_t num_experts = 0;                 // E
  int64_t num_tokens = 0;                  // T
  int64_t capacity = -1;                   // C, or -1 when dropless
  int64_t dim = 0;                         // D
  bool padded = false;

  // Number of expert rows in the chosen layout: E * C (padded) or A (packed).
  C10_HOST_DEVICE int64_t num_rows() const { return padded ? num_experts * capacity : num_assignments; }
};

// Results of the row lookups below beside a valid index.
constexpr int64_t kNoAssignment = -1;  // an empty slot or a dropped assignment
constexpr int64_t kOutOfBounds = -2;   // the plan points outside its own tensors

// The assignment stored in expert row r (0 <= r < num_rows()).
C10_HOST_DEVICE inline int64_t assignment_of_row(const PlanView& plan, int64_t r) {
  if (!plan.padded) return plan.capacity < 0 || plan.slot[r] < plan.capacity ? r : kNoAssignment;
  const int64_t e = r / plan.capacity;
  const int64_t a = plan.offsets[e] + r % plan.capacity;
  if (a >= plan.offsets[e + 1]) return kNoAssignment;
  return a >= 0 && a < plan.num_assignments ? a : kOutOfBounds;
}

// The expert row of assignment a (0 <= a < A).
C10_HOST_DEVICE inline int64_t row_of_assignment(const PlanView& plan, int64_t a) {
  const int64_t slot = plan.slot[a];
  if (plan.capacity >= 0 && slot >= plan.capacity) return kNoAssignment;
  if (!plan.padded) return a;
  const int64_t e = plan.sorted_expert[a];
  return e >= 0 && e < plan.num_experts && slot >= 0 ? e * plan.capacity + slot : kOutOfBounds;
}

// Every argument check of the family lives in dispatch.cpp; the backend files only run kernels.
struct PlanTensors {
  const at::Tensor& sorted_token;
  const at::Tensor& sorted_expert;
  const at::Tensor& slot;
  const at::Tensor& offsets;
  const at::Tensor* token_offsets;  // null for operators that do not use the token-major view
  const at::Tensor* token_rows;
};

// A checked plan: contiguous copies of its index tensors (views of any stride are accepted) and the raw view of
// them that the kernels take, valid as long as this object lives.
struct CheckedPlan {
  at::Tensor sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows;
  PlanView view;
};

CheckedPlan check_plan(const char* op, const PlanTensors& plan, const at::Tensor& like, std::optional<int64_t> capacity,
                       bool padded);
// Checks everything the operators assume of a plan (see the top of this file); needs the token-major view.
void validate_plan(const char* op, const CheckedPlan& plan);
void check_rows(const char* op, const char* name, const at::Tensor& rows, const PlanView& view);
void check_make_plan_args(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
                          std::optional<int64_t> num_tokens);
void check_token_major_args(const at::Tensor& sorted_token, int64_t num_tokens);

// Backend kernels, passed to the operator bodies below. Outputs are allocated and every input is checked and
// contiguous before these run, except that a TokenMajorKernel allocates its own outputs. op names the calling
// operator in error messages.
using GroupKernel = void (*)(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
                             std::optional<int64_t> num_tokens, bool validate, at::Tensor& order,
                             at::Tensor& sorted_token, at::Tensor& sorted_expert, at::Tensor& slot,
                             at::Tensor& offsets);
using TokenMajorKernel = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& sorted_token, int64_t num_tokens);
using GatherKernel = void (*)(const PlanView& plan, const at::Tensor& x, at::Tensor& out);
using SumRowsKernel = void (*)(const char* op, const PlanView& plan, const at::Tensor& rows, const at::Tensor* weight,
                               at::Tensor& out);
using CombineBackwardKernel = void (*)(const PlanView& plan, const at::Tensor& grad_y, const at::Tensor& expert_out,
                                       const at::Tensor& weight, at::Tensor& grad_expert_out, at::Tensor& grad_weight);

// Operator bodies shared by the backends (dispatch.cpp): argument checks, contiguous copies and allocation, then
// `kernel` under a guard for the inputs' device. Each backend file passes its kernels and registers the result
// with the dispatcher, so no host code branches on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_make_plan(
    GroupKernel kernel, const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
    std::optional<int64_t> num_tokens, bool validate);
std::tuple<at::Tensor, at::Tensor> run_token_major(TokenMajorKernel kernel, const at::Tensor& sorted_token,
                                                   int64_t num_tokens);
at::Tensor run_dispatch(GatherKernel kernel, const at::Tensor& x, const at::Tensor& sorted_token,
                        const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                        const at::Tensor& token_offsets, const at::Tensor& token_rows, std::optional<int64_t> capacity,
                        bool padded, bool validate);
at::Tensor run_dispatch_backward(SumRowsKernel kernel, const at::Tensor& grad_out, const at::Tensor& sorted_token,
                                 const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                                 const at::Tensor& token_offsets, const at::Tensor& token_rows,
                                 std::optional<int64_t> capacity);
at::Tensor run_combine(SumRowsKernel kernel, const at::Tensor& expert_out, const at::Tensor& weight,
                       const at::Tensor& sorted_token, const at::Tensor& sorted_expert, const at::Tensor& slot,
                       const at::Tensor& offsets, const at::Tensor& token_offsets, const at::Tensor& token_rows,
                       std::optional<int64_t> capacity, bool validate);
std::tuple<at::Tensor, at::Tensor> run_combine_backward(CombineBackwardKernel kernel, const at::Tensor& grad_y,
                                                        const at::Tensor& expert_out, const at::Tensor& weight,
                                                        const at::Tensor& sorted_token, const at::Tensor& sorted_expert,
                                                        const at::Tensor& slot, const at::Tensor& offsets,
                                                        std::optional<int64_t> capacity);

namespace cpu {
// The plan's grouping by expert and its token-major view; the routers' CPU paths use token_major too.
void make_plan(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
               std::optional<int64_t> num_tokens, bool validate, at::Tensor& order, at::Tensor& sorted_token,
               at::Tensor& sorted_expert, at::Tensor& slot, at::Tensor& offsets);
std::tuple<at::Tensor, at::Tensor> token_major(const at::Tensor& sorted_token, int64_t num_tokens);
void stable_counting_sort(const int64_t* keys, int64_t n, int64_t num_buckets, int64_t* order, int64_t* offsets,
                          const char* op, const char* key_name);
void gather_rows(const PlanView& plan, const at::Tensor& x, at::Tensor& out);
void sum_rows_per_token(const char* op, const PlanView& plan, const at::Tensor& rows, const at::Tensor* weight,
                        at::Tensor& out);
void combine_backward(const PlanView& plan, const at::Tensor& grad_y, const at::Tensor& expert_out,
                      const at::Tensor& weight, at::Tensor& grad_expert_out, at::Tensor& grad_weight);
}  // namespace cpu

#ifdef VISIONMOE_WITH_CUDA
namespace cuda {
// The plan's grouping by expert and its token-major view; the routers' CUDA paths use both too.
void make_plan(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
               std::optional<int64_t> num_tokens, bool validate, at::Tensor& order, at::Tensor& sorted_token,
               at::Tensor& sorted_expert, at::Tensor& slot, at::Tensor& offsets);
std::tuple<at::Tensor, at::Tensor> token_major(const at::Tensor& sorted_token, int64_t num_tokens);
void group_by_expert(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
                     at::Tensor& order, at::Tensor& sorted_token, at::Tensor& sorted_expert, at::Tensor& slot,
                     at::Tensor& offsets);
void gather_rows(const PlanView& plan, const at::Tensor& x, at::Tensor& out);
void sum_rows_per_token(const PlanView& plan, const at::Tensor& rows, const at::Tensor* weight, at::Tensor& out);
void combine_backward(const PlanView& plan, const at::Tensor& grad_y, const at::Tensor& expert_out,
                      const at::Tensor& weight, at::Tensor& grad_expert_out, at::Tensor& grad_weight);
}  // namespace cuda
#endif

}  // namespace visionmoe::dispatch
