"""Token-choice routers: softmax top-K (V-MoE) and its Sinkhorn-balanced variant.

Shape letters: G groups, T tokens per group, D width, E experts, K experts per token, C capacity.
"""

from __future__ import annotations

from typing import Optional

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
from .checks import check_flag, check_int, check_real


@register_router("topk")
class TokenChoiceRouter(Router):
    """Softmax token choice (V-MoE, Riquelme et al. 2021): each token picks its top-K experts.

    logits = x W (no bias); in training, Gaussian noise of std ``noise_std / E`` is added; p = softmax(noisy
    logits); each token picks the K experts with the highest p (ties to the lower index), with combine weight p
    (optionally renormalised over the K). Each expert keeps C = ceil(K * T * capacity_factor / E) assignments
    per group, rounded up to ``capacity_multiple`` (V-MoE uses 4), filled by position or, with
    ``batch_priority``, by Batch Priority Routing; ``capacity_factor=None`` routes dropless.

    Args:
        dim: D. num_experts: E. k: K (1 <= K <= E).
        capacity_factor: see above; must be in (0, E] (at E nothing is dropped), or None for dropless routing.
        capacity_multiple: round C up to a multiple of this.
        batch_priority: fill experts by each token's best probability, highest first (BPR).
        noise_std: training-time logit noise, std noise_std / E (V-MoE's default 1.0); 0 disables it.
        renormalize: divide each token's K combine weights by their sum.
        check_finite: reject NaN or infinite logits (an asynchronous check, no synchronisation).

    ``forward(x [G, T, D] or [T, D]) -> (RoutingPlan, RouterMetrics)``. Auxiliary losses: ``importance`` (of
    the probabilities without noise, as V-MoE), ``load`` (when noise is on, in training), ``switch`` (counting
    each token's first choice) and ``z_loss``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: Optional[float] = 1.0,
        capacity_multiple: int = 1,
        batch_priority: bool = False,
        noise_std: float = 1.0,
        renormalize: bool = False,
        check_finite: bool = True,
    ):
        super().__init__(dim, num_experts)
        self.k = check_int("k", k, 1, self.num_experts)
        self.capacity_factor, self.capacity_multiple = check_capacity_options(
            capacity_factor, capacity_multiple, allow_dropless=True, num_experts=num_experts
        )
        self.batch_priority = check_flag("batch_priority", batch_priority)
        self.noise_std = check_real("noise_std", noise_std, at_least=0)
        self.renormalize = check_flag("renormalize", renormalize)
        self.check_finite = check_flag("check_finite", check_finite)
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, tokens_per_group: int) -> Optional[int]:
        """C for groups of T tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return capacity_from_factor(
            self.k * tokens_per_group, self.num_experts, self.capacity_factor, self.capacity_multiple
        )

    def selection_scores(self, noisy_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """[G, T, E] scores the top-K is taken on; here the probabilities themselves."""
        return probs

    def forward(self, x: torch.Tensor):
        x = self.grouped_input(x, self.proj.weight.dtype)
        noise_std = self.noise_std / self.num_experts
        logits, noisy = gate_logits(
            self.proj,
            x,
            check_finite=self.check_finite,
            noise_std=noise_std,
            training=self.training,
            noise_shard=self.noise_shard,
        )  # [G, T, E]
        probs = noisy.softmax(dim=-1)
        scores = self.selection_scores(noisy, probs)
        plan = ops.topk_route(
            scores,
            self.k,
            self.capacity(x.shape[1]),
            batch_priority=self.batch_priority,
            weights=probs,
            renormalize=self.renormalize,
        )

        def aux_losses():
            aux = {
                # As V-MoE: the importance of the probabilities without noise (its value does not depend on the
                # noise drawn), the Switch loss of the noisy ones the experts were chosen on.
                "importance": losses.importance_loss(logits.softmax(dim=-1)),
                # Counted by each token's first choice on the scores the top-K was taken on, which are not the
                # probabilities under Sinkhorn selection or a hard constraint (ties to the lower index, as topk).
                "switch": losses.switch_load_balancing_loss(probs, scores.argmax(dim=-1)),
                "z_loss": losses.router_z_loss(logits),
            }
            if self.training and self.noise_std > 0:
                aux["load"] = losses.load_loss(logits, noisy, noise_std, self.k)
            return aux

        return plan, RouterMetrics.of_plan(plan, probs, noisy, aux_losses)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, capacity_factor={self.capacity_factor}, "
            f"batch_priority={self.batch_priority}, noise_std={self.noise_std}"
        )


@register_router("sinkhorn_topk")
class SinkhornTokenChoiceRouter(SinkhornSelection, TokenChoiceRouter):
    """Sinkhorn token choice: the top-K is taken on Sinkhorn-balanced scores (rows sum to 1, experts' columns to
    T / E, ``sinkhorn_iterations`` rounds in the log domain), while combine weights stay the softmax
    probabilities. Options as :class:`TokenChoiceRouter`, plus ``sinkhorn_iterations``."""
