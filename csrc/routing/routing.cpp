// Host code of the routing family, shared by the backends: argument checks, output allocation, and the ATen
// steps and the dispatch family's stable grouping by expert, which run on any device. Each backend's file
// registers its operators with the dispatcher.
#include "routing/routing.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "dispatch/dispatch.h"

namespace visionmoe::routing {
namespace {

void check_scores(const char* op, const at::Tensor& scores) {
  TORCH_CHECK_VALUE(scores.dim() == 3, op, ": scores must have shape [G, T, E], got ", scores.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), op, ": scores must be a floating-point tensor, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.size(2) >= 1, op, ": scores must have at least one expert (E >= 1), got shape ",
                    scores.sizes());
}

// Maps (token g * T + t, expert e) to the plan's numbering: virtual expert e * G + g, and the position of the
// score, (g * T + t) * E + e.
at::Tensor flat_score_index(const at::Tensor& sorted_token, const at::Tensor& sorted_expert, int64_t num_groups,
                            int64_t num_experts) {
  return sorted_token * num_experts + sorted_expert.div(num_groups, "floor");
}

}  // namespace

at::Tensor check_topk_route(const at::Tensor& scores, int64_t k) {
  constexpr const char* op = "topk_route";
  check_scores(op, scores);
  const int64_t E = scores.size(2);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, op, ": k must be in [1, E] = [1, ", E, "], got ", k);
  return scores.contiguous();
}

PlanOutputs empty_topk_plan(const at::Tensor& scores, int64_t k) {
  const int64_t G = scores.size(0), T = scores.size(1), E = scores.size(2);
  const auto index_options = scores.options().dtype(at::kLong);
  const int64_t M = G * T * k;
  return PlanOutputs{at::empty({M}, index_options),         at::empty({M}, index_options),
                     at::empty({M}, index_options),         at::empty({E * G + 1}, index_options),
                     at::empty({M}, index_options),         at::empty({M}, index_options),
                     at::empty({G * T + 1}, index_options), at::empty({M}, index_options)};
}

PlanTuple as_tuple(const PlanOutputs& plan) {
  return {plan.sorted_token, plan.sorted_expert, plan.slot,          plan.offsets,
          plan.order,        plan.flat_index,    plan.token_offsets, plan.token_rows};
}

PlanTuple plan_from_choices(const at::Tensor& scores, int64_t k, bool batch_priority, const at::Tensor& experts,
                            const at::Tensor& top_score, dispatch::GroupKernel group_by_expert,
                            dispatch::TokenMajorKernel token_major) {
  const int64_t G = scores.size(0), T = scores.size(1), E = scores.size(2);
  const auto index_options = scores.options().dtype(at::kLong);
  // Priority of the tokens of each group: by position, or (Batch Priority Routing) by best score, highest
  // first; the stable sort keeps position order among equal scores.
  const at::Tensor group_base = at::arange(G, index_options).mul_(T).unsqueeze(1);  // [G, 1]
  at::Tensor rank_to_token =
      batch_priority ? std::get<1>(top_score.view({G, T}).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true))
                     : at::arange(T, index_options).expand({G, T});
  rank_to_token = rank_to_token + group_base;  // [G, T], global token numbers
  // Assignments in priority order: every token's first choice (by rank), then every second choice, ...
  const at::Tensor choices = experts.index_select(0, rank_to_token.flatten()).view({G, T, k}).permute({2, 0, 1});
  const at::Tensor virtual_expert = choices * G + at::arange(G, index_options).view({1, G, 1});  // [K, G, T]
  const at::Tensor list_token = rank_to_token.unsqueeze(0).expand({k, G, T});
  auto [list_position, sorted_token, sorted_expert, slot, offsets] = dispatch::run_make_plan(
      group_by_expert, list_token.flatten(), virtual_expert.flatten(), E * G, G * T, /*validate=*/false);
  // The plan's `order`: each assignment's position in the choice-major list [K, G * T], choice * G * T + token.
  const at::Tensor list_source = list_token + at::arange(k, index_options).mul_(G * T).view({k, 1, 1});
  at::Tensor order = list_source.flatten().index_select(0, list_position);
  at::Tensor flat_index = flat_score_index(sorted_token, sorted_expert, G, E);
  auto [token_offsets, token_rows] = dispatch::run_token_major(token_major, sorted_token, G * T);
  return {sorted_token, sorted_expert, slot, offsets, order, flat_index, token_offsets, token_rows};
}

at::Tensor check_expert_choice_route(const at::Tensor& scores, int64_t capacity) {
  constexpr const char* op = "expert_choice_route";
  check_scores(op, scores);
  TORCH_CHECK_VALUE(capacity >= 0, op, ": capacity must be >= 0, got ", capacity);
  return scores.contiguous();
}

int64_t tokens_taken(const at::Tensor& scores, int64_t capacity) {
  // An expert cannot take more tokens than its group has; its remaining slots stay empty.
  return std::min(capacity, scores.size(1));
}

PlanTuple plan_from_top_tokens(const at::Tensor& scores, const at::Tensor& tokens,
                               dispatch::TokenMajorKernel token_major) {
  const int64_t G = scores.size(0), T = scores.size(1), E = scores.size(2), taken = tokens.size(2);
  const auto index_options = scores.options().dtype(at::kLong);
  // Expert-major over virtual experts e * G + g.
  at::Tensor sorted_token =
      (tokens.permute({1, 0, 2}) + at::arange(G, index_options).mul_(T).view({1, G, 1})).flatten();
  at::Tensor sorted_expert = at::arange(E * G, index_options).repeat_interleave(taken);
  at::Tensor slot = at::arange(taken, index_options).repeat({E * G});
  at::Tensor offsets = at::arange(E * G + 1, index_options).mul_(taken);
  at::Tensor order = at::arange(sorted_token.size(0), index_options);
  at::Tensor flat_index = flat_score_index(sorted_token, sorted_expert, G, E);
  auto [token_offsets, token_rows] = dispatch::run_token_major(token_major, sorted_token, G * T);
  return {sorted_token, sorted_expert, slot, offsets, order, flat_index, token_offsets, token_rows};
}

}  // namespace visionmoe::routing
