"""What every router returns, and the registry routers are created from.

Shape letters: G groups routed independently (e.g. one per image, as V-MoE routes), T tokens per group,
D width, E experts, K experts per token, C capacity per expert and group, S slots (Soft MoE).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..groups import as_groups
from ..registry import Registry
from .checks import check_input_dtype, check_int, check_real


@dataclasses.dataclass
class RouterMetrics:
    """What a router measured while routing; nothing here is needed to dispatch.

    Attributes:
        probs: [G, T, E] routing probabilities (softmax of the logits, before any selection).
        logits: [G, T, E] router logits (with noise, when noise was added).
        load: [E] float, assignments (or, for soft routers, dispatch mass) each expert processes.
        dropped_fraction: scalar, the fraction of assignments dropped by the capacity.
        unrouted_fraction: scalar, the fraction of tokens that reach no expert (all their assignments dropped,
            or, under expert choice, chosen by no expert); they keep only their residual path.
        aux_losses: auxiliary losses by name (scalars); the training loop weights and adds them.
    """

    probs: torch.Tensor
    logits: torch.Tensor
    load: torch.Tensor
    dropped_fraction: torch.Tensor
    unrouted_fraction: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_plan(
        cls,
        plan,
        probs: torch.Tensor,
        logits: torch.Tensor,
        aux_losses: Optional[Callable[[], Dict[str, torch.Tensor]]] = None,
        unrouted: Optional[torch.Tensor] = None,
    ) -> "RouterMetrics":
        """The metrics of a sparse routing plan: per-expert load, dropped fraction and (unless ``unrouted`` is
        given) the fraction of tokens with no kept assignment. ``aux_losses`` computes the auxiliary losses; it
        is called only when there are tokens (on none the losses are undefined, and nothing needs balancing)."""
        has_tokens = probs.numel() > 0
        # A plan of no groups has no virtual experts, so it cannot tell how many real ones got nothing.
        load = plan.expert_load() if plan.num_groups > 0 else probs.new_zeros(probs.shape[-1])
        return cls(
            probs=probs,
            logits=logits,
            load=load.to(probs.dtype),
            dropped_fraction=plan.dropped_fraction(),
            unrouted_fraction=unrouted_fraction(plan) if unrouted is None else unrouted,
            aux_losses=aux_losses() if aux_losses is not None and has_tokens else {},
        )


class Router(nn.Module):
    """Base class: ``forward(x [G, T, D] or [T, D]) -> (plan, RouterMetrics)``.

    Sparse routers return a :class:`visionmoe.RoutingPlan` whose tokens are numbered ``g * T + t``;
    soft routers return their own plan type.
    """

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.num_experts = check_int("num_experts", num_experts, 1)
        # (this rank, ranks) under data or expert parallelism, set by visionmoe.distributed.parallelize: noise is
        # then drawn for the global batch and sliced (see draw_noise). None in one process.
        self.noise_shard: Optional[Tuple[int, int]] = None

    def forward(self, x: torch.Tensor) -> Tuple[object, RouterMetrics]:  # pragma: no cover - abstract
        raise NotImplementedError

    def grouped_input(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """x [T, D] or [G, T, D] as [G, T, D], checked to be a floating-point tensor of width D and, unless
        ``dtype`` is None, of that dtype (the router's weights' that x meets), so that a wrong input is named
        here rather than by a matrix product inside the router."""
        check_input_dtype("x", x, dtype)
        x = as_groups(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have width D = {self.dim}, got shape {tuple(x.shape)}")
        return x


def capacity_from_factor(
    assignments_per_group: int, num_experts: int, capacity_factor: float, multiple: int = 1
) -> int:
    """C = ceil(assignments_per_group * capacity_factor / E), rounded up to a multiple of ``multiple``.

    Token choice passes K * T assignments per group, expert choice T; V-MoE rounds to a multiple of 4.
    """
    capacity = math.ceil(assignments_per_group * capacity_factor / num_experts)
    return -(-capacity // multiple) * multiple


def check_capacity_options(
    capacity_factor, capacity_multiple: int, allow_dropless: bool, num_experts: int
) -> Tuple[Optional[float], int]:
    """The checked ``(capacity_factor, capacity_multiple)``; None for the factor means dropless routing.

    The factor is at most E: at E every expert has room for every token of its group (C >= T), so a larger one
    only adds empty slots, and a huge one (1e30 from a config) would ask for a buffer no machine holds."""
    capacity_factor = check_real(
        "capacity_factor",
        capacity_factor,
        greater_than=0,
        at_most=num_experts,
        none_means="dropless routing" if allow_dropless else None,
    )
    return capacity_factor, check_int("capacity_multiple", capacity_multiple, 1)


def unrouted_fraction(plan, count_zero_weights: bool = True) -> torch.Tensor:
    """The fraction of the plan's tokens with no kept assignment (0 for a plan of no tokens).

    With ``count_zero_weights=False`` an assignment of weight 0 does not count either: expert choice may fill a
    column with zero-weight tokens, which the expert computes but which receive nothing from it.
    """
    num_tokens = plan.token_offsets.shape[0] - 1
    if num_tokens == 0:
        return torch.zeros((), device=plan.slot.device)
    reaching = plan.kept() if count_zero_weights else plan.kept() & (plan.weight > 0)
    reached_per_token = torch.zeros(num_tokens, device=plan.slot.device).index_add(
        0, plan.sorted_token, reaching.to(torch.float32)
    )
    return (reached_per_token == 0).to(torch.float32).mean()


class SinkhornSelection:
    """Mixin for a router with a ``selection_scores`` step: select on Sinkhorn-balanced scores (rows sum to 1,
    experts' columns to T / E, ``sinkhorn_iterations`` log-domain rounds) instead of the probabilities."""

    def __init__(
        self, dim: int, num_experts: int, sinkhorn_iterations: int = ops.DEFAULT_SINKHORN_ITERATIONS, **options
    ):
        super().__init__(dim, num_experts, **options)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, 0)

    def selection_scores(self, noisy_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if noisy_logits.numel() == 0:
            return probs  # Sinkhorn balancing is undefined over no tokens, and there is nothing to select
        # The router checked its logits already (check_finite), so the operator's synchronising check is skipped.
        return ops.sinkhorn(noisy_logits, num_iterations=self.sinkhorn_iterations, validate=False)


_ROUTERS = Registry("router")


def register_router(name: str) -> Callable:
    """Class decorator adding a router to the registry under ``name``."""
    return _ROUTERS.register(name)


def create_router(name: str, dim: int, num_experts: int, **options) -> Router:
    """Creates the router registered as ``name`` (see :func:`list_routers`) for width ``dim``."""
    return _ROUTERS.create(name, dim, num_experts, **options)


def list_routers() -> list[str]:
    """Names accepted by :func:`create_router`, sorted."""
    return _ROUTERS.names()


NOISE_KINDS = ("normal", "exponential")


def draw_noise(like: torch.Tensor, shard: Optional[Tuple[int, int]] = None, kind: str = "normal") -> torch.Tensor:
    """Noise of ``like``'s shape, dtype and device: standard normal, or standard exponential for "exponential".

    ``shard`` = (rank, ranks) when each of ``ranks`` processes holds an equal, rank-ordered slice of the global batch
    along dim 0 (groups or tokens), as under :func:`visionmoe.distributed.parallelize`: the noise of the whole
    global batch [ranks * n, ...] is drawn and rows [rank * n, (rank + 1) * n) kept, so that this rank's rows get
    exactly the noise one process gives them on the global batch, whatever the world size, provided the ranks'
    generators agree (every rank seeded alike and drawing alike, which the global-shape draw itself keeps true).
    It costs ranks times the noise of the local batch: a [G, T, E] tensor, small beside the layer's activations."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    rows = like.shape[0]
    rank, ranks = shard if shard is not None else (0, 1)
    noise = like.new_empty((ranks * rows, *like.shape[1:]))
    noise = noise.normal_() if kind == "normal" else noise.exponential_()
    return noise[rank * rows : (rank + 1) * rows]


def gate_logits(
    proj: nn.Module,
    x: torch.Tensor,
    *,
    check_finite: bool,
    noise_std: float,
    training: bool,
    noise_shard: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``proj(x)`` [G, T, E], checked to be finite when asked, and the logits the router selects on:
    in training with ``noise_std`` > 0, the logits plus Gaussian noise of that std (drawn per global group under
    ``noise_shard``, see :func:`draw_noise`); otherwise the logits."""
    logits = proj(x)
    if check_finite:
        check_finite_logits(logits)
    if training and noise_std > 0:
        return logits, logits + draw_noise(logits, noise_shard) * noise_std
    return logits, logits


def check_finite_logits(logits: torch.Tensor) -> None:
    """Rejects NaN or infinite router logits with a clear error.

    An asynchronous assertion: no host synchronisation and no graph break under ``torch.compile``; on CUDA
    the failure surfaces as a device-side assertion.
    """
    torch._assert_async(
        torch.isfinite(logits).all(),
        "router logits contain NaN or infinite values (check the inputs and the learning rate)",
    )
