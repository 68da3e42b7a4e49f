// Host code of the grouped expert MLP: argument checks naming the argument, the activation passes, and the
// choice of GEMM strategy per device and layout.
//
//   CPU, both layouts:   the per-expert GEMM loop of expert_mlp_segments.cpp, experts in parallel (the offsets
//                        are read on the host, which is free there, and validated).
//   CUDA, padded:        batched GEMMs (at::bmm) over [E, C, *]; no offsets are involved.
//   CUDA, packed:        torch's grouped GEMM (at::_grouped_mm, offsets on the device) for bfloat16 when this
//                        torch has it and D and F are multiples of 8 (its 16-byte alignment): torch runs its
//                        CUTLASS kernel, without a host synchronisation, on sm90/sm100, and elsewhere its own
//                        fallback, which reads the offsets on the host. Other dtypes copy the offsets to the host
//                        once per call (one synchronisation) and run the per-expert loop in order.
// On CUDA the bias adds and activations are ATen elementwise passes over whole tensors (the packed layout's
// biases gathered per row), not fused into the GEMMs' epilogues; that code is compile-checked only.
#include "expert_mlp/expert_mlp.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common/checks.h"

#if defined(VISIONMOE_WITH_CUDA) && __has_include(<ATen/ops/_grouped_mm.h>)
#define VISIONMOE_HAS_GROUPED_MM 1
#endif

namespace visionmoe::expert_mlp {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

bool is_reduced(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// Sizes of one call: E experts, D width, F hidden width, F' = F or 2F columns of x w1.
struct Sizes {
  int64_t experts = 0;
  int64_t dim = 0;
  int64_t hidden = 0;
  int64_t pre_width = 0;
  bool padded = false;
  int64_t rows = 0;  // M, or E * C when padded
};

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
  check_device(op, name, t, "x", x);
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                 const char* letters) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", letters, " = ", expected, ", got ",
              t.sizes());
}

Sizes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                   const std::optional<at::Tensor>& expert_offsets, Activation activation) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must have shape [E, C, D] (padded) or [M, D] (packed), got ",
              x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(w1.dim() == 3, op, ": w1 must have shape [E, D, F'], got ", w1.sizes());
  check_like(op, "w1", w1, x);
  Sizes sizes;
  sizes.experts = w1.size(0);
  sizes.dim = x.size(-1);
  sizes.pre_width = w1.size(2);
  sizes.padded = x.dim() == 3;
  TORCH_CHECK(w1.size(1) == sizes.dim, op, ": w1 must have shape [E, D, F'] with D = ", sizes.dim,
              " (the width of x), got ", w1.sizes());
  if (activation == Activation::kSiluGated) {
    TORCH_CHECK(sizes.pre_width % 2 == 0, op,
                ": w1 must have an even number of columns 2F (gate and value) for activation \"silu_gated\", got ",
                w1.sizes());
    sizes.hidden = sizes.pre_width / 2;
  } else {
    sizes.hidden = sizes.pre_width;
  }
  TORCH_CHECK(w2.dim() == 3, op, ": w2 must have shape [E, F, D], got ", w2.sizes());
  check_like(op, "w2", w2, x);
  check_shape(op, "w2", w2, {sizes.experts, sizes.hidden, sizes.dim}, "[E, F, D]");
  if (sizes.padded) {
    TORCH_CHECK(!expert_offsets.has_value(), op,
                ": expert_offsets must be None for padded x [E, C, D]; pass packed x [M, D] with offsets instead");
    TORCH_CHECK(x.size(0) == sizes.experts, op, ": x must have shape [E, C, D] with E = ", sizes.experts,
                " (the experts of w1), got ", x.sizes());
    sizes.rows = x.size(0) * x.size(1);
  } else {
    TORCH_CHECK(expert_offsets.has_value(), op,
                ": expert_offsets [E + 1] is required for packed x [M, D] (expert e's rows are "
                "expert_offsets[e]:expert_offsets[e + 1])");
    const at::Tensor& offsets = *expert_offsets;
    TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == sizes.experts + 1, op,
                ": expert_offsets must have shape [E + 1] = [", sizes.experts + 1, "], got ", offsets.sizes());
    TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": expert_offsets must have dtype int64, got ",
                offsets.scalar_type());
    check_device(op, "expert_offsets", offsets, "x", x);
    sizes.rows = x.size(0);
  }
  return sizes;
}

void check_biases(const char* op, const at::Tensor& x, const at::Tensor& b1, const at::Tensor& b2,
                  const Sizes& sizes) {
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
  TORCH_CHECK(result.front() == 0, op, ": expert_offsets[0] must be 0, got ", result.front());
  for (size_t e = 1; e < result.size(); ++e) {
    TORCH_CHECK(result[e] >= result[e - 1], op, ": expert_offsets must be non-decreasing, got expert_offsets[", e,
                "] = ", result[e], " < expert_offsets[", e - 1, "] = ", result[e - 1]);
  }
  TORCH_CHECK(result.back() == rows, op, ": expert_offsets[E] must be M = ", rows, " (the rows of x), got ",
              result.back());
  return result;
}

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

