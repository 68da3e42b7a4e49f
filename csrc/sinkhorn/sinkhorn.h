// Log-domain Sinkhorn normalisation of router logits, with a fixed number of iterations, and its backward.
//
// For each of G groups, logits L [T, E] are scaled towards a transport plan P whose rows (tokens) sum to 1 and
// whose columns (experts) sum to T / E. The potentials u [T], v [E] start at zero and each iteration k = 1..K
// updates
//   rows:     u^k_t = -logsumexp_e(L_te + v^{k-1}_e)
//   columns:  v^k_e = log(T / E) - logsumexp_t(L_te + u^k_t)
// and the output is log P = L + u^K + v^K: after the last column step the columns sum to T / E exactly and the
// rows to 1 approximately. With K = 0 the output is L.
//
// The forward also returns every iteration's potentials (row_potentials [G, K, T], column_potentials
// [G, K, E], in the logits' opmath type: float32 for float16, bfloat16 and float32, float64 for float64), so
// that the backward recomputes each iteration's softmaxes from L instead of storing K [T, E] tensors.
//
// The kernels run on L'_te = L_te - m_t, m_t = max_e L_te (computed in opmath, where it is exact), and the row
// potentials they return are those of L': u'_t = u_t + m_t. P is unchanged, since a row constant is absorbed by
// u, but u' stays of the order of log E however large the logits are, whereas L + u + v with u near -L would
// cancel catastrophically: with float32 logits offset by 1e8 (a spacing of 8) the rows summed to 4, not 1.
//
// Backward (reverse mode through the iterations; a_u, a_v are the adjoints of u^k, v^k, g = dLoss/dlogP):
//   y = L + u^K + v^K gives         dL = g,  a_u^K = sum_e g_te,  a_v^K = sum_t g_te.
//   The column step v^k_e = c - logsumexp_t(L_te + u^k_t) has dv^k_e / dL_te = dv^k_e / du^k_t = -Q^k_te, with
//   Q^k_te = exp(L_te + u^k_t + v^k_e - c) the softmax over tokens, so
//                                   dL_te -= a_v^k_e Q^k_te,  a_u^k_t -= sum_e a_v^k_e Q^k_te.
//   The row step u^k_t = -logsumexp_e(L_te + v^{k-1}_e) has du^k_t / dL_te = du^k_t / dv^{k-1}_e = -P^k_te, with
//   P^k_te = exp(L_te + v^{k-1}_e + u^k_t) the softmax over experts, so
//                                   dL_te -= a_u^k_t P^k_te,  a_v^{k-1}_e = -sum_t a_u^k_t P^k_te.
//   u^{k-1} feeds only v^{k-1}, so a_u^{k-1} gets only the column step's term; v^0 = 0 is a constant.
// Both exponents are <= 0 (each is a softmax entry), so the recomputation cannot overflow.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace visionmoe::sinkhorn {

struct SinkhornShape {
  int64_t groups = 0;      // G
  int64_t tokens = 0;      // T
  int64_t experts = 0;     // E
  int64_t iterations = 0;  // K
};

// Backend kernels, for K >= 1. Every input is checked and contiguous, outputs are allocated, before these run;
// row_max [G, T] (opmath) holds m_t.
using ForwardKernel = void (*)(const SinkhornShape& shape, const at::Tensor& logits, const at::Tensor& row_max,
                               at::Tensor& log_plan, at::Tensor& row_potentials, at::Tensor& column_potentials);
using BackwardKernel = void (*)(const SinkhornShape& shape, const at::Tensor& grad_log_plan, const at::Tensor& logits,
                                const at::Tensor& row_max, const at::Tensor& row_potentials,
                                const at::Tensor& column_potentials, at::Tensor& grad_logits);

// Operator bodies shared by the backends (sinkhorn.cpp): argument checks, output allocation and the cases that
// need no kernel (K = 0, empty logits), then `kernel` under a guard for the logits' device. Each backend file
// passes its own kernel and registers the result with the dispatcher, so no host code branches on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_sinkhorn(ForwardKernel kernel, const at::Tensor& logits,
                                                            int64_t num_iterations, bool validate);
at::Tensor run_sinkhorn_backward(BackwardKernel kernel, const at::Tensor& grad_log_plan, const at::Tensor& logits,
                                 const at::Tensor& row_potentials, const at::Tensor& column_potentials);

namespace cpu {
void forward(const SinkhornShape& shape, const at::Tensor& logits, const at::Tensor& row_max, at::Tensor& log_plan,
             at::Tensor& row_potentials, at::Tensor& column_potentials);
void backward(const SinkhornShape& shape, const at::Tensor& grad_log_plan, const at::Tensor& logits,
              const at::Tensor& row_max, const at::Tensor& row_potentials, const at::Tensor& column_potentials,
              at::Tensor& grad_logits);
}  // namespace cpu

#ifdef VISIONMOE_WITH_CUDA
namespace cuda {
void forward(const SinkhornShape& shape, const at::Tensor& logits, const at::Tensor& row_max, at::Tensor& log_plan,
             at::Tensor& row_potentials, at::Tensor& column_potentials);
void backward(const SinkhornShape& shape, const at::Tensor& grad_log_plan, const at::Tensor& logits,
              const at::Tensor& row_max, const at::Tensor& row_potentials, const at::Tensor& column_potentials,
              at::Tensor& grad_logits);
}  // namespace cuda
#endif

}  // namespace visionmoe::sinkhorn
