// Host code of the grouped expert MLP, shared by the backends: argument checks naming the argument, the
// activation passes, and the per-expert GEMM loop over row segments with host offsets (the CPU kernel of both
// layouts, and the CUDA fallback where torch's grouped GEMM does not apply). Each backend's file picks its GEMM
// strategy and registers its kernels with the dispatcher, which picks the backend:
//
//   CPU (expert_mlp_cpu.cpp), both layouts: the per-expert loop, experts in parallel (the offsets are read on
//                        the host, which is free there, and validated).
//   CUDA (expert_mlp_cuda.cu), padded: batched GEMMs (at::bmm) over [E, C, *]; no offsets are involved.
//   CUDA, packed:        torch's grouped GEMM (at::_grouped_mm, offsets on the device) for bfloat16 when this
//                        torch has it and D and F are multiples of 8 (its 16-byte alignment); other dtypes copy
//                        the offsets to the host once per call (one synchronisation) and run the per-expert loop
//                        in order.
//
// Each expert's GEMMs in the per-expert loop are ATen GEMMs on views (narrow) of its rows and its weights.
#include "expert_mlp/expert_mlp.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"

namespace visionmoe::expert_mlp {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

bool is_reduced(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
                   "), got ", t.scalar_type());
  check_device(op, name, t, "x", x);
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* letters) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", letters, " = ", expected, ", got ",
                    t.sizes());
}

Sizes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                   const std::optional<at::Tensor>& expert_offsets, Activation activation) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op, ": x must have shape [E, C, D] (padded) or [M, D] (packed), got ",
                    x.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(w1.dim() == 3, op, ": w1 must have shape [E, D, F'], got ", w1.sizes());
  check_like(op, "w1", w1, x);
  Sizes sizes;
  sizes.experts = w1.size(0);
  sizes.dim = x.size(-1);
  sizes.pre_width = w1.size(2);
  sizes.padded = x.dim() == 3;
  TORCH_CHECK_VALUE(w1.size(1) == sizes.dim, op, ": w1 must have shape [E, D, F'] with D = ", sizes.dim,
                    " (the width of x), got ", w1.sizes());
  if (activation == Activation::kSiluGated) {
    TORCH_CHECK_VALUE(
        sizes.pre_width % 2 == 0, op,
        ": w1 must have an even number of columns 2F (gate and value) for activation \"silu_gated\", got ", w1.sizes());
    sizes.hidden = sizes.pre_width / 2;
  } else {
    sizes.hidden = sizes.pre_width;
  }
  TORCH_CHECK_VALUE(w2.dim() == 3, op, ": w2 must have shape [E, F, D], got ", w2.sizes());
  check_like(op, "w2", w2, x);
  check_shape(op, "w2", w2, {sizes.experts, sizes.hidden, sizes.dim}, "[E, F, D]");
  if (sizes.padded) {
    TORCH_CHECK_VALUE(
        !expert_offsets.has_value(), op,
        ": expert_offsets must be None for padded x [E, C, D]; pass packed x [M, D] with offsets instead");
    TORCH_CHECK_VALUE(x.size(0) == sizes.experts, op, ": x must have shape [E, C, D] with E = ", sizes.experts,
                      " (the experts of w1), got ", x.sizes());
    sizes.rows = x.size(0) * x.size(1);
  } else {
    TORCH_CHECK_VALUE(expert_offsets.has_value(), op,
                      ": expert_offsets [E + 1] is required for packed x [M, D] (expert e's rows are "
                      "expert_offsets[e]:expert_offsets[e + 1])");
    const at::Tensor& offsets = *expert_offsets;
    TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == sizes.experts + 1, op,
                      ": expert_offsets must have shape [E + 1] = [", sizes.experts + 1, "], got ", offsets.sizes());
    TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, op, ": expert_offsets must have dtype int64, got ",
                     offsets.scalar_type());
    check_device(op, "expert_offsets", offsets, "x", x);
    sizes.rows = x.size(0);
  }
  return sizes;
}

