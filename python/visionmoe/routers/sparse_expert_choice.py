"""Sparsity-constrained routers (Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023):
expert choice, and its token-choice twin, on the plan of an optimal transport problem between tokens and experts
with at most C (or K) non-zeros per expert column (or token row).

The problem, per group (PAPERS.md section 1): similarity p = softmax(logits) [T, E], cost -p, marginals 1 per
token and T / E per expert, squared 2-norm regularisation of strength gamma, and the cardinality constraint. It
is solved in the semi-dual, a concave problem in one vector of potentials, by a fixed number of Adam steps; the
inner maximisation is a Euclidean projection onto the k-sparse simplex (:func:`sparse_simplex_projection`).
The routers compose existing operators (PAPERS.md section 1 allows it where a kernel does not pay off).

Shape letters: G groups, T tokens per group, D width, E experts, K experts per token, C capacity.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import losses, ops
from ..plan import RoutingPlan
from .base import (
    Router,
    RouterMetrics,
    as_groups,
    capacity_from_factor,
    check_capacity_options,
    gate_logits,
    register_router,
    unrouted_fraction,
)
from .checks import check_choice, check_flag, check_int, check_real

# The semi-dual's step size: PAPERS.md section 1 ("Adam, learning rate about 1e-2").
DEFAULT_LEARNING_RATE = 1e-2
# The number of steps and the regularisation strength are not given by the sources at hand; these are the
# library's choices, measured on expert choice over softmax probabilities of Gaussian logits (twelve cases: T, E
# in (16, 4), (64, 8), (196, 32); logit scales 1 and 3; capacity factors 1 and 2). After 100 steps of 1e-2, the
# mean token-row error |row sum - 1| averaged over the cases was 0.034 for gamma = 0.1 (0.004 to 0.057 in eleven
# cases, 0.16 in the twelfth), against 0.038, 0.050, 0.061 and 0.087 for 0.03, 0.3, 0.01 and 1. Smaller gammas
# give plans closer to unregularised OT but need finer steps; larger ones flatten the plan within each column's
# support and weaken its gradient (1 / gamma). Each potential moves by at most about lr per Adam step.
DEFAULT_ITERATIONS = 100
DEFAULT_GAMMA = 0.1
# Adam's moment decay rates and denominator offset (Kingma and Ba 2015, the defaults of optax and torch.optim).
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8

CONSTRAINED_SIDES = ("experts", "tokens")
COMBINE_MODES = ("plan", "softmax")


def sparse_simplex_projection(values: torch.Tensor, max_nonzeros: int, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of each slice of ``values`` along ``dim`` onto the k-sparse simplex
    ``{y : y >= 0, sum(y) = 1, at most k non-zeros}``.

    Keeping the k largest entries and projecting them onto the simplex is the exact projection (Kyrillidis,
    Becker, Cevher, Koch, "Sparse projections onto the simplex", ICML 2013). The simplex projection is the
    sort-based threshold (Held, Wolfe, Crowder 1974; Duchi et al. 2008): with u the kept entries in decreasing
    order, rho = the largest j with j * u_j > sum_{i <= j} u_i - 1, and theta = (sum_{i <= rho} u_i - 1) / rho,
    the output is u_i - theta for the rho largest entries and 0 everywhere else.

    Args:
        values: floating-point tensor of any shape; each slice along ``dim`` is projected.
        max_nonzeros: k >= 1; a k larger than the slice length gives the plain simplex projection.
        dim: the axis of the slices.

    Returns:
        A tensor of the shape and dtype of ``values`` whose slices lie on the simplex, each with at most k
        non-zeros. Ties between equal values at the k-th place are broken as ``torch.topk`` breaks them.
        Differentiable almost everywhere: given the support S, y_S = v_S - mean(v_S) + 1 / |S|, so gradients
        reach the entries of the support only.
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        kind = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"sparse_simplex_projection: values must be a floating-point tensor, got {kind}")
    if max_nonzeros < 1:
        raise ValueError(f"sparse_simplex_projection: max_nonzeros must be >= 1, got {max_nonzeros}")
    size = values.shape[dim]
    if size == 0:
        return torch.zeros_like(values)
    k = min(max_nonzeros, size)
    top, index = values.topk(k, dim=dim)  # decreasing
    excess = top.cumsum(dim) - 1.0
    rank_shape = [1] * values.dim()
    rank_shape[dim] = k
    rank = torch.arange(1, k + 1, device=values.device, dtype=values.dtype).view(rank_shape)
    # The test holds on a prefix of the sorted entries; the first entry always passes it (1 > 0).
    in_support = top * rank > excess
    support_size = in_support.sum(dim, keepdim=True)
    threshold = excess.gather(dim, support_size - 1) / support_size.to(values.dtype)
    projected = torch.where(in_support, top - threshold, torch.zeros_like(top))
    return torch.zeros_like(values).scatter(dim, index, projected)


def sparsity_constrained_transport(
    similarity: torch.Tensor,
    max_nonzeros: int,
    *,
    constrain: str = "experts",
    gamma: float = DEFAULT_GAMMA,
    iterations: int = DEFAULT_ITERATIONS,
    lr: float = DEFAULT_LEARNING_RATE,
) -> torch.Tensor:
    """The transport plan of sparsity-constrained OT between the tokens and experts of each group.

    Problem per group: min over P >= 0 of <-similarity, P> + gamma / 2 ||P||^2 with row sums 1 (tokens), column
    sums T / E (experts) and at most k non-zeros per expert column (``constrain="experts"``) or per token row
    (``constrain="tokens"``, the token-choice twin). Solved in the semi-dual (Liu et al. 2023, after Blondel et
    al. 2018) in the potentials of the unconstrained side: for expert columns, with potentials alpha [G, T],

        column e of P = b_e * proj_k((alpha + similarity[:, e]) / (gamma * b_e)),   b_e = T / E,

    (proj_k the k-sparse simplex projection, so every column sums exactly to b_e with at most k non-zeros) and
    the semi-dual's gradient in alpha is 1 - (row sums of P) (Danskin's theorem). ``iterations`` Adam steps of
    size ``lr`` ascend it from alpha = 0, under ``torch.no_grad``; the plan is then recomputed from the detached
    potentials with autograd on, so gradients reach ``similarity`` through the projection on its support (the
    potentials are treated as constants). The constrained side's marginals hold exactly; the other side's hold
    to the solver's accuracy. When the cardinality constraint binds, the primal problem is not convex and its
    optimum may sit where columns' k-th places tie; the plan recovered there can miss a token row's marginal by
    up to one entry (with capacity factor 1, each row of a feasible plan is a single 1, so a few tokens may get
    no mass). With k * E < T (expert columns) no plan covers every token, and uncovered rows stay 0.

    Args:
        similarity: [G, T, E] or [T, E], e.g. router probabilities; computed in at least float32.
        max_nonzeros: k >= 1 (clamped to the length of the constrained slices).
        constrain: ``"experts"`` (at most k tokens per expert) or ``"tokens"`` (at most k experts per token).
        gamma: regularisation strength, > 0.
        iterations: Adam steps, >= 1 (unrolled under ``torch.compile``).
        lr: Adam's step size, > 0.

    Returns:
        P [G, T, E] (or [T, E] for a [T, E] input), in ``similarity``'s dtype promoted to at least float32.
    """
    check_choice("constrain", constrain, CONSTRAINED_SIDES)
    gamma, iterations, lr = check_solver_options(gamma, iterations, lr)
    if not isinstance(similarity, torch.Tensor) or not similarity.is_floating_point():
        kind = similarity.dtype if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"similarity must be a floating-point tensor, got {kind}")
    ungrouped = similarity.dim() == 2
    similarity = as_groups(similarity, "similarity")
    similarity = similarity.to(torch.promote_types(similarity.dtype, torch.float32))
    num_tokens, num_experts = similarity.shape[1:]
    if similarity.numel() == 0:
        # No token to transport (k may then be 0, e.g. a capacity derived from T = 0): the plan is empty.
        return torch.zeros_like(similarity).squeeze(0) if ungrouped else torch.zeros_like(similarity)
    # Canonical form [G, N, M]: each of the M slices along N holds at most k non-zeros and sums to slice_mass;
    # the potentials live on the N side, whose marginal is potential_mass.
    if constrain == "experts":
        canonical, slice_mass, potential_mass = similarity, num_tokens / num_experts, 1.0
    else:
        canonical, slice_mass, potential_mass = similarity.transpose(1, 2), 1.0, num_tokens / num_experts

    def plan_from(potentials):
        scaled = (potentials.unsqueeze(-1) + canonical) / (gamma * slice_mass)
        return slice_mass * sparse_simplex_projection(scaled, max_nonzeros, dim=1)

    with torch.no_grad():
        potentials = canonical.new_zeros(canonical.shape[:2])
        first_moment = torch.zeros_like(potentials)
        second_moment = torch.zeros_like(potentials)
        for step in range(1, iterations + 1):
            ascent = potential_mass - plan_from(potentials).sum(dim=2)
            first_moment.mul_(_ADAM_BETA1).add_(ascent, alpha=1 - _ADAM_BETA1)
            second_moment.mul_(_ADAM_BETA2).addcmul_(ascent, ascent, value=1 - _ADAM_BETA2)
            corrected_second = second_moment / (1 - _ADAM_BETA2**step)
            potentials.addcdiv_(
                first_moment, corrected_second.sqrt_().add_(_ADAM_EPS), value=lr / (1 - _ADAM_BETA1**step)
            )
    plan = plan_from(potentials)
    if constrain == "tokens":
        plan = plan.transpose(1, 2)
    return plan.squeeze(0) if ungrouped else plan


def check_solver_options(gamma: float, iterations: int, lr: float) -> Tuple[float, int, float]:
    """The checked ``(gamma, iterations, lr)`` of the semi-dual solver."""
    return (
        check_real("gamma", gamma, greater_than=0),
        check_int("iterations", iterations, 1),
        check_real("lr", lr, greater_than=0),
    )


class _SparsityConstrainedRouter(Router):
    """What the sparsity-constrained routers share: logits = x W (no bias, no noise), p = softmax(logits), the
    transport plan P of :func:`sparsity_constrained_transport` on p, routing on P (ties to the lower index), and
    combine weights P (``combine="plan"``) or p on P's support (``combine="softmax"``)."""

    constrain: str

    def __init__(
        self, dim: int, num_experts: int, gamma: float, iterations: int, lr: float, combine: str, check_finite: bool
    ):
        super().__init__(dim, num_experts)
        self.gamma, self.iterations, self.lr = check_solver_options(gamma, iterations, lr)
        self.combine = check_choice("combine", combine, COMBINE_MODES)
        self.check_finite = check_flag("check_finite", check_finite)
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def max_nonzeros(self, tokens_per_group: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def route(self, transport: torch.Tensor, weights: torch.Tensor) -> RoutingPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        x = self.grouped_input(x, self.proj.weight.dtype)
        logits, _ = gate_logits(self.proj, x, check_finite=self.check_finite, noise_std=0.0, training=self.training)
        probs = logits.softmax(dim=-1)
        transport = sparsity_constrained_transport(
            probs,
            self.max_nonzeros(x.shape[1]),
            constrain=self.constrain,
            gamma=self.gamma,
            iterations=self.iterations,
            lr=self.lr,
        )
        if self.combine == "plan":
            weights = transport
        else:
            weights = torch.where(transport > 0, probs.to(transport.dtype), torch.zeros_like(transport))
        plan = self.route(transport.detach(), weights)
        # Expert choice fills a column with fewer than C non-zeros with zero-weight tokens, which receive nothing.
        unrouted = unrouted_fraction(plan, count_zero_weights=False)
        return plan, RouterMetrics.of_plan(
            plan,
            probs,
            logits,
            lambda: {"importance": losses.importance_loss(probs), "z_loss": losses.router_z_loss(logits)},
            unrouted=unrouted,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, gamma={self.gamma}, iterations={self.iterations}, "
            f"lr={self.lr}, combine={self.combine!r}"
        )


@register_router("sparse_expert_choice")
class SparseExpertChoiceRouter(_SparsityConstrainedRouter):
    """Sparsity-constrained expert choice: expert choice on the plan P of sparsity-constrained OT between the
    tokens and experts of each group, with at most C tokens per expert (PAPERS.md section 1; Liu, Puigcerver,
    Blondel, ICLR 2023).

    p = softmax(x W); P = :func:`sparsity_constrained_transport` (p, C, constrain="experts"); each expert takes
    the C tokens of its column of P, i.e. its support, with combine weight P[t, e] (``combine="plan"``, the
    default) or p[t, e] (``combine="softmax"``). C = ceil(T * capacity_factor / E), rounded up to
    ``capacity_multiple``, as for expert choice. When a column of P has fewer than C non-zeros the expert's
    remaining slots take tokens outside the support (the lowest-numbered ones) with weight 0 in both modes:
    the expert computes them, but they receive nothing (``metrics.unrouted_fraction`` counts tokens that
    receive nothing from any expert). Gradients reach the router through P on its support and, with
    ``combine="softmax"``, through p.

    Args:
        dim: D. num_experts: E.
        capacity_factor: in (0, E] (no dropless mode: nothing is dropped).
        capacity_multiple: round C up to a multiple of this.
        gamma: squared 2-norm regularisation strength (default 0.1, see ``DEFAULT_GAMMA``).
        iterations: Adam steps on the semi-dual (default 100, see ``DEFAULT_ITERATIONS``).
        lr: Adam's step size (default 1e-2, PAPERS.md section 1).
        combine: ``"plan"`` or ``"softmax"``.
        check_finite: reject NaN or infinite logits (an asynchronous check, no synchronisation).

    No logit noise: the transport balances the experts. Auxiliary losses: ``importance`` and ``z_loss``.
    ``forward(x [G, T, D] or [T, D]) -> (RoutingPlan, RouterMetrics)``.
    """

    constrain = "experts"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        capacity_multiple: int = 1,
        gamma: float = DEFAULT_GAMMA,
        iterations: int = DEFAULT_ITERATIONS,
        lr: float = DEFAULT_LEARNING_RATE,
        combine: str = "plan",
        check_finite: bool = True,
    ):
        super().__init__(dim, num_experts, gamma, iterations, lr, combine, check_finite)
        self.capacity_factor, self.capacity_multiple = check_capacity_options(
            capacity_factor, capacity_multiple, allow_dropless=False, num_experts=self.num_experts
        )

    def capacity(self, tokens_per_group: int) -> int:
        return capacity_from_factor(tokens_per_group, self.num_experts, self.capacity_factor, self.capacity_multiple)

    def max_nonzeros(self, tokens_per_group: int) -> int:
        return self.capacity(tokens_per_group)

    def route(self, transport: torch.Tensor, weights: torch.Tensor) -> RoutingPlan:
        return ops.expert_choice_route(transport, self.capacity(transport.shape[1]), weights=weights)


