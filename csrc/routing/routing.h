// Router assignment operators: top-K token choice (with Batch Priority Routing) and expert choice.
//
// Scores are [G, T, E]: G groups routed independently, T tokens per group, E experts. Both operators return a
// routing plan over E * G virtual experts numbered e * G + g (see visionmoe.RoutingPlan), tokens numbered
// g * T + t, plus flat_index [M], the position (g * T + t) * E + e of each assignment's score, from which the
// Python wrapper gathers the differentiable combine weights, and the plan's token-major view (token_offsets
// [G * T + 1], token_rows [M]).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "dispatch/dispatch.h"

namespace visionmoe::routing {

// (sorted_token, sorted_expert, slot, offsets, order, flat_index, token_offsets, token_rows)
using PlanTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The plan's tensors, allocated by the host code and filled by a backend.
struct PlanOutputs {
  at::Tensor sorted_token, sorted_expert, slot, offsets, order, flat_index, token_offsets, token_rows;
};

// Helpers of the operator bodies, shared by the backends (routing.cpp); each backend file composes them with its
// kernels and registers the result with the dispatcher, so no host code branches on the device.
// top-K token choice: checks scores and k, returns scores contiguous.
at::Tensor check_topk_route(const at::Tensor& scores, int64_t k);
// The plan's tensors for G * T * k assignments, uninitialised, on the scores' device.
PlanOutputs empty_topk_plan(const at::Tensor& scores, int64_t k);
PlanTuple as_tuple(const PlanOutputs& plan);
// The plan, with ATen steps on any device, from each token's selected experts [G * T, k] and best score [G * T];
// the grouping by expert and the token-major view are the dispatch family's kernels of the caller's backend.
PlanTuple plan_from_choices(const at::Tensor& scores, int64_t k, bool batch_priority, const at::Tensor& experts,
                            const at::Tensor& top_score, dispatch::GroupKernel group_by_expert,
                            dispatch::TokenMajorKernel token_major);
// Expert choice: checks scores and capacity, returns scores contiguous.
at::Tensor check_expert_choice_route(const at::Tensor& scores, int64_t capacity);
// Tokens each expert takes: min(capacity, T).
int64_t tokens_taken(const at::Tensor& scores, int64_t capacity);
// The plan, with ATen steps on any device, from each expert's chosen tokens [G, E, taken], best first.
PlanTuple plan_from_top_tokens(const at::Tensor& scores, const at::Tensor& tokens,
                               dispatch::TokenMajorKernel token_major);

// Backend kernels: each token's k highest-scoring experts, best first, ties to the lower expert index.
// experts: [G * T, k] int64; top_score: [G * T] float32, each token's best score (the BPR priority key).
namespace cpu {
// The whole top-K token choice in one pass over the scores: selection, Batch Priority ordering (a stable radix
// sort of each group's best scores), and the stable grouping by virtual expert.
void topk_route(const at::Tensor& scores, int64_t k, bool batch_priority, PlanOutputs& plan);
// Each expert column's `capacity` highest-scoring tokens, best first, ties to the lower token index.
// tokens: [G, E, capacity] int64.
void select_top_tokens(const at::Tensor& scores, int64_t capacity, at::Tensor& tokens);
}  // namespace cpu

#ifdef VISIONMOE_WITH_CUDA
namespace cuda {
constexpr int64_t kMaxK = 16;
void select_topk(const at::Tensor& scores, int64_t k, at::Tensor& experts, at::Tensor& top_score);
}  // namespace cuda
#endif

}  // namespace visionmoe::routing