void check_biases(const char* op, const at::Tensor& x, const at::Tensor& b1, const at::Tensor& b2, const Sizes& sizes) {
  check_like(op, "b1", b1, x);
  check_shape(op, "b1", b1, {sizes.experts, sizes.pre_width}, "[E, F']");
  check_like(op, "b2", b2, x);
  check_shape(op, "b2", b2, {sizes.experts, sizes.dim}, "[E, D]");
}

// Host copy of the packed offsets, checked: offsets[0] = 0, non-decreasing, offsets[E] = M.
std::vector<int64_t> host_offsets(const char* op, const at::Tensor& expert_offsets, int64_t rows) {
  const at::Tensor offsets = expert_offsets.to(at::kCPU).contiguous();
  const int64_t* values = offsets.data_ptr<int64_t>();
  std::vector<int64_t> result(values, values + offsets.size(0));
  TORCH_CHECK_VALUE(result.front() == 0, op, ": expert_offsets[0] must be 0, got ", result.front());
  for (size_t e = 1; e < result.size(); ++e) {
    TORCH_CHECK_VALUE(result[e] >= result[e - 1], op, ": expert_offsets must be non-decreasing, got expert_offsets[", e,
                      "] = ", result[e], " < expert_offsets[", e - 1, "] = ", result[e - 1]);
  }
  TORCH_CHECK_VALUE(result.back() == rows, op, ": expert_offsets[E] must be M = ", rows, " (the rows of x), got ",
                    result.back());
  return result;
}

// Rows per bias-activation block of the per-expert loop: about this many bytes of pre-activation, so that a block
// written by the activation is still in the core's cache when the next step reads it. A hidden width of 0 (F' = 0)
// is valid: its blocks are empty, so any row count serves.
constexpr int64_t kBlockBytes = 128 * 1024;

int64_t rows_per_block(int64_t width) { return std::max<int64_t>(1, kBlockBytes / (std::max<int64_t>(width, 1) * 4)); }

// Segments of C rows for the padded layout flattened to [E * C, D].
std::vector<int64_t> padded_offsets(int64_t experts, int64_t capacity) {
  std::vector<int64_t> offsets(experts + 1);
  for (int64_t e = 0; e <= experts; ++e) offsets[e] = e * capacity;
  return offsets;
}

// out = act(pre), pre [..., F'] and out [..., F], all in one dtype.
void activate_out(at::Tensor& out, const at::Tensor& pre, Activation activation) {
  if (activation == Activation::kGelu) {
    at::gelu_out(out, pre);
    return;
  }
  const int64_t hidden = pre.size(-1) / 2;
  at::silu_out(out, pre.narrow(-1, 0, hidden));
  out.mul_(pre.narrow(-1, hidden, hidden));
}

}  // namespace

Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu_gated") return Activation::kSiluGated;
  TORCH_CHECK_VALUE(false, op, ": activation must be \"gelu\" or \"silu_gated\", got \"",
                    std::string(name.data(), name.size()), "\"");
}

void bias_activation_(at::Tensor& pre, const at::Tensor& bias, at::Tensor& hidden, Activation activation) {
  if (!is_reduced(pre.scalar_type())) {
    pre.add_(bias);
    activate_out(hidden, pre, activation);
    return;
  }
  const at::Tensor pre_float = pre.to(at::kFloat).add_(bias);
  at::Tensor hidden_float = at::empty(hidden.sizes(), pre_float.options());
  activate_out(hidden_float, pre_float, activation);
  pre.copy_(pre_float);
  hidden.copy_(hidden_float);
}