@register_router("sparse_topk")
class SparseTokenChoiceRouter(_SparsityConstrainedRouter):
    """The token-choice twin: top-K token choice on the plan P of sparsity-constrained OT with at most K experts
    per token (``constrain="tokens"``), so the transport, not an auxiliary loss, balances the experts.

    Each token takes the K experts of its row of P (its support, then the lowest-numbered experts with weight 0
    when the row has fewer than K non-zeros), with combine weight p on the support (``combine="softmax"``, the
    default here) or P (``combine="plan"``). Softmax is the default because with K = 1 every row of P is a
    single 1 (the 1-sparse simplex has only its vertices), so plan weights would give the router no gradient.
    Capacity, fill order and dropless mode as :class:`visionmoe.routers.TokenChoiceRouter`:
    C = ceil(K * T * capacity_factor / E) rounded up to ``capacity_multiple``, ``batch_priority`` fills by each
    token's best transport mass, ``capacity_factor=None`` keeps every assignment. Solver options as
    :class:`SparseExpertChoiceRouter`. Auxiliary losses: ``importance`` and ``z_loss``.
    """

    constrain = "tokens"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: Optional[float] = 1.0,
        capacity_multiple: int = 1,
        batch_priority: bool = False,
        gamma: float = DEFAULT_GAMMA,
        iterations: int = DEFAULT_ITERATIONS,
        lr: float = DEFAULT_LEARNING_RATE,
        combine: str = "softmax",
        check_finite: bool = True,
    ):
        super().__init__(dim, num_experts, gamma, iterations, lr, combine, check_finite)
        self.k = check_int("k", k, 1, self.num_experts)
        self.capacity_factor, self.capacity_multiple = check_capacity_options(
            capacity_factor, capacity_multiple, allow_dropless=True, num_experts=self.num_experts
        )
        self.batch_priority = check_flag("batch_priority", batch_priority)

    def capacity(self, tokens_per_group: int) -> Optional[int]:
        if self.capacity_factor is None:
            return None
        return capacity_from_factor(
            self.k * tokens_per_group, self.num_experts, self.capacity_factor, self.capacity_multiple
        )

    def max_nonzeros(self, tokens_per_group: int) -> int:
        return self.k

    def route(self, transport: torch.Tensor, weights: torch.Tensor) -> RoutingPlan:
        return ops.topk_route(
            transport, self.k, self.capacity(transport.shape[1]), batch_priority=self.batch_priority, weights=weights
        )
