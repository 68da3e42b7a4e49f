"""The routing plan: who goes to which expert, with which weight, in which slot.

Shape letters (README, "Shape letters"): T tokens, D width, E experts, C capacity (rows per expert), M
assignments, (token, expert) pairs, of which those kept by the capacity fill the experts' rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Expert-major list of M assignments, the common output of token-choice and expert-choice routers.

    Assignments are grouped by expert and, within an expert, kept in priority order: ``slot[a]`` is the rank
    of assignment ``a`` within its expert. With a ``capacity`` C, assignment ``a`` is kept when
    ``slot[a] < C`` and dropped otherwise (its token keeps only its residual path); with ``capacity=None``
    (dropless) every assignment is kept.

    Attributes:
        sorted_token: [M] int64, the token of each assignment.
        sorted_expert: [M] int64, the expert of each assignment (non-decreasing).
        weight: [M] float, the combine weight of each assignment (differentiable).
        slot: [M] int64, rank of the assignment within its expert.
        offsets: [E + 1] int64, expert e's assignments are ``offsets[e]:offsets[e + 1]``.
        order: [M] int64, position of each assignment in the list the plan was made from.
        num_experts: the number of expert slots-groups the plan addresses. Routers that route G groups
            independently address E * G virtual experts, numbered ``e * G + g``, so that padded rows
            [E * G, C, D] view as [E, G * C, D] and each real expert's rows stay contiguous in both layouts.
        capacity: C (per virtual expert), or None for a dropless plan.
        num_groups: G, the number of independently routed groups (1 for explicit plans).
        token_offsets: [T + 1] int64 or None, token-major view: token t's assignments are
            ``token_rows[token_offsets[t]:token_offsets[t + 1]]`` (positions in this plan, increasing).
        token_rows: [M] int64 or None, see ``token_offsets``.

    Expert rows come in two layouts (see :func:`visionmoe.ops.dispatch`): ``"padded"`` [E, C, D], where
    assignment ``a`` is row ``(sorted_expert[a], slot[a])`` and empty slots are zero, and ``"packed"``
    [M, D], where assignment ``a`` is row ``a`` and dropped assignments' rows are zero. The packed layout
    with ``offsets`` is what grouped GEMMs consume.
    """

    sorted_token: torch.Tensor
    sorted_expert: torch.Tensor
    weight: torch.Tensor
    slot: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    num_experts: int
    capacity: Optional[int] = None
    num_groups: int = 1
    token_offsets: Optional[torch.Tensor] = None
    token_rows: Optional[torch.Tensor] = None

    @property
    def num_assignments(self) -> int:
        """M, the number of assignments (kept or dropped)."""
        return self.sorted_token.shape[0]

    @property
    def num_tokens(self) -> Optional[int]:
        """T when the plan carries its token-major view, else None."""
        return None if self.token_offsets is None else self.token_offsets.shape[0] - 1

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    def kept(self) -> torch.Tensor:
        """[M] bool, True for assignments that fit in their expert's capacity."""
        if self.capacity is None:
            return torch.ones_like(self.slot, dtype=torch.bool)
        return self.slot < self.capacity

    def expert_counts(self) -> torch.Tensor:
        """[E] int64, assignments routed to each expert before the capacity is applied, summed over groups."""
        return self._virtual_counts().view(-1, self.num_groups).sum(1)

    def expert_load(self) -> torch.Tensor:
        """[E] int64, assignments each expert actually processes (at most C per group), summed over groups."""
        counts = self._virtual_counts()
        load = counts if self.capacity is None else counts.clamp(max=self.capacity)
        return load.view(-1, self.num_groups).sum(1)

    def _virtual_counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def dropped_fraction(self) -> torch.Tensor:
        """Scalar float, the fraction of assignments dropped by the capacity (0 for a dropless plan)."""
        if self.num_assignments == 0:
            return self.weight.new_zeros(())
        return 1.0 - self.expert_load().sum().to(self.weight.dtype) / self.num_assignments


def _flatten_plan(plan: RoutingPlan):
    tensors = [getattr(plan, f) for f in _TENSOR_FIELDS]
    return tensors, (plan.num_experts, plan.capacity, plan.num_groups)


def _unflatten_plan(tensors, context) -> RoutingPlan:
    num_experts, capacity, num_groups = context
    return RoutingPlan(
        **dict(zip(_TENSOR_FIELDS, tensors)), num_experts=num_experts, capacity=capacity, num_groups=num_groups
    )


_TENSOR_FIELDS = ("sorted_token", "sorted_expert", "weight", "slot", "offsets", "order", "token_offsets", "token_rows")

# As a pytree node a plan can cross torch.compile, torch.export and torch.utils.checkpoint boundaries.
torch.utils._pytree.register_pytree_node(
    RoutingPlan, _flatten_plan, _unflatten_plan, serialized_type_name="visionmoe.RoutingPlan"
)
