// CPU kernels of the grouped expert MLP: both layouts run the per-expert GEMM loop of expert_mlp.cpp (the padded
// layout as segments of C rows), with the experts in parallel.
//
// Each expert runs on one thread, and each GEMM and activation block inside it single-threaded: at the benchmark
// size (D = 384, F = 1536, E = 16, M = 8192, 2 threads, float32, gelu) forward + backward took 0.54-0.81 s that
// way against 1.47-1.68 s with the experts in order and every ATen call using both threads (two runs each on a
// shared machine), since each call then pays for starting and joining the thread pool.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

#include "expert_mlp/expert_mlp.h"

namespace visionmoe::expert_mlp::cpu {
namespace {

// Runs body(e) for every expert. Each thread repeatedly claims the largest expert not yet started (a shared
// counter over the experts sorted by row count), so that uneven experts, or a core taken by another process, do
// not leave threads idle behind a fixed split. Each expert is computed by one thread alone, so the results do not
// depend on the schedule.
void for_each_expert_parallel(const std::vector<int64_t>& offsets, c10::function_ref<void(int64_t)> body) {
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<int64_t> largest_first(num_experts);
  std::iota(largest_first.begin(), largest_first.end(), 0);
  std::stable_sort(largest_first.begin(), largest_first.end(),
                   [&](int64_t a, int64_t b) { return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_experts);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state: skip autograd here too (see run_expert_mlp).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < num_experts; i = next++) body(largest_first[i]);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                           const at::Tensor& w2, const at::Tensor& b2,
                                           const std::optional<at::Tensor>& expert_offsets, Activation activation,
                                           const Sizes& sizes) {
  return segments_forward("expert_mlp", &for_each_expert_parallel, x, w1, b1, w2, b2, expert_offsets, activation,
                          sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, Activation activation,
    const Sizes& sizes) {
  return segments_backward("expert_mlp_backward", &for_each_expert_parallel, grad_y, x, w1, w2, pre_activation,
                           expert_offsets, activation, sizes);
}

}  // namespace visionmoe::expert_mlp::cpu

namespace visionmoe::expert_mlp {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_mlp_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                                  const at::Tensor& w2, const at::Tensor& b2,
                                                  const std::optional<at::Tensor>& expert_offsets,
                                                  c10::string_view activation) {
  return run_expert_mlp(&cpu::forward, x, w1, b1, w2, b2, expert_offsets, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, const std::optional<at::Tensor>& expert_offsets, c10::string_view activation) {
  return run_expert_mlp_backward(&cpu::backward, grad_y, x, w1, w2, pre_activation, expert_offsets, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("expert_mlp", &expert_mlp_cpu);
  m.impl("expert_mlp_backward", &expert_mlp_backward_cpu);
}

}  // namespace visionmoe::expert_mlp
