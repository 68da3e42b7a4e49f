"""Soft MoE router (Puigcerver et al. 2023): each slot is a softmax-weighted mix of all tokens of its group.

Shape letters: G groups (routed independently, e.g. images), T tokens per group, D width, E experts,
P slots per expert, S = E * P slots. Slot s belongs to expert s // P.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from .base import Router, RouterMetrics, as_groups, check_finite_logits, draw_noise, register_router
from .checks import check_int, check_real

# Added under the square root of l2 normalisation, as V-MoE's Soft MoE router does.
L2_EPSILON = 1e-6


def _l2_normalize(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v * torch.rsqrt(v.square().sum(dim=dim, keepdim=True) + L2_EPSILON)


@dataclasses.dataclass(frozen=True)
class SoftRoutingPlan:
    """Dense routing of G groups of T tokens into S = E * P slots, as Soft MoE's router produces it.

    Slots are expert-major: slot ``s = e * P + p`` is expert e's p-th slot. :meth:`dispatch` returns
    [G, E, P, D], so an MoE layer runs expert e on ``slots[:, e]`` ([G, P, D]; its tokens are the G * P rows of
    ``slots[:, e].reshape(-1, D)``) and hands :meth:`combine` the outputs in the same [G, E, P, D] layout.
    The softmaxes are computed inside the operators and never stored; :meth:`dispatch_weights` and
    :meth:`combine_weights` materialise them for inspection (e.g. a slot's map over an image's patches).

    Attributes:
        logits: [G, T, S] router logits (differentiable; with noise when the router added noise).
        num_experts: E.
        slots_per_expert: P.
    """

    logits: torch.Tensor
    num_experts: int
    slots_per_expert: int

    @property
    def num_groups(self) -> int:
        """G."""
        return self.logits.shape[0]

    @property
    def num_tokens(self) -> int:
        """T, tokens per group."""
        return self.logits.shape[1]

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """Slot inputs: [G, T, D] (or [T, D] when G = 1) -> [G, E, P, D].

        The logits are cast to x's dtype (a no-op for the router's own output, which has it already).
        """
        x = as_groups(x)
        slots = ops.soft_dispatch(x, self.logits.to(x.dtype))
        return slots.unflatten(1, (self.num_experts, self.slots_per_expert))

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        """Token outputs: the experts' outputs [G, E, P, D] -> [G, T, D].

        The logits are cast to expert_out's dtype, so experts may compute in another precision than x.
        """
        expected = (self.num_groups, self.num_experts, self.slots_per_expert)
        if expert_out.dim() != 4 or tuple(expert_out.shape[:3]) != expected:
            groups, experts, slots = expected
            raise ValueError(
                f"combine: expert_out must have shape [G, E, P, D] = [{groups}, {experts}, {slots}, D], "
                f"got {tuple(expert_out.shape)}"
            )
        return ops.soft_combine(expert_out.flatten(1, 2), self.logits.to(expert_out.dtype))

    def dispatch_weights(self) -> torch.Tensor:
        """[G, T, S] float32: softmax of the logits over the tokens; each slot's weights sum to 1."""
        return torch.softmax(self.logits, dim=1, dtype=torch.float32)

    def combine_weights(self) -> torch.Tensor:
        """[G, T, S] float32: softmax of the logits over the slots; each token's weights sum to 1."""
        return torch.softmax(self.logits, dim=2, dtype=torch.float32)


