"""Hindsight selection (PAPERS.md section 1, from Gumbel-NeRF): every expert processes every token, and each
token's expert is chosen afterwards from the experts' outputs, trained with a straight-through Gumbel-softmax.

Shape letters: G groups, T tokens per group, D width, E experts, M = G * T * E assignments, D_out the experts'
output width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from .. import losses, ops
from ..plan import RoutingPlan
from .base import Router, RouterMetrics, draw_noise, register_router, unrouted_fraction
from .checks import check_int, check_real


@register_router("hindsight")
class HindsightRouter(Router):
    """Hindsight selection: route every token to every expert, then pick one expert per token by its output.

    ``forward(x)`` returns a dropless plan assigning each of the G * T tokens to each of the E experts (virtual
    experts ``e * G + g`` as for every router), each with weight 1 / E, so that ``ops.combine`` of it alone
    averages the experts. ``choose(plan, expert_out)`` scores each assignment's expert output with a learned
    linear scorer, s = expert_out w (no bias: a per-token shift would not change the choice), and picks one
    expert per token by a straight-through Gumbel-softmax: in training the choice is argmax_e(s_e + g_e), g
    Gumbel noise, i.e. a sample of softmax(s); its weights are the hard one-hot in the forward pass with the
    gradient of softmax((s + g) / tau) in the backward pass. In eval mode the choice is argmax_e s_e, without
    noise (ties to the lower expert), with the gradient of softmax(s / tau). The returned plan differs only in
    its weights, so ``ops.combine(expert_out, plan, G * T)`` gives each token its chosen expert's output; the
    gradient reaches the chosen output directly and every expert's output and the scorer through the scores.

    Usage::

        plan, _ = router(x)                                       # x [G, T, D]
        hidden = ops.dispatch(x.reshape(-1, D), plan, "packed")   # [M, D], rows grouped by expert
        expert_out = experts(hidden, plan.offsets)                # [M, D_out]
        plan, metrics = router.choose(plan, expert_out)
        y = ops.combine(expert_out, plan, G * T)                  # [G * T, D_out]

    The plan is dropless, so it serves the packed layout only.

    Args:
        dim: D. num_experts: E.
        output_dim: D_out, the experts' output width (default D).
        tau: the Gumbel-softmax temperature of the backward pass, > 0 (default 1.0, as
            ``torch.nn.functional.gumbel_softmax``). It does not change which expert is chosen.

    Metrics: ``forward``'s describe the dispatch (every expert receives every token, probs the uniform 1 / E,
    logits zeros: there is no prior gate); ``choose``'s describe the choice: logits the scores s [G, T, E]
    (without noise), probs softmax(s), the probability of each expert being chosen in training, load the
    number of tokens that chose each expert, and aux_losses ``entropy``, the mean entropy of probs (a small
    positive weight makes the choice confident; it is not needed for training).
    """

    def __init__(self, dim: int, num_experts: int, output_dim: Optional[int] = None, tau: float = 1.0):
        super().__init__(dim, num_experts)
        output_dim = check_int("output_dim", output_dim, 1, none_means="dim")
        self.output_dim = self.dim if output_dim is None else output_dim
        self.tau = check_real("tau", tau, greater_than=0)
        self.scorer = nn.Linear(self.output_dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[RoutingPlan, RouterMetrics]:
        x = self.grouped_input(x)  # any floating-point dtype: x only sets the plan's weights' dtype
        uniform = x.new_full((*x.shape[:2], self.num_experts), 1.0 / self.num_experts)  # [G, T, E]
        # The top E of equal scores, dropless: every token to every expert with weight 1 / E, listed expert-major
        # (virtual expert e * G + g holds tokens g * T .. g * T + T - 1), and, ties going to the lower expert,
        # each token's E assignments in expert order in its token-major view. Empty inputs route to empty plans.
        plan = ops.topk_route(uniform, self.num_experts, None, weights=uniform)
        return plan, RouterMetrics.of_plan(plan, uniform, torch.zeros_like(uniform))

    def choose(self, plan: RoutingPlan, expert_out: torch.Tensor) -> Tuple[RoutingPlan, RouterMetrics]:
        """Picks one expert per token from the experts' outputs (see the class documentation).

        Args:
            plan: the plan :meth:`forward` returned.
            expert_out: [M, D_out], the experts' outputs in the plan's packed rows.

        Returns:
            The plan with straight-through one-hot weights, and the metrics of the choice.
        """
        num_experts = self.num_experts
        num_tokens = plan.num_tokens
        if num_tokens is None or plan.num_assignments != num_tokens * num_experts or plan.capacity is not None:
            raise ValueError(
                "plan must be the plan HindsightRouter.forward returned (every token assigned to every "
                f"one of the {num_experts} experts, dropless, with its token-major view)"
            )
        if expert_out.shape != (plan.num_assignments, self.output_dim):
            raise ValueError(
                f"expert_out must have shape [M, output_dim] = [{plan.num_assignments}, "
                f"{self.output_dim}] (the plan's packed rows), got {tuple(expert_out.shape)}"
            )
        scores = self.scorer(expert_out.to(self.scorer.weight.dtype)).squeeze(-1)  # [M]
        # Every token has exactly E assignments, listed in expert order: its scores form a row of [G * T, E].
        token_scores = scores.index_select(0, plan.token_rows).view(num_tokens, num_experts)
        perturbed = token_scores
        if self.training:
            gumbel = -draw_noise(token_scores, self.noise_shard, "exponential").log()
            perturbed = token_scores + gumbel
        soft = (perturbed / self.tau).softmax(dim=-1)
        hard = nn.functional.one_hot(perturbed.argmax(dim=-1), num_experts).to(soft.dtype)
        choice = hard + (soft - soft.detach())  # the value of hard, the gradient of soft
        weight = torch.zeros_like(scores).index_copy(0, plan.token_rows, choice.reshape(-1))
        chosen = dataclasses.replace(plan, weight=weight)
        tokens_per_group = num_tokens // plan.num_groups if plan.num_groups > 0 else 0
        logits = token_scores.view(plan.num_groups, tokens_per_group, num_experts)
        probs = logits.softmax(dim=-1)
        metrics = RouterMetrics(
            probs=probs,
            logits=logits,
            load=hard.detach().sum(dim=0),
            dropped_fraction=chosen.dropped_fraction(),
            unrouted_fraction=unrouted_fraction(chosen, count_zero_weights=False),
            # The entropy of no tokens is undefined, and there is no choice to make confident.
            aux_losses={"entropy": losses.entropy_loss(probs)} if num_tokens > 0 else {},
        )
        return chosen, metrics

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, output_dim={self.output_dim}, tau={self.tau}"
