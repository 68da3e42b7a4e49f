// The per-expert GEMM loop of the grouped expert MLP over row segments whose offsets are on the host: the CPU
// kernel of both layouts (the padded one is segments of C rows), and the CUDA fallback where torch's grouped
// GEMM does not apply. Each expert's GEMMs are ATen GEMMs on views (narrow) of its rows and its weights.
//
// On CPU the experts run in parallel, one thread each, and each GEMM and activation block single-threaded: at
// the benchmark size (D = 384, F = 1536, E = 16, M = 8192, 2 threads, float32, gelu) forward + backward took
// 0.54-0.81 s that way against 1.47-1.68 s with the experts in order and every ATen call using both threads
// (two runs each on a shared machine), since each call then pays for starting and joining the thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <numeric>

#include "expert_mlp/expert_mlp.h"

namespace visionmoe::expert_mlp {
namespace {

// Rows per bias-activation block: about this many bytes of pre-activation, so that a block written by the
// activation is still in the core's cache when the next step reads it. A hidden width of 0 (F' = 0) is valid:
// its blocks are empty, so any row count serves.
constexpr int64_t kBlockBytes = 128 * 1024;

int64_t rows_per_block(int64_t width) {
  return std::max<int64_t>(1, kBlockBytes / (std::max<int64_t>(width, 1) * 4));
}

// Runs body(e) for every expert. On CPU each thread repeatedly claims the largest expert not yet started (a
// shared counter over the experts sorted by row count), so that uneven experts, or a core taken by another
// process, do not leave threads idle behind a fixed split. Each expert is computed by one thread alone, so the
// results do not depend on the schedule.
template <typename Body>
void for_each_expert(const at::Tensor& like, const std::vector<int64_t>& offsets, const Body& body) {
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  if (!like.device().is_cpu()) {
    for (int64_t e = 0; e < num_experts; ++e) body(e);
    return;
  }
  std::vector<int64_t> largest_first(num_experts);
  std::iota(largest_first.begin(), largest_first.end(), 0);
  std::stable_sort(largest_first.begin(), largest_first.end(), [&](int64_t a, int64_t b) {
    return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b];
  });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_experts);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state: skip autograd here too (see expert_mlp.cpp).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < num_experts; i = next++) body(largest_first[i]);
  });
}

}  // namespace

void segments_forward(const at::Tensor& x, const SegmentTensors& weights, const std::vector<int64_t>& offsets,
                      Activation activation, at::Tensor& y, at::Tensor& pre) {
  const int64_t hidden = weights.w2.size(1);
  const int64_t block = rows_per_block(pre.size(1));
  for_each_expert(x, offsets, [&](int64_t e) {
    const int64_t start = offsets[e];
    const int64_t rows = offsets[e + 1] - start;
    if (rows == 0) return;
    at::Tensor pre_e = pre.narrow(0, start, rows);
    at::mm_out(pre_e, x.narrow(0, start, rows), weights.w1[e]);
    at::Tensor hidden_e = at::empty({rows, hidden}, x.options());
    const at::Tensor bias = weights.b1[e];
    for (int64_t row = 0; row < rows; row += block) {
      const int64_t count = std::min(block, rows - row);
      at::Tensor pre_block = pre_e.narrow(0, row, count);
      at::Tensor hidden_block = hidden_e.narrow(0, row, count);
      bias_activation_(pre_block, bias, hidden_block, activation);
    }
    at::Tensor y_e = y.narrow(0, start, rows);
    at::addmm_out(y_e, weights.b2[e], hidden_e, weights.w2[e]);
  });
}

void segments_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       const at::Tensor& pre, const std::vector<int64_t>& offsets, Activation activation,
                       at::Tensor& grad_x, at::Tensor& grad_w1, at::Tensor& grad_b1, at::Tensor& grad_w2,
                       at::Tensor& grad_b2) {
  const int64_t hidden = w2.size(1);
  const int64_t block = rows_per_block(pre.size(1));
  for_each_expert(x, offsets, [&](int64_t e) {
    const int64_t start = offsets[e];
    const int64_t rows = offsets[e + 1] - start;
    if (rows == 0) {  // no rows: the expert's parameters get zero gradients
      grad_w1[e].zero_();
      grad_b1[e].zero_();
      grad_w2[e].zero_();
      grad_b2[e].zero_();
      return;
    }
    const at::Tensor grad_y_e = grad_y.narrow(0, start, rows);
    const at::Tensor pre_e = pre.narrow(0, start, rows);
    const at::Tensor grad_hidden = at::mm(grad_y_e, w2[e].t());
    at::Tensor hidden_e = at::empty({rows, hidden}, x.options());
    at::Tensor grad_pre = at::empty_like(pre_e);
    for (int64_t row = 0; row < rows; row += block) {
      const int64_t count = std::min(block, rows - row);
      at::Tensor grad_pre_block = grad_pre.narrow(0, row, count);
      at::Tensor hidden_block = hidden_e.narrow(0, row, count);
      activation_backward(grad_hidden.narrow(0, row, count), pre_e.narrow(0, row, count), grad_pre_block,
                          hidden_block, activation);
    }
    const at::Tensor x_e = x.narrow(0, start, rows);
    at::Tensor grad_w2_e = grad_w2[e];
    at::Tensor grad_b2_e = grad_b2[e];
    at::Tensor grad_w1_e = grad_w1[e];
    at::Tensor grad_b1_e = grad_b1[e];
    at::Tensor grad_x_e = grad_x.narrow(0, start, rows);
    at::mm_out(grad_w2_e, hidden_e.t(), grad_y_e);
    at::sum_out(grad_b2_e, grad_y_e, 0);
    at::mm_out(grad_w1_e, x_e.t(), grad_pre);
    at::sum_out(grad_b1_e, grad_pre, 0);
    at::mm_out(grad_x_e, grad_pre, w1[e].t());
  });
}

}  // namespace visionmoe::expert_mlp
