// Every operator schema of visionmoe, in one place. Kernels register themselves beside their host code;
// fake kernels and autograd are registered from Python (visionmoe/ops).
#include <torch/library.h>

TORCH_LIBRARY(visionmoe, m) {
  // Dispatch family (csrc/dispatch): routing plans, expert dispatch and combine. dispatch and combine check the
  // plan's consistency only with validate=True (see csrc/dispatch/dispatch.h for what they assume).
  m.def(
      "make_plan(Tensor token_index, Tensor expert_index, int num_experts, SymInt? num_tokens=None, "
      "bool validate=True) -> (Tensor order, Tensor sorted_token, Tensor sorted_expert, Tensor slot, "
      "Tensor offsets)");
  m.def("token_major(Tensor sorted_token, SymInt num_tokens) -> (Tensor token_offsets, Tensor token_rows)");
  m.def(
      "dispatch(Tensor x, Tensor sorted_token, Tensor sorted_expert, Tensor slot, Tensor offsets, "
      "Tensor token_offsets, Tensor token_rows, int? capacity, bool padded, bool validate=False) -> Tensor");
  m.def(
      "dispatch_backward(Tensor grad_out, Tensor sorted_token, Tensor sorted_expert, Tensor slot, Tensor offsets, "
      "Tensor token_offsets, Tensor token_rows, int? capacity) -> Tensor");
  m.def(
      "combine(Tensor expert_out, Tensor weight, Tensor sorted_token, Tensor sorted_expert, Tensor slot, "
      "Tensor offsets, Tensor token_offsets, Tensor token_rows, int? capacity, bool validate=False) -> Tensor");
  m.def(
      "combine_backward(Tensor grad_y, Tensor expert_out, Tensor weight, Tensor sorted_token, Tensor sorted_expert, "
      "Tensor slot, Tensor offsets, int? capacity) -> (Tensor grad_expert_out, Tensor grad_weight)");

  // Routing family (csrc/routing): router assignments as routing plans over E * G virtual experts. The outputs
  // are the fields of visionmoe.RoutingPlan (python/visionmoe/plan.py) except for the combine weights, which
  // the Python wrapper gathers from the caller's differentiable scores with flat_index [M] int64: the position
  // (g * T + t) * E + e, in the [G, T, E] scores, of each assignment's score, in the plan's expert-major order.
  m.def(
      "topk_route(Tensor scores, int k, bool batch_priority) -> (Tensor sorted_token, Tensor sorted_expert, "
      "Tensor slot, Tensor offsets, Tensor order, Tensor flat_index, Tensor token_offsets, Tensor token_rows)");
  m.def(
      "expert_choice_route(Tensor scores, int capacity) -> (Tensor sorted_token, Tensor sorted_expert, "
      "Tensor slot, Tensor offsets, Tensor order, Tensor flat_index, Tensor token_offsets, Tensor token_rows)");

  // Soft MoE family (csrc/soft_moe): softmax-weighted mixing of tokens into slots and back; the backward
  // operators recompute the softmax from the logits.
  m.def("soft_dispatch(Tensor x, Tensor logits) -> Tensor");
  m.def("soft_dispatch_backward(Tensor grad_slots, Tensor x, Tensor logits) -> (Tensor grad_x, Tensor grad_logits)");
  m.def("soft_combine(Tensor y, Tensor logits) -> Tensor");
  m.def("soft_combine_backward(Tensor grad_out, Tensor y, Tensor logits) -> (Tensor grad_y, Tensor grad_logits)");

  // Sinkhorn family (csrc/sinkhorn): log-domain Sinkhorn normalisation of router logits, and its backward.
  m.def(
      "sinkhorn(Tensor logits, int num_iterations, bool validate=True) -> (Tensor log_plan, Tensor row_potentials, "
      "Tensor column_potentials)");
  m.def(
      "sinkhorn_backward(Tensor grad_log_plan, Tensor logits, Tensor row_potentials, Tensor column_potentials) "
      "-> Tensor");

  // Expert MLP family (csrc/expert_mlp): every expert's Linear -> activation -> Linear on its rows, padded
  // [E, C, D] or packed [M, D] with expert_offsets [E + 1]; the forward also returns the pre-activation, which
  // autograd saves for the backward.
  m.def(
      "expert_mlp(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? expert_offsets, str activation) "
      "-> (Tensor y, Tensor pre_activation)");
  m.def(
      "expert_mlp_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor pre_activation, "
      "Tensor? expert_offsets, str activation) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, "
      "Tensor grad_b2)");

  // Teacher-routing family (csrc/teacher_routing): TGR-MoE's routing-distillation loss, KL(p_teacher || softmax(
  // student_logits)) per token with reduction "none", "mean" or "sum", the teacher given as "probabilities" or
  // "logits"; the forward also returns the per-token log-sum-exps that the backward recomputes the softmaxes from.
  m.def(
      "teacher_routing_loss(Tensor student_logits, Tensor teacher, str reduction, str teacher_format) -> "
      "(Tensor loss, Tensor student_lse, Tensor teacher_lse)");
  m.def(
      "teacher_routing_loss_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor student_lse, "
      "Tensor teacher_lse, str reduction, str teacher_format) -> Tensor");

  // What-where attention family (csrc/whatwhere): shared logits of tokens and slots, softmaxes over both axes
  // and both aggregations; the forward also returns the two log-sum-exps the backward recomputes them from.
  m.def(
      "whatwhere_attention(Tensor q, Tensor k, Tensor v_tokens, Tensor v_slots, Tensor where) -> "
      "(Tensor token_update, Tensor slot_update, Tensor logits, Tensor token_logsumexp, Tensor slot_logsumexp)");
  m.def(
      "whatwhere_attention_backward(Tensor? grad_token_update, Tensor? grad_slot_update, Tensor? grad_logits, "
      "Tensor q, Tensor k, Tensor v_tokens, Tensor v_slots, Tensor logits, Tensor token_logsumexp, "
      "Tensor slot_logsumexp) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v_tokens, Tensor grad_v_slots, "
      "Tensor grad_where)");
}
