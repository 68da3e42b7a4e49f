// Host code of the dispatch family, shared by the backends: argument checks and output allocation. Each
// backend's file passes its kernels to the run_* bodies here and registers the result with the dispatcher.
#include "dispatch/dispatch.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <vector>

#include "common/checks.h"

namespace visionmoe::dispatch {
namespace {

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must have dtype int64, got ", t.scalar_type());
  check_device(op, name, t, "the other inputs", like);
}

void check_capacity(const char* op, std::optional<int64_t> capacity, bool padded) {
  TORCH_CHECK_VALUE(!capacity.has_value() || *capacity >= 0, op, ": capacity must be >= 0 or None (dropless), got ",
                    capacity.value_or(0));
  TORCH_CHECK_VALUE(!padded || capacity.has_value(), op,
                    ": the padded layout needs a capacity; a dropless plan (capacity None) uses the packed layout");
}

}  // namespace

CheckedPlan check_plan(const char* op, const PlanTensors& plan, const at::Tensor& like, std::optional<int64_t> capacity,
                       bool padded) {
  check_index_tensor(op, "sorted_token", plan.sorted_token, like);
  check_index_tensor(op, "sorted_expert", plan.sorted_expert, like);
  check_index_tensor(op, "slot", plan.slot, like);
  check_index_tensor(op, "offsets", plan.offsets, like);
  check_capacity(op, capacity, padded);
  const int64_t num_assignments = plan.sorted_token.size(0);
  TORCH_CHECK_VALUE(plan.sorted_expert.size(0) == num_assignments && plan.slot.size(0) == num_assignments, op,
                    ": plan shapes are inconsistent: sorted_token, sorted_expert and slot must have one length, got ",
                    plan.sorted_token.size(0), ", ", plan.sorted_expert.size(0), " and ", plan.slot.size(0));
  TORCH_CHECK_VALUE(plan.offsets.size(0) >= 2, op, ": offsets must have num_experts + 1 >= 2 entries, got ",
                    plan.offsets.size(0));
  CheckedPlan checked;
  checked.sorted_token = plan.sorted_token.contiguous();
  checked.sorted_expert = plan.sorted_expert.contiguous();
  checked.slot = plan.slot.contiguous();
  checked.offsets = plan.offsets.contiguous();
  PlanView& view = checked.view;
  view.num_assignments = num_assignments;
  view.num_experts = plan.offsets.size(0) - 1;
  view.capacity = capacity.value_or(-1);
  view.padded = padded;
  view.sorted_token = checked.sorted_token.const_data_ptr<int64_t>();
  view.sorted_expert = checked.sorted_expert.const_data_ptr<int64_t>();
  view.slot = checked.slot.const_data_ptr<int64_t>();
  view.offsets = checked.offsets.const_data_ptr<int64_t>();
  if (plan.token_offsets != nullptr) {
    check_index_tensor(op, "token_offsets", *plan.token_offsets, like);
    check_index_tensor(op, "token_rows", *plan.token_rows, like);
    TORCH_CHECK_VALUE(plan.token_offsets->size(0) >= 1, op, ": token_offsets must have num_tokens + 1 >= 1 entries");
    TORCH_CHECK_VALUE(plan.token_rows->size(0) == num_assignments, op,
                      ": plan shapes are inconsistent: token_rows must have one entry per assignment (",
                      num_assignments, "), got ", plan.token_rows->size(0));
    checked.token_offsets = plan.token_offsets->contiguous();
    checked.token_rows = plan.token_rows->contiguous();
    view.num_tokens = checked.token_offsets.size(0) - 1;
    view.token_offsets = checked.token_offsets.const_data_ptr<int64_t>();
    view.token_rows = checked.token_rows.const_data_ptr<int64_t>();
  }
  return checked;
}

namespace {

// The tensors' values on the host, with one device-to-host copy for all of them when they are on a GPU.
std::vector<at::Tensor> on_host(const std::vector<at::Tensor>& tensors) {
  if (tensors.front().is_cpu()) return tensors;
  std::vector<int64_t> lengths;
  for (const at::Tensor& t : tensors) lengths.push_back(t.numel());
  return at::cat(tensors).cpu().split_with_sizes(lengths);
}

}  // namespace