void activation_backward(const at::Tensor& grad_hidden, const at::Tensor& pre, at::Tensor& grad_pre, at::Tensor& hidden,
                         Activation activation) {
  const bool reduced = is_reduced(pre.scalar_type());
  const at::Tensor p = reduced ? pre.to(at::kFloat) : pre;
  const at::Tensor g_h = reduced ? grad_hidden.to(at::kFloat) : grad_hidden;
  at::Tensor g_p = reduced ? at::empty(grad_pre.sizes(), p.options()) : grad_pre;
  at::Tensor h = reduced ? at::empty(hidden.sizes(), p.options()) : hidden;
  if (activation == Activation::kGelu) {
    at::gelu_backward_out(g_p, g_h, p);
    at::gelu_out(h, p);
  } else {
    const int64_t width = h.size(-1);
    const at::Tensor gate = p.narrow(-1, 0, width);
    const at::Tensor value = p.narrow(-1, width, width);
    const at::Tensor silu_gate = at::silu(gate);
    at::mul_out(h, silu_gate, value);
    at::Tensor grad_gate = g_p.narrow(-1, 0, width);
    at::Tensor grad_value = g_p.narrow(-1, width, width);
    at::mul_out(grad_value, g_h, silu_gate);
    at::silu_backward_out(grad_gate, g_h * value, gate);
  }
  if (reduced) {
    grad_pre.copy_(g_p);
    hidden.copy_(h);
  }
}

std::tuple<at::Tensor, at::Tensor> run_expert_mlp(ForwardKernel kernel, const at::Tensor& x, const at::Tensor& w1,
                                                  const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                                  const std::optional<at::Tensor>& expert_offsets,
                                                  c10::string_view activation_name) {
  constexpr const char* op = "expert_mlp";
  const Activation activation = parse_activation(op, activation_name);
  const Sizes sizes = check_inputs(op, x, w1, w2, expert_offsets, activation);
  check_biases(op, x, b1, b2, sizes);
  const c10::DeviceGuard guard(x.device());
  // The GEMMs of the kernels write into slices of preallocated outputs (out= variants), which autograd would
  // reject for inputs that require grad; this operator's autograd is registered from Python.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return kernel(x.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), expert_offsets,
                activation, sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_expert_mlp_backward(
    BackwardKernel kernel, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre, const std::optional<at::Tensor>& expert_offsets, c10::string_view activation_name) {
  constexpr const char* op = "expert_mlp_backward";
  const Activation activation = parse_activation(op, activation_name);
  const Sizes sizes = check_inputs(op, x, w1, w2, expert_offsets, activation);
  check_like(op, "grad_y", grad_y, x);
  check_shape(op, "grad_y", grad_y, x.sizes(), "x's shape");
  check_like(op, "pre_activation", pre, x);
  std::vector<int64_t> pre_shape(x.sizes().begin(), x.sizes().end());
  pre_shape.back() = sizes.pre_width;
  check_shape(op, "pre_activation", pre, pre_shape, sizes.padded ? "[E, C, F']" : "[M, F']");
  const c10::DeviceGuard guard(x.device());
  // See run_expert_mlp.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return kernel(grad_y.contiguous(), x.contiguous(), w1.contiguous(), w2.contiguous(), pre.contiguous(), expert_offsets,
                activation, sizes);
}

