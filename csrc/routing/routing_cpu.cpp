// CPU kernels of the routing family: fused top-K token choice, and expert choice's per-column top-C selection.
// Ties go to the lower index, and every score read is checked to be finite (free, since each is read anyway).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "routing/routing.h"

namespace visionmoe::routing::cpu {
namespace {

template <typename value_t>
void check_finite(const char* op, value_t value, int64_t g, int64_t t, int64_t e) {
  TORCH_CHECK_VALUE(std::isfinite(value), op, ": scores must be finite (NaN or infinite router logits?), got ", value,
                    " at scores[", g, ", ", t, ", ", e, "]");
}

// Unsigned keys whose ascending order is the descending order of the values (IEEE-754 bit tricks). -0 and +0
// compare equal, so both get +0's key; otherwise their bit patterns would rank a -0 token after a +0 one.
template <typename value_t>
using SortKey = std::conditional_t<sizeof(value_t) == 8, uint64_t, uint32_t>;

template <typename value_t>
SortKey<value_t> descending_key(value_t value) {
  using key_t = SortKey<value_t>;
  if (value == value_t(0)) value = value_t(0);
  key_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  constexpr key_t sign = key_t(1) << (8 * sizeof(key_t) - 1);
  const key_t ascending = (bits & sign) ? ~bits : (bits | sign);
  return ~ascending;
}

// Stable LSD radix sort of one group's tokens by descending best score: rank_to_token[r] is the r-th token.
template <typename value_t>
void sort_by_descending_score(const value_t* best, int64_t n, int64_t* rank_to_token, std::vector<int64_t>& buffer,
                              std::vector<SortKey<value_t>>& keys, std::vector<SortKey<value_t>>& key_buffer) {
  using key_t = SortKey<value_t>;
  keys.resize(n);
  key_buffer.resize(n);
  buffer.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    keys[t] = descending_key(best[t]);
    rank_to_token[t] = t;
  }
  int64_t* source = rank_to_token;
  int64_t* target = buffer.data();
  key_t* source_keys = keys.data();
  key_t* target_keys = key_buffer.data();
  for (int shift = 0; shift < int(8 * sizeof(key_t)); shift += 8) {
    int64_t histogram[257] = {};
    for (int64_t i = 0; i < n; ++i) ++histogram[((source_keys[i] >> shift) & 0xff) + 1];
    if (histogram[((source_keys[0] >> shift) & 0xff) + 1] == n) continue;  // one digit value: nothing moves
    for (int d = 0; d < 256; ++d) histogram[d + 1] += histogram[d];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = histogram[(source_keys[i] >> shift) & 0xff]++;
      target[p] = source[i];
      target_keys[p] = source_keys[i];
    }
    std::swap(source, target);
    std::swap(source_keys, target_keys);
  }
  if (source != rank_to_token) std::copy(source, source + n, rank_to_token);
}

template <typename scalar_t>
void topk_route_impl(const scalar_t* scores, int64_t G, int64_t T, int64_t E, int64_t k, bool batch_priority,
                     PlanOutputs& plan) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_tokens = G * T;
  // 1. Each token's k best experts, best first; ties keep the lower expert.
  std::vector<int64_t> experts(num_tokens * k);
  std::vector<opmath_t> best(num_tokens);
  at::parallel_for(0, num_tokens, std::max<int64_t>(1, 8192 / E), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> best_value(k);
    for (int64_t token = begin; token < end; ++token) {
      const scalar_t* row = scores + token * E;
      int64_t* best_expert = experts.data() + token * k;
      int64_t filled = 0;
      for (int64_t e = 0; e < E; ++e) {
        const opmath_t value = static_cast<opmath_t>(row[e]);
        check_finite("topk_route", value, token / T, token % T, e);
        if (filled == k && !(value > best_value[k - 1])) continue;
        int64_t j = filled < k ? filled++ : k - 1;
        for (; j > 0 && value > best_value[j - 1]; --j) {
          best_value[j] = best_value[j - 1];
          best_expert[j] = best_expert[j - 1];
        }
        best_value[j] = value;
        best_expert[j] = e;
      }
      best[token] = best_value[0];
    }
  });
  // 2. Each group's fill order: by position, or by best score, highest first (stable).
  std::vector<int64_t> rank_to_token(num_tokens);
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> buffer;
    std::vector<SortKey<opmath_t>> keys, key_buffer;
    for (int64_t g = begin; g < end; ++g) {
      int64_t* ranks = rank_to_token.data() + g * T;
      if (batch_priority && T > 0) {
        sort_by_descending_score(best.data() + g * T, T, ranks, buffer, keys, key_buffer);
      } else {
        for (int64_t t = 0; t < T; ++t) ranks[t] = t;
      }
    }
  });
  // 3. Counts per (group, expert), then offsets over virtual experts e * G + g.
  std::vector<int64_t> cursor(G * E, 0);
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t i = 0; i < T * k; ++i) ++cursor[g * E + experts[(g * T + i / k) * k + i % k]];
    }
  });
  int64_t* offsets = plan.offsets.mutable_data_ptr<int64_t>();
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t g = 0; g < G; ++g) {
      offsets[e * G + g] = running;
      running += cursor[g * E + e];
      cursor[g * E + e] = offsets[e * G + g];
    }
  }
  offsets[E * G] = running;
  // 4. Assignments in priority order (every first choice by rank, then every second choice, ...) go to the
  //    next free position of their virtual expert, so slots follow priority.
  int64_t* sorted_token = plan.sorted_token.mutable_data_ptr<int64_t>();
  int64_t* sorted_expert = plan.sorted_expert.mutable_data_ptr<int64_t>();
  int64_t* slot = plan.slot.mutable_data_ptr<int64_t>();
  int64_t* order = plan.order.mutable_data_ptr<int64_t>();
  int64_t* flat_index = plan.flat_index.mutable_data_ptr<int64_t>();
  int64_t* token_rows = plan.token_rows.mutable_data_ptr<int64_t>();
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t choice = 0; choice < k; ++choice) {
        for (int64_t r = 0; r < T; ++r) {
          const int64_t token = g * T + rank_to_token[g * T + r];
          const int64_t e = experts[token * k + choice];
          const int64_t virtual_expert = e * G + g;
          const int64_t p = cursor[g * E + e]++;
          sorted_token[p] = token;
          sorted_expert[p] = virtual_expert;
          slot[p] = p - offsets[virtual_expert];
          order[p] = choice * num_tokens + token;
          flat_index[p] = token * E + e;
          token_rows[token * k + choice] = p;
        }
      }
    }
  });
  // 5. Token-major view: every token has exactly k assignments; list them in increasing position.
  int64_t* token_offsets = plan.token_offsets.mutable_data_ptr<int64_t>();
  for (int64_t t = 0; t <= num_tokens; ++t) token_offsets[t] = t * k;
  if (k > 1) {
    at::parallel_for(0, num_tokens, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) std::sort(token_rows + t * k, token_rows + (t + 1) * k);
    });
  }
}