// One pass over the plan on the host: lost in the noise of a 1 ms dispatch (M = 16384, T = 8192, D = 384, two
// shared cores), where the same checks as ATen ops had taken about 6 ms.
void validate_plan(const char* op, const CheckedPlan& plan) {
  const std::vector<at::Tensor> host =
      on_host({plan.sorted_token, plan.sorted_expert, plan.slot, plan.offsets, plan.token_offsets, plan.token_rows});
  const int64_t* sorted_token = host[0].const_data_ptr<int64_t>();
  const int64_t* sorted_expert = host[1].const_data_ptr<int64_t>();
  const int64_t* slot = host[2].const_data_ptr<int64_t>();
  const int64_t* offsets = host[3].const_data_ptr<int64_t>();
  const int64_t* token_offsets = host[4].const_data_ptr<int64_t>();
  const int64_t* token_rows = host[5].const_data_ptr<int64_t>();
  const int64_t M = plan.view.num_assignments, E = plan.view.num_experts, T = plan.view.num_tokens;
  TORCH_CHECK_VALUE(offsets[0] == 0, op, ": plan is inconsistent: offsets[0] must be 0, got ", offsets[0]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(offsets[e + 1] >= offsets[e], op,
                      ": plan is inconsistent: offsets must be non-decreasing, got offsets[", e + 1,
                      "] = ", offsets[e + 1], " < offsets[", e, "] = ", offsets[e]);
  }
  TORCH_CHECK_VALUE(offsets[E] == M, op, ": plan is inconsistent: offsets[E] must be M = ", M,
                    " (the number of assignments), got ", offsets[E]);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t a = offsets[e]; a < offsets[e + 1]; ++a) {
      TORCH_CHECK_VALUE(sorted_expert[a] == e, op, ": plan is inconsistent: sorted_expert[", a,
                        "] = ", sorted_expert[a], " but offsets place assignment ", a, " in expert ", e);
      TORCH_CHECK_VALUE(slot[a] == a - offsets[e], op, ": plan is inconsistent: slot[", a, "] = ", slot[a],
                        " but assignment ", a, " is number ", a - offsets[e],
                        " of its expert (slot[a] must be a - offsets[sorted_expert[a]])");
    }
  }
  for (int64_t a = 0; a < M; ++a) {
    TORCH_CHECK_VALUE(sorted_token[a] >= 0 && sorted_token[a] < T, op, ": plan is inconsistent: sorted_token[", a,
                      "] = ", sorted_token[a], " is not a token index in [0, ", T, ")");
  }
  TORCH_CHECK_VALUE(token_offsets[0] == 0, op, ": plan is inconsistent: token_offsets[0] must be 0, got ",
                    token_offsets[0]);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(token_offsets[t + 1] >= token_offsets[t], op,
                      ": plan is inconsistent: token_offsets must be non-decreasing, got token_offsets[", t + 1,
                      "] = ", token_offsets[t + 1], " < token_offsets[", t, "] = ", token_offsets[t]);
  }
  TORCH_CHECK_VALUE(token_offsets[T] == M, op, ": plan is inconsistent: token_offsets[T] must be M = ", M, ", got ",
                    token_offsets[T]);
  // Entries that belong to their token and increase within it are distinct, and there are M of them: token_rows
  // is then the token-major permutation of the assignments.
  for (int64_t t = 0; t < T; ++t) {
    int64_t previous = -1;
    for (int64_t j = token_offsets[t]; j < token_offsets[t + 1]; ++j) {
      const int64_t a = token_rows[j];
      TORCH_CHECK_VALUE(
          a > previous && a < M && sorted_token[a] == t, op,
          ": plan is inconsistent: token_rows must list each token's assignments in increasing order (the "
          "token-major view of sorted_token), but token_rows[",
          j, "] = ", a, " is not the next assignment of token ", t);
      previous = a;
    }
  }
}

void check_rows(const char* op, const char* name, const at::Tensor& rows, const PlanView& view) {
  if (view.padded) {
    TORCH_CHECK_VALUE(rows.dim() == 3 && rows.size(0) == view.num_experts && rows.size(1) == view.capacity, op, ": ",
                      name, " must have shape [E, C, D] = [", view.num_experts, ", ", view.capacity,
                      ", D] for this plan, got ", rows.sizes());
  } else {
    TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == view.num_assignments, op, ": ", name,
                      " must have shape [M, D] = [", view.num_assignments, ", D] (packed layout) for this plan, got ",
                      rows.sizes());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(rows.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                   rows.scalar_type());
}

