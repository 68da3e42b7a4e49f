"""Expert-choice routers: softmax expert choice (Zhou et al. 2022) and its Sinkhorn-balanced variant.

Shape letters: G groups, T tokens per group, D width, E experts, C capacity.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import losses, ops
from .base import (
    Router,
    RouterMetrics,
    SinkhornSelection,
    capacity_from_factor,
    check_capacity_options,
    gate_logits,
    register_router,
)
from .checks import check_flag, check_real


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Softmax expert choice: p = softmax over experts of x W; each expert takes the C tokens of its group with
    the highest p[:, e] (ties to the lower token), combine weight p[t, e].

    C = ceil(T * capacity_factor / E), rounded up to ``capacity_multiple``, with capacity_factor in (0, E]; an expert
    never takes more than T.
    A token may be chosen by several experts or by none (``metrics.unrouted_fraction``). Nothing is dropped,
    so there is no dropless mode. Auxiliary losses: ``z_loss`` and ``importance`` (the assignment itself is
    balanced by construction).

    ``forward(x [G, T, D] or [T, D]) -> (RoutingPlan, RouterMetrics)``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        capacity_multiple: int = 1,
        noise_std: float = 0.0,
        check_finite: bool = True,
    ):
        super().__init__(dim, num_experts)
        self.capacity_factor, self.capacity_multiple = check_capacity_options(
            capacity_factor, capacity_multiple, allow_dropless=False, num_experts=num_experts
        )
        self.noise_std = check_real("noise_std", noise_std, at_least=0)
        self.check_finite = check_flag("check_finite", check_finite)
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, tokens_per_group: int) -> int:
        return capacity_from_factor(tokens_per_group, self.num_experts, self.capacity_factor, self.capacity_multiple)

    def selection_scores(self, noisy_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def forward(self, x: torch.Tensor):
        x = self.grouped_input(x, self.proj.weight.dtype)
        logits, noisy = gate_logits(
            self.proj,
            x,
            check_finite=self.check_finite,
            noise_std=self.noise_std / self.num_experts,
            training=self.training,
            noise_shard=self.noise_shard,
        )
        probs = noisy.softmax(dim=-1)
        plan = ops.expert_choice_route(self.selection_scores(noisy, probs), self.capacity(x.shape[1]), weights=probs)
        return plan, RouterMetrics.of_plan(
            plan,
            probs,
            noisy,
            lambda: {
                # The importance of the probabilities without noise, as V-MoE's (it does not depend on the noise drawn).
                "importance": losses.importance_loss(logits.softmax(dim=-1)),
                "z_loss": losses.router_z_loss(logits),
            },
        )


@register_router("sinkhorn_expert_choice")
class SinkhornExpertChoiceRouter(SinkhornSelection, ExpertChoiceRouter):
    """Expert choice on Sinkhorn-balanced scores (``sinkhorn_iterations`` log-domain rounds); combine weights
    stay the softmax probabilities. Options as :class:`ExpertChoiceRouter`, plus ``sinkhorn_iterations``."""