@register_router("soft")
class SoftRouter(Router):
    """Soft MoE router: ``logits = l2norm(x) @ (scale * l2norm(phi))``, both normalised over D.

    ``phi`` [D, S] holds one learned vector per slot, initialised from N(0, 1 / D); ``scale`` is a learned
    scalar starting at 1. With ``l2norm(v) = v / sqrt(sum v^2 + 1e-6)`` the logits are cosine similarities
    times ``scale``, as in V-MoE's Soft MoE router.

    Args:
        dim: D.
        num_experts: E.
        slots_per_expert: P. ``phi``'s size is fixed here, while T is only seen by ``forward``, so give either
            P or ``num_tokens``.
        capacity_factor: with ``num_tokens``, P = round(num_tokens * capacity_factor / E), the Soft MoE
            default (S about equal to T at capacity factor 1). Only used with ``num_tokens``.
        noise_std: in training mode, Gaussian noise of this std is added to the logits (0 disables it).
        num_tokens: the T that P is derived from. ``forward`` accepts any T: Soft MoE's cost depends on T only
            through the mixing, so the same router serves other resolutions.

    ``forward(x)`` takes [G, T, D] or [T, D] and returns ``(SoftRoutingPlan, RouterMetrics)`` with:
        probs: [G, T, E], each expert's share of a token's combine weights (the sum over its P slots);
        logits: [G, T, E], per expert the logsumexp of its P slots' logits, so that probs = softmax(logits);
        load: [E], each expert's dispatch mass, G * P: every slot's dispatch weights sum to 1 over its group;
        dropped_fraction and unrouted_fraction: 0, Soft MoE drops no token;
        aux_losses: empty, Soft MoE has no auxiliary loss.
    The metrics are detached: nothing trains through them, and the router keeps no [G, T, S] softmax alive.
    The plan's logits are the differentiable output.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots_per_expert: Optional[int] = None,
        capacity_factor: float = 1.0,
        noise_std: float = 0.0,
        *,
        num_tokens: Optional[int] = None,
    ):
        super().__init__(dim, num_experts)
        self.noise_std = check_real("noise_std", noise_std, at_least=0)
        self.slots_per_expert = self._slots_per_expert(
            check_int("slots_per_expert", slots_per_expert, 1, none_means="deriving it from num_tokens"),
            check_real("capacity_factor", capacity_factor, greater_than=0),
            check_int("num_tokens", num_tokens, 1, none_means="giving slots_per_expert"),
        )
        self.phi = nn.Parameter(torch.empty(self.dim, self.num_slots))
        self.scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def _slots_per_expert(self, slots_per_expert, capacity_factor, num_tokens) -> int:
        if slots_per_expert is not None:
            if num_tokens is not None:
                raise ValueError("give slots_per_expert or num_tokens (to derive it from), not both")
            if capacity_factor != 1.0:
                raise ValueError("capacity_factor only applies with num_tokens; with slots_per_expert it is unused")
            return slots_per_expert
        if num_tokens is None:
            raise ValueError(
                "SoftRouter needs slots_per_expert, or num_tokens to derive it as "
                "round(num_tokens * capacity_factor / num_experts): the slot parameters are created before any "
                "input is seen"
            )
        derived = round(num_tokens * capacity_factor / self.num_experts)
        if derived < 1:
            raise ValueError(
                f"round(num_tokens * capacity_factor / num_experts) = round({num_tokens} * {capacity_factor} / "
                f"{self.num_experts}) = 0 slots per expert; raise capacity_factor or give slots_per_expert"
            )
        return derived

    @property
    def num_slots(self) -> int:
        """S = E * P."""
        return self.num_experts * self.slots_per_expert

    def reset_parameters(self) -> None:
        nn.init.normal_(self.phi, std=self.dim**-0.5)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> Tuple[SoftRoutingPlan, RouterMetrics]:
        x = self.grouped_input(x)  # any floating-point dtype: the slot keys are cast to it
        slot_keys = (self.scale * _l2_normalize(self.phi, dim=0)).to(x.dtype)
        logits = _l2_normalize(x, dim=-1) @ slot_keys
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * draw_noise(logits, self.noise_shard)
        check_finite_logits(logits)
        plan = SoftRoutingPlan(logits, self.num_experts, self.slots_per_expert)
        with torch.no_grad():
            by_expert = (self.num_experts, self.slots_per_expert)
            metrics = RouterMetrics(
                probs=plan.combine_weights().unflatten(-1, by_expert).sum(-1),
                logits=logits.float().unflatten(-1, by_expert).logsumexp(-1),
                load=torch.full(
                    (self.num_experts,), x.shape[0] * self.slots_per_expert, dtype=torch.float32, device=x.device
                ),
                dropped_fraction=torch.zeros((), device=x.device),
                unrouted_fraction=torch.zeros((), device=x.device),
            )
        return plan, metrics

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
            f"noise_std={self.noise_std}"
        )