#ifdef VISIONMOE_HAS_GROUPED_MM
// torch's grouped GEMM takes bfloat16 operands whose rows and base addresses are 16-byte aligned, and at least
// one row, one expert and one column of each operand.
bool use_grouped_mm(std::initializer_list<at::Tensor> operands, const Sizes& sizes) {
  if (operands.begin()->scalar_type() != at::kBFloat16 || sizes.dim % 8 != 0 || sizes.hidden % 8 != 0 ||
      sizes.rows == 0 || sizes.experts == 0 || sizes.dim == 0 || sizes.hidden == 0) {
    return false;
  }
  return std::all_of(operands.begin(), operands.end(),
                     [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; });
}

// The grouped GEMM's group ends, int32 on the device, clamped into [0, M] and made non-decreasing so that
// offsets that were not validated (that would take a synchronisation) can never index outside x.
at::Tensor group_ends(const at::Tensor& expert_offsets, int64_t rows) {
  const int64_t experts = expert_offsets.size(0) - 1;
  return std::get<0>(expert_offsets.narrow(0, 1, experts).clamp(0, rows).cummax(0));
}

// Expert of every row [M], for the bias adds.
at::Tensor row_experts(const at::Tensor& ends, int64_t rows) {
  const at::Tensor row = at::arange(rows, ends.options());
  return at::searchsorted(ends, row, /*out_int32=*/false, /*right=*/true).clamp_max_(ends.size(0) - 1);
}

// Column sums of rows [M, N] per expert -> [E, N], without reading the offsets on the host.
at::Tensor segment_sums(const at::Tensor& rows, const at::Tensor& ends) {
  const at::Tensor starts_and_ends = at::cat({at::zeros({1}, ends.options()), ends});
  return at::segment_reduce(rows, "sum", /*lengths=*/std::nullopt, /*indices=*/std::nullopt, starts_and_ends,
                            /*axis=*/0, /*unsafe=*/true, /*initial=*/0);
}