void check_make_plan_args(const at::Tensor& token_index, const at::Tensor& expert_index, int64_t num_experts,
                          std::optional<int64_t> num_tokens) {
  constexpr const char* op = "make_plan";
  check_index_tensor(op, "token_index", token_index, expert_index);
  check_index_tensor(op, "expert_index", expert_index, expert_index);
  TORCH_CHECK_VALUE(token_index.size(0) == expert_index.size(0), op,
                    ": token_index and expert_index must have one length, got ", token_index.size(0), " and ",
                    expert_index.size(0));
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(!num_tokens.has_value() || *num_tokens >= 0, op, ": num_tokens must be >= 0, got ",
                    num_tokens.value_or(0));
}

void check_token_major_args(const at::Tensor& sorted_token, int64_t num_tokens) {
  check_index_tensor("token_major", "sorted_token", sorted_token, sorted_token);
  TORCH_CHECK_VALUE(num_tokens >= 0, "token_major: num_tokens must be >= 0, got ", num_tokens);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_make_plan(
    GroupKernel kernel, const at::Tensor& token_index_in, const at::Tensor& expert_index_in, int64_t num_experts,
    std::optional<int64_t> num_tokens, bool validate) {
  check_make_plan_args(token_index_in, expert_index_in, num_experts, num_tokens);
  const at::Tensor token_index = token_index_in.contiguous();
  const at::Tensor expert_index = expert_index_in.contiguous();
  const c10::DeviceGuard guard(token_index.device());
  const int64_t n = token_index.size(0);
  const auto index_options = token_index.options();
  at::Tensor order = at::empty({n}, index_options);
  at::Tensor sorted_token = at::empty({n}, index_options);
  at::Tensor sorted_expert = at::empty({n}, index_options);
  at::Tensor slot = at::empty({n}, index_options);
  at::Tensor offsets = at::empty({num_experts + 1}, index_options);
  kernel(token_index, expert_index, num_experts, num_tokens, validate, order, sorted_token, sorted_expert, slot,
         offsets);
  return {order, sorted_token, sorted_expert, slot, offsets};
}

std::tuple<at::Tensor, at::Tensor> run_token_major(TokenMajorKernel kernel, const at::Tensor& sorted_token_in,
                                                   int64_t num_tokens) {
  check_token_major_args(sorted_token_in, num_tokens);
  const at::Tensor sorted_token = sorted_token_in.contiguous();
  const c10::DeviceGuard guard(sorted_token.device());
  return kernel(sorted_token, num_tokens);
}

at::Tensor run_dispatch(GatherKernel kernel, const at::Tensor& x_in, const at::Tensor& sorted_token,
                        const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                        const at::Tensor& token_offsets, const at::Tensor& token_rows, std::optional<int64_t> capacity,
                        bool padded, bool validate) {
  constexpr const char* op = "dispatch";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must have shape [T, D], got ", x_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), op, ": x must be a floating-point tensor, got ",
                   x_in.scalar_type());
  const c10::DeviceGuard guard(x_in.device());
  CheckedPlan plan =
      check_plan(op, {sorted_token, sorted_expert, slot, offsets, &token_offsets, &token_rows}, x_in, capacity, padded);
  PlanView& view = plan.view;
  TORCH_CHECK_VALUE(view.num_tokens == x_in.size(0), op, ": plan shapes are inconsistent: token_offsets describes ",
                    view.num_tokens, " tokens but x has ", x_in.size(0));
  if (validate) validate_plan(op, plan);
  view.dim = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = padded ? at::empty({view.num_experts, view.capacity, view.dim}, x.options())
                          : at::empty({view.num_assignments, view.dim}, x.options());
  kernel(view, x, out);
  return out;
}

