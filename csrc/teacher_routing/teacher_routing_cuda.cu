// CUDA kernels of the teacher-routing loss (see teacher_routing.h for the formulas). One warp per token, its
// lanes striding over the experts, with warp-shuffle reductions: a first pass for the row maxima (and, for
// teacher probabilities, their sum), a second for the sums of exponentials and of the KL terms. The mean and
// the sum reduce in two stages in fixed orders: each block adds its warps' losses in warp order into one
// partial per block, then one block adds the partials with a fixed tree. No atomics: the results are
// deterministic, run to run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "common/device_math.cuh"
#include "common/warp_reduce.cuh"
#include "teacher_routing/teacher_routing.h"

namespace visionmoe::teacher_routing::cuda {
namespace {

using device_math::exp_opmath;
using device_math::log_opmath;
using warp_reduce::kWarpSize;
using warp_reduce::warp_max;
using warp_reduce::warp_sum;

constexpr int kWarps = 8;  // tokens per block
constexpr int kThreads = kWarpSize * kWarps;
constexpr int kReduceThreads = 1024;

struct Rows {
  int64_t tokens, experts;
  bool teacher_logits;

  // This warp's token; rows() past the end belong to no token.
  __device__ int64_t token() const { return int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; }
  __device__ int lane() const { return threadIdx.x % kWarpSize; }
};

// Per token: the loss (into row_loss for "none", else summed into one partial per block), the student's
// log-sum-exp and, for teacher logits, the teacher's.
template <typename scalar_t, typename opmath_t>
__global__ void forward_kernel(Rows rows, const scalar_t* __restrict__ student_logits,
                               const scalar_t* __restrict__ teacher, opmath_t* __restrict__ row_loss,
                               opmath_t* __restrict__ block_partial, opmath_t* __restrict__ student_lse,
                               opmath_t* __restrict__ teacher_lse,
                               unsigned long long* __restrict__ first_invalid_token) {
  __shared__ opmath_t warp_loss[kWarps];
  const int64_t E = rows.experts, t = rows.token();
  const int lane = rows.lane();
  opmath_t kl = 0;
  if (t < rows.tokens) {  // the same for the whole warp
    const scalar_t* s = student_logits + t * E;
    const scalar_t* p = teacher + t * E;
    opmath_t s_max = -std::numeric_limits<opmath_t>::infinity();
    opmath_t a_max = s_max;
    for (int64_t e = lane; e < E; e += kWarpSize) {
      s_max = max(s_max, static_cast<opmath_t>(s[e]));
      if (rows.teacher_logits) a_max = max(a_max, static_cast<opmath_t>(p[e]));
    }
    s_max = warp_max(s_max);
    if (rows.teacher_logits) a_max = warp_max(a_max);
    // z = sum exp(s - m); for logits, z_a = sum w and cross = sum w ((a - m_a) - (s - m)) with w = exp(a - m_a);
    // for probabilities, z_a holds sum p and cross = sum p (log p - (s - m)), with 0 log 0 = 0.
    opmath_t z = 0, z_a = 0, cross = 0;
    bool negative = false;  // a negative teacher probability, which the CPU kernel rejects as well
    for (int64_t e = lane; e < E; e += kWarpSize) {
      const opmath_t shifted_s = static_cast<opmath_t>(s[e]) - s_max;
      z += exp_opmath(shifted_s);
      const opmath_t teacher_value = static_cast<opmath_t>(p[e]);
      if (rows.teacher_logits) {
        const opmath_t shifted_a = teacher_value - a_max;
        const opmath_t w = exp_opmath(shifted_a);
        z_a += w;
        cross += w * (shifted_a - shifted_s);
      } else {
        z_a += teacher_value;
        negative |= teacher_value < 0;
        const opmath_t entropy_term = teacher_value == 0 ? opmath_t(0) : teacher_value * log_opmath(teacher_value);
        cross += entropy_term - teacher_value * shifted_s;
      }
    }
    z = warp_sum(z);
    z_a = warp_sum(z_a);
    cross = warp_sum(cross);
    const opmath_t log_z = log_opmath(z);
    kl = rows.teacher_logits ? cross / z_a + log_z - log_opmath(z_a) : cross + z_a * log_z;
    const bool any_negative = __any_sync(0xffffffffu, negative);
    if (lane == 0) {
      // As the CPU kernel: a token whose loss is not finite (NaN or infinite inputs) or whose teacher holds a
      // negative probability is reported; the smallest such token wins, whatever the schedule.
      if (!isfinite(kl) || any_negative) atomicMin(first_invalid_token, static_cast<unsigned long long>(t));
      student_lse[t] = s_max + log_z;
      if (rows.teacher_logits) teacher_lse[t] = a_max + log_opmath(z_a);
      if (row_loss != nullptr) row_loss[t] = kl;
    }
  }
  if (block_partial != nullptr) {                            // the same for the whole grid
    if (lane == 0) warp_loss[threadIdx.x / kWarpSize] = kl;  // 0 for warps past the last token
    __syncthreads();
    if (threadIdx.x == 0) {
      opmath_t sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += warp_loss[w];
      block_partial[blockIdx.x] = sum;
    }
  }
}

// out = scale * sum of the n partials: each thread adds a strided subset in order, then a fixed tree.
template <typename opmath_t>
__global__ void reduce_partials_kernel(int64_t n, const opmath_t* __restrict__ partial, opmath_t scale,
                                       opmath_t* __restrict__ out) {
  __shared__ opmath_t shared[kReduceThreads];
  opmath_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) sum += partial[i];
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = shared[0] * scale;
}

// dLoss/ds = g (P q - p), P = sum_e p (1 for teacher logits), recomputing q and p from the saved log-sum-exps.
// The upstream gradient is grad_loss[t] for "none", else grad_loss[0] * grad_scale (1 / T for the mean).
template <typename scalar_t, typename opmath_t>
__global__ void backward_kernel(Rows rows, bool per_token, opmath_t grad_scale, const opmath_t* __restrict__ grad_loss,
                                const scalar_t* __restrict__ student_logits, const scalar_t* __restrict__ teacher,
                                const opmath_t* __restrict__ student_lse, const opmath_t* __restrict__ teacher_lse,
                                scalar_t* __restrict__ grad_student_logits) {
  const int64_t E = rows.experts, t = rows.token();
  if (t >= rows.tokens) return;  // whole warps only: the shuffles below see all 32 lanes
  const int lane = rows.lane();
  const scalar_t* s = student_logits + t * E;
  const scalar_t* p = teacher + t * E;
  scalar_t* out = grad_student_logits + t * E;
  opmath_t teacher_mass = 1;
  if (!rows.teacher_logits) {
    opmath_t partial = 0;
    for (int64_t e = lane; e < E; e += kWarpSize) partial += static_cast<opmath_t>(p[e]);
    teacher_mass = warp_sum(partial);
  }
  const opmath_t g = per_token ? grad_loss[t] : grad_loss[0] * grad_scale;
  const opmath_t g_mass = g * teacher_mass;
  const opmath_t s_lse = student_lse[t];
  const opmath_t a_lse = rows.teacher_logits ? teacher_lse[t] : opmath_t(0);
  for (int64_t e = lane; e < E; e += kWarpSize) {
    const opmath_t teacher_value = static_cast<opmath_t>(p[e]);
    const opmath_t p_e = rows.teacher_logits ? exp_opmath(teacher_value - a_lse) : teacher_value;
    out[e] = static_cast<scalar_t>(g_mass * exp_opmath(static_cast<opmath_t>(s[e]) - s_lse) - g * p_e);
  }
}

unsigned row_blocks(const LossShape& shape, const char* op) {
  const int64_t blocks = (shape.tokens + kWarps - 1) / kWarps;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), op,
                    ": student_logits has too many tokens (T = ", shape.tokens, ") for one CUDA launch");
  return static_cast<unsigned>(blocks);
}