std::tuple<at::Tensor, at::Tensor> segments_forward(const char* op, ExpertLoop for_each_expert, const at::Tensor& x,
                                                    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                                    const at::Tensor& b2,
                                                    const std::optional<at::Tensor>& expert_offsets,
                                                    Activation activation, const Sizes& sizes) {
  const std::vector<int64_t> offsets =
      sizes.padded ? padded_offsets(sizes.experts, x.size(1)) : host_offsets(op, *expert_offsets, sizes.rows);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor pre = at::empty({sizes.rows, sizes.pre_width}, x.options());
  const at::Tensor x_rows = x.view({sizes.rows, sizes.dim});
  at::Tensor y_rows = y.view({sizes.rows, sizes.dim});
  const int64_t block = rows_per_block(sizes.pre_width);
  for_each_expert(offsets, [&](int64_t e) {
    const int64_t start = offsets[e];
    const int64_t rows = offsets[e + 1] - start;
    if (rows == 0) return;
    at::Tensor pre_e = pre.narrow(0, start, rows);
    at::mm_out(pre_e, x_rows.narrow(0, start, rows), w1[e]);
    at::Tensor hidden_e = at::empty({rows, sizes.hidden}, x.options());
    const at::Tensor bias = b1[e];
    for (int64_t row = 0; row < rows; row += block) {
      const int64_t count = std::min(block, rows - row);
      at::Tensor pre_block = pre_e.narrow(0, row, count);
      at::Tensor hidden_block = hidden_e.narrow(0, row, count);
      bias_activation_(pre_block, bias, hidden_block, activation);
    }
    at::Tensor y_e = y_rows.narrow(0, start, rows);
    at::addmm_out(y_e, b2[e], hidden_e, w2[e]);
  });
  if (sizes.padded) pre = pre.view({sizes.experts, x.size(1), sizes.pre_width});
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> segments_backward(
    const char* op, ExpertLoop for_each_expert, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& pre, const std::optional<at::Tensor>& expert_offsets, Activation activation,
    const Sizes& sizes) {
  const std::vector<int64_t> offsets =
      sizes.padded ? padded_offsets(sizes.experts, x.size(1)) : host_offsets(op, *expert_offsets, sizes.rows);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w1 = at::empty(w1.sizes(), x.options());
  at::Tensor grad_b1 = at::empty({sizes.experts, sizes.pre_width}, x.options());
  at::Tensor grad_w2 = at::empty(w2.sizes(), x.options());
  at::Tensor grad_b2 = at::empty({sizes.experts, sizes.dim}, x.options());
  const at::Tensor grad_y_rows = grad_y.view({sizes.rows, sizes.dim});
  const at::Tensor x_rows = x.view({sizes.rows, sizes.dim});
  const at::Tensor pre_rows = pre.view({sizes.rows, sizes.pre_width});
  at::Tensor grad_x_rows = grad_x.view({sizes.rows, sizes.dim});
  const int64_t block = rows_per_block(sizes.pre_width);
  for_each_expert(offsets, [&](int64_t e) {
    const int64_t start = offsets[e];
    const int64_t rows = offsets[e + 1] - start;
    if (rows == 0) {  // no rows: the expert's parameters get zero gradients
      grad_w1[e].zero_();
      grad_b1[e].zero_();
      grad_w2[e].zero_();
      grad_b2[e].zero_();
      return;
    }
    const at::Tensor grad_y_e = grad_y_rows.narrow(0, start, rows);
    const at::Tensor pre_e = pre_rows.narrow(0, start, rows);
    const at::Tensor grad_hidden = at::mm(grad_y_e, w2[e].t());
    at::Tensor hidden_e = at::empty({rows, sizes.hidden}, x.options());
    at::Tensor grad_pre = at::empty_like(pre_e);
    for (int64_t row = 0; row < rows; row += block) {
      const int64_t count = std::min(block, rows - row);
      at::Tensor grad_pre_block = grad_pre.narrow(0, row, count);
      at::Tensor hidden_block = hidden_e.narrow(0, row, count);
      activation_backward(grad_hidden.narrow(0, row, count), pre_e.narrow(0, row, count), grad_pre_block, hidden_block,
                          activation);
    }
    const at::Tensor x_e = x_rows.narrow(0, start, rows);
    at::Tensor grad_w2_e = grad_w2[e];
    at::Tensor grad_b2_e = grad_b2[e];
    at::Tensor grad_w1_e = grad_w1[e];
    at::Tensor grad_b1_e = grad_b1[e];
    at::Tensor grad_x_e = grad_x_rows.narrow(0, start, rows);
    at::mm_out(grad_w2_e, hidden_e.t(), grad_y_e);
    at::sum_out(grad_b2_e, grad_y_e, 0);
    at::mm_out(grad_w1_e, x_e.t(), grad_pre);
    at::sum_out(grad_b1_e, grad_pre, 0);
    at::mm_out(grad_x_e, grad_pre, w1[e].t());
  });
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace visionmoe::expert_mlp