std::tuple<at::Tensor, at::Tensor> grouped_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                                   const at::Tensor& w2, const at::Tensor& b2,
                                                   const at::Tensor& expert_offsets, Activation activation,
                                                   const Sizes& sizes) {
  const at::Tensor ends = group_ends(expert_offsets, sizes.rows);
  const at::Tensor ends_int = ends.to(at::kInt);
  const at::Tensor experts = row_experts(ends, sizes.rows);
  at::Tensor pre = at::_grouped_mm(x, w1, ends_int);
  at::Tensor hidden = at::empty({sizes.rows, sizes.hidden}, x.options());
  bias_activation_(pre, b1.index_select(0, experts), hidden, activation);
  at::Tensor y = at::_grouped_mm(hidden, w2, ends_int);
  y.add_(b2.index_select(0, experts));
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    const at::Tensor& expert_offsets, Activation activation, const Sizes& sizes) {
  const at::Tensor ends = group_ends(expert_offsets, sizes.rows);
  const at::Tensor ends_int = ends.to(at::kInt);
  const at::Tensor grad_hidden = at::_grouped_mm(grad_y, w2.transpose(1, 2), ends_int);
  at::Tensor grad_pre = at::empty_like(pre);
  at::Tensor hidden = at::empty({sizes.rows, sizes.hidden}, x.options());
  activation_backward(grad_hidden, pre, grad_pre, hidden, activation);
  // An expert without rows has an empty reduction dimension in the weight-gradient GEMMs; its gradients are
  // zeroed explicitly rather than relying on how the grouped kernel treats K = 0.
  const at::Tensor starts = at::cat({at::zeros({1}, ends.options()), ends.narrow(0, 0, sizes.experts - 1)});
  const at::Tensor no_rows = ends.le(starts).view({sizes.experts, 1, 1});
  at::Tensor grad_w2 = at::_grouped_mm(hidden.t(), grad_y, ends_int).masked_fill_(no_rows, 0);
  at::Tensor grad_w1 = at::_grouped_mm(x.t(), grad_pre, ends_int).masked_fill_(no_rows, 0);
  at::Tensor grad_x = at::_grouped_mm(grad_pre, w1.transpose(1, 2), ends_int);
  return {grad_x, grad_w1, segment_sums(grad_pre, ends), grad_w2, segment_sums(grad_y, ends)};
}
#endif

}  // namespace

Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu_gated") return Activation::kSiluGated;
  TORCH_CHECK(false, op, ": activation must be \"gelu\" or \"silu_gated\", got \"",
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

void activation_backward(const at::Tensor& grad_hidden, const at::Tensor& pre, at::Tensor& grad_pre,
                         at::Tensor& hidden, Activation activation) {
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

std::tuple<at::Tensor, at::Tensor> expert_mlp(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
                                              const at::Tensor& w2_in, const at::Tensor& b2_in,
                                              const std::optional<at::Tensor>& expert_offsets,
                                              c10::string_view activation_name) {
  constexpr const char* op = "expert_mlp";
  const Activation activation = parse_activation(op, activation_name);
  const Sizes sizes = check_inputs(op, x_in, w1_in, w2_in, expert_offsets, activation);
  check_biases(op, x_in, b1_in, b2_in, sizes);
  const c10::DeviceGuard guard(x_in.device());
  // The GEMMs below write into slices of preallocated outputs (out= variants), which autograd would reject for
  // inputs that require grad; this operator's autograd is registered from Python.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous();
  const at::Tensor b1 = b1_in.contiguous();
  const at::Tensor w2 = w2_in.contiguous();
  const at::Tensor b2 = b2_in.contiguous();
  if (x.is_cuda() && sizes.padded) {
    at::Tensor pre = at::bmm(x, w1);
    at::Tensor hidden = at::empty({sizes.experts, x.size(1), sizes.hidden}, x.options());
    bias_activation_(pre, b1.unsqueeze(1), hidden, activation);
    return {at::baddbmm(b2.unsqueeze(1), hidden, w2), pre};
  }
#ifdef VISIONMOE_HAS_GROUPED_MM
  if (x.is_cuda() && use_grouped_mm({x, w1, w2}, sizes)) {
    return grouped_forward(x, w1, b1, w2, b2, *expert_offsets, activation, sizes);
  }
#endif
  const std::vector<int64_t> offsets = sizes.padded ? padded_offsets(sizes.experts, x.size(1))
                                                    : host_offsets(op, *expert_offsets, sizes.rows);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor pre = at::empty({sizes.rows, sizes.pre_width}, x.options());
  at::Tensor y_rows = y.view({sizes.rows, sizes.dim});
  segments_forward(x.view({sizes.rows, sizes.dim}), SegmentTensors{w1, b1, w2, b2}, offsets, activation, y_rows,
                   pre);
  if (sizes.padded) pre = pre.view({sizes.experts, x.size(1), sizes.pre_width});
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in,
    const at::Tensor& pre_in, const std::optional<at::Tensor>& expert_offsets, c10::string_view activation_name) {
  constexpr const char* op = "expert_mlp_backward";
  const Activation activation = parse_activation(op, activation_name);
  const Sizes sizes = check_inputs(op, x_in, w1_in, w2_in, expert_offsets, activation);
  check_like(op, "grad_y", grad_y_in, x_in);
  check_shape(op, "grad_y", grad_y_in, x_in.sizes(), "x's shape");
  check_like(op, "pre_activation", pre_in, x_in);
  std::vector<int64_t> pre_shape(x_in.sizes().begin(), x_in.sizes().end());
  pre_shape.back() = sizes.pre_width;
  check_shape(op, "pre_activation", pre_in, pre_shape, sizes.padded ? "[E, C, F']" : "[M, F']");
  const c10::DeviceGuard guard(x_in.device());
  // The GEMMs below write into slices of preallocated outputs (out= variants), which autograd would reject for
  // inputs that require grad; this operator's autograd is registered from Python.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous();
  const at::Tensor w2 = w2_in.contiguous();
  const at::Tensor pre = pre_in.contiguous();
  if (x.is_cuda() && sizes.padded) {
    const at::Tensor grad_hidden = at::bmm(grad_y, w2.transpose(1, 2));
    at::Tensor grad_pre = at::empty_like(pre);
    at::Tensor hidden = at::empty(grad_hidden.sizes(), x.options());
    activation_backward(grad_hidden, pre, grad_pre, hidden, activation);
    return {at::bmm(grad_pre, w1.transpose(1, 2)), at::bmm(x.transpose(1, 2), grad_pre), grad_pre.sum(1),
            at::bmm(hidden.transpose(1, 2), grad_y), grad_y.sum(1)};
  }
#ifdef VISIONMOE_HAS_GROUPED_MM
  if (x.is_cuda() && use_grouped_mm({x, w1, w2, grad_y, pre}, sizes)) {
    return grouped_backward(grad_y, x, w1, w2, pre, *expert_offsets, activation, sizes);
  }
#endif
  const std::vector<int64_t> offsets = sizes.padded ? padded_offsets(sizes.experts, x.size(1))
                                                    : host_offsets(op, *expert_offsets, sizes.rows);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w1 = at::empty(w1.sizes(), x.options());
  at::Tensor grad_b1 = at::empty({sizes.experts, sizes.pre_width}, x.options());
  at::Tensor grad_w2 = at::empty(w2.sizes(), x.options());
  at::Tensor grad_b2 = at::empty({sizes.experts, sizes.dim}, x.options());
  at::Tensor grad_x_rows = grad_x.view({sizes.rows, sizes.dim});
  segments_backward(grad_y.view({sizes.rows, sizes.dim}), x.view({sizes.rows, sizes.dim}), w1, w2,
                    pre.view({sizes.rows, sizes.pre_width}), offsets, activation, grad_x_rows, grad_w1, grad_b1,
                    grad_w2, grad_b2);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) {
  m.impl("expert_mlp", &expert_mlp);
  m.impl("expert_mlp_backward", &expert_mlp_backward);
}

#ifdef VISIONMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("expert_mlp", &expert_mlp);
  m.impl("expert_mlp_backward", &expert_mlp_backward);
}
#endif

}  // namespace visionmoe::expert_mlp