at::Tensor run_dispatch_backward(SumRowsKernel kernel, const at::Tensor& grad_out_in, const at::Tensor& sorted_token,
                                 const at::Tensor& sorted_expert, const at::Tensor& slot, const at::Tensor& offsets,
                                 const at::Tensor& token_offsets, const at::Tensor& token_rows,
                                 std::optional<int64_t> capacity) {
  constexpr const char* op = "dispatch_backward";
  const bool padded = grad_out_in.dim() == 3;
  const c10::DeviceGuard guard(grad_out_in.device());
  CheckedPlan plan = check_plan(op, {sorted_token, sorted_expert, slot, offsets, &token_offsets, &token_rows},
                                grad_out_in, capacity, padded);
  PlanView& view = plan.view;
  check_rows(op, "grad_out", grad_out_in, view);
  view.dim = grad_out_in.size(-1);
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = at::empty({view.num_tokens, view.dim}, grad_out.options());
  kernel(op, view, grad_out, nullptr, grad_x);
  return grad_x;
}

at::Tensor run_combine(SumRowsKernel kernel, const at::Tensor& expert_out_in, const at::Tensor& weight_in,
                       const at::Tensor& sorted_token, const at::Tensor& sorted_expert, const at::Tensor& slot,
                       const at::Tensor& offsets, const at::Tensor& token_offsets, const at::Tensor& token_rows,
                       std::optional<int64_t> capacity, bool validate) {
  constexpr const char* op = "combine";
  const bool padded = expert_out_in.dim() == 3;
  const c10::DeviceGuard guard(expert_out_in.device());
  CheckedPlan plan = check_plan(op, {sorted_token, sorted_expert, slot, offsets, &token_offsets, &token_rows},
                                expert_out_in, capacity, padded);
  PlanView& view = plan.view;
  check_rows(op, "expert_out", expert_out_in, view);
  TORCH_CHECK_VALUE(weight_in.dim() == 1 && weight_in.size(0) == view.num_assignments, op,
                    ": plan shapes are inconsistent: weight must have shape [M] = [", view.num_assignments, "], got ",
                    weight_in.sizes());
  TORCH_CHECK_TYPE(weight_in.scalar_type() == expert_out_in.scalar_type(), op,
                   ": weight must have the dtype of expert_out (", expert_out_in.scalar_type(), "), got ",
                   weight_in.scalar_type());
  check_device(op, "weight", weight_in, "expert_out", expert_out_in);
  if (validate) validate_plan(op, plan);
  view.dim = expert_out_in.size(-1);
  const at::Tensor expert_out = expert_out_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor y = at::empty({view.num_tokens, view.dim}, expert_out.options());
  kernel(op, view, expert_out, &weight, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> run_combine_backward(CombineBackwardKernel kernel, const at::Tensor& grad_y_in,
                                                        const at::Tensor& expert_out_in, const at::Tensor& weight_in,
                                                        const at::Tensor& sorted_token, const at::Tensor& sorted_expert,
                                                        const at::Tensor& slot, const at::Tensor& offsets,
                                                        std::optional<int64_t> capacity) {
  constexpr const char* op = "combine_backward";
  const bool padded = expert_out_in.dim() == 3;
  const c10::DeviceGuard guard(expert_out_in.device());
  CheckedPlan plan =
      check_plan(op, {sorted_token, sorted_expert, slot, offsets, nullptr, nullptr}, expert_out_in, capacity, padded);
  PlanView& view = plan.view;
  check_rows(op, "expert_out", expert_out_in, view);
  view.dim = expert_out_in.size(-1);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 2 && grad_y_in.size(1) == view.dim, op, ": grad_y must have shape [T, ",
                    view.dim, "], got ", grad_y_in.sizes());
  TORCH_CHECK_TYPE(
      grad_y_in.scalar_type() == expert_out_in.scalar_type() && weight_in.scalar_type() == expert_out_in.scalar_type(),
      op, ": grad_y and weight must have the dtype of expert_out (", expert_out_in.scalar_type(), ")");
  TORCH_CHECK_VALUE(weight_in.dim() == 1 && weight_in.size(0) == view.num_assignments, op,
                    ": weight must have shape [M] = [", view.num_assignments, "], got ", weight_in.sizes());
  check_device(op, "grad_y", grad_y_in, "expert_out", expert_out_in);
  check_device(op, "weight", weight_in, "expert_out", expert_out_in);
  view.num_tokens = grad_y_in.size(0);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor expert_out = expert_out_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor grad_expert_out = at::empty_like(expert_out);
  at::Tensor grad_weight = at::empty_like(weight);
  kernel(view, grad_y, expert_out, weight, grad_expert_out, grad_weight);
  return {grad_expert_out, grad_weight};
}

}  // namespace visionmoe::dispatch