Rows make_rows(const LossShape& shape) {
  return Rows{shape.tokens, shape.experts, shape.teacher_format == TeacherFormat::kLogits};
}

}  // namespace

void forward(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher, at::Tensor& loss,
             at::Tensor& student_lse, at::Tensor& teacher_lse, at::Tensor& first_invalid_token) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = row_blocks(shape, "teacher_routing_loss");
  const bool per_token = shape.reduction == Reduction::kNone;
  const at::Tensor block_partial = per_token ? at::Tensor() : at::empty({int64_t(blocks)}, loss.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student_logits.scalar_type(), "visionmoe_teacher_routing_loss_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        opmath_t* partial = per_token ? nullptr : block_partial.mutable_data_ptr<opmath_t>();
        forward_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
            make_rows(shape), student_logits.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
            per_token ? loss.mutable_data_ptr<opmath_t>() : nullptr, partial, student_lse.mutable_data_ptr<opmath_t>(),
            shape.teacher_format == TeacherFormat::kLogits ? teacher_lse.mutable_data_ptr<opmath_t>() : nullptr,
            reinterpret_cast<unsigned long long*>(first_invalid_token.mutable_data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!per_token) {
          const opmath_t scale =
              shape.reduction == Reduction::kMean ? opmath_t(1) / static_cast<opmath_t>(shape.tokens) : opmath_t(1);
          reduce_partials_kernel<opmath_t>
              <<<1, kReduceThreads, 0, stream>>>(int64_t(blocks), partial, scale, loss.mutable_data_ptr<opmath_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

void backward(const LossShape& shape, const at::Tensor& grad_loss, const at::Tensor& student_logits,
              const at::Tensor& teacher, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
              at::Tensor& grad_student_logits) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = row_blocks(shape, "teacher_routing_loss_backward");
  const bool per_token = shape.reduction == Reduction::kNone;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student_logits.scalar_type(), "visionmoe_teacher_routing_loss_bwd_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t grad_scale =
            shape.reduction == Reduction::kMean ? opmath_t(1) / static_cast<opmath_t>(shape.tokens) : opmath_t(1);
        backward_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
            make_rows(shape), per_token, grad_scale, grad_loss.const_data_ptr<opmath_t>(),
            student_logits.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
            student_lse.const_data_ptr<opmath_t>(),
            shape.teacher_format == TeacherFormat::kLogits ? teacher_lse.const_data_ptr<opmath_t>() : nullptr,
            grad_student_logits.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace visionmoe::teacher_routing::cuda

namespace visionmoe::teacher_routing {
namespace {

// The kernel flags the first invalid token on the device; reading it back is the one synchronisation of the
// forward, the price of raising the CPU kernel's error (non-finite input) rather than returning a NaN loss.
int64_t forward_validated(const LossShape& shape, const at::Tensor& student_logits, const at::Tensor& teacher,
                          at::Tensor& loss, at::Tensor& student_lse, at::Tensor& teacher_lse) {
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor first_invalid_token = at::full({1}, kNone, student_logits.options().dtype(at::kLong));
  cuda::forward(shape, student_logits, teacher, loss, student_lse, teacher_lse, first_invalid_token);
  const int64_t token = first_invalid_token.item<int64_t>();
  return token == kNone ? -1 : token;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_routing_loss_cuda(const at::Tensor& student_logits,
                                                                         const at::Tensor& teacher,
                                                                         c10::string_view reduction,
                                                                         c10::string_view teacher_format) {
  return run_teacher_routing_loss(&forward_validated, student_logits, teacher, reduction, teacher_format);
}

at::Tensor teacher_routing_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                              const at::Tensor& teacher, const at::Tensor& student_lse,
                                              const at::Tensor& teacher_lse, c10::string_view reduction,
                                              c10::string_view teacher_format) {
  return run_teacher_routing_loss_backward(&cuda::backward, grad_loss, student_logits, teacher, student_lse,
                                           teacher_lse, reduction, teacher_format);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) {
  m.impl("teacher_routing_loss", &teacher_routing_loss_cuda);
  m.impl("teacher_routing_loss_backward", &teacher_routing_loss_backward_cuda);
}

}  // namespace visionmoe::teacher_routing