template <typename scalar_t>
void select_top_tokens_impl(const scalar_t* scores, int64_t num_groups, int64_t tokens_per_group, int64_t num_experts,
                            int64_t capacity, int64_t* tokens) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, num_groups * num_experts, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<opmath_t, int64_t>> column(tokens_per_group);
    for (int64_t column_index = begin; column_index < end; ++column_index) {
      const int64_t g = column_index / num_experts, e = column_index % num_experts;
      const scalar_t* group_scores = scores + g * tokens_per_group * num_experts;
      for (int64_t t = 0; t < tokens_per_group; ++t) {
        const opmath_t value = static_cast<opmath_t>(group_scores[t * num_experts + e]);
        check_finite("expert_choice_route", value, g, t, e);
        column[t] = {value, t};
      }
      const auto better = [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      };
      std::partial_sort(column.begin(), column.begin() + capacity, column.end(), better);
      int64_t* chosen = tokens + column_index * capacity;
      for (int64_t c = 0; c < capacity; ++c) chosen[c] = column[c].second;
    }
  });
}

}  // namespace

void topk_route(const at::Tensor& scores, int64_t k, bool batch_priority, PlanOutputs& plan) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "visionmoe_topk_route_cpu", [&] {
    topk_route_impl<scalar_t>(scores.const_data_ptr<scalar_t>(), scores.size(0), scores.size(1), scores.size(2), k,
                              batch_priority, plan);
  });
}

void select_top_tokens(const at::Tensor& scores, int64_t capacity, at::Tensor& tokens) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "visionmoe_select_tokens_cpu", [&] {
    select_top_tokens_impl<scalar_t>(scores.const_data_ptr<scalar_t>(), scores.size(0), scores.size(1), scores.size(2),
                                     capacity, tokens.mutable_data_ptr<int64_t>());
  });
}

}  // namespace visionmoe::routing::cpu

namespace visionmoe::routing {
namespace {

PlanTuple topk_route_cpu(const at::Tensor& scores_in, int64_t k, bool batch_priority) {
  const at::Tensor scores = check_topk_route(scores_in, k);
  PlanOutputs plan = empty_topk_plan(scores, k);
  cpu::topk_route(scores, k, batch_priority, plan);
  return as_tuple(plan);
}

PlanTuple expert_choice_route_cpu(const at::Tensor& scores_in, int64_t capacity) {
  const at::Tensor scores = check_expert_choice_route(scores_in, capacity);
  const int64_t taken = tokens_taken(scores, capacity);
  at::Tensor tokens = at::empty({scores.size(0), scores.size(2), taken}, scores.options().dtype(at::kLong));
  cpu::select_top_tokens(scores, taken, tokens);
  return plan_from_top_tokens(scores, tokens, &dispatch::cpu::token_major);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("topk_route", &topk_route_cpu);
  m.impl("expert_choice_route", &expert_choice_route_cpu);
}

}  // namespace visionmoe::routing
