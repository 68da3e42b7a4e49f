"""Auxiliary router losses: pure functions of router logits, probabilities and assignments.

Every loss is computed on each group independently (a group is the set of tokens routed together, e.g. one
image in V-MoE) and the per-group values are averaged, so a [G, T, E] input gives the mean over its G groups
of the loss of each [T, E] slice; a [T, E] input is one group. Each function returns a scalar tensor.

16-bit inputs are computed in float32 (the result is float32): squares, logsumexp and variances of router
statistics lose most of their digits in bfloat16. float32 and float64 inputs are computed in their own dtype.

Shape letters: G groups, T tokens per group, E experts, K experts per token.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..groups import as_groups

__all__ = [
    "entropy_loss",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "router_z_loss",
    "switch_load_balancing_loss",
]


def _router_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """Checks a [T, E] or [G, T, E] floating-point router tensor and returns it as [G, T, E], at least float32."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    x = as_groups(x, name, last="E")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one group, token and expert, got shape {tuple(x.shape)}")
    return x.float() if x.element_size() < 4 else x


def _squared_coefficient_of_variation(values: torch.Tensor) -> torch.Tensor:
    """[G, E] -> [G]: var / mean^2 over experts, with the population variance (divisor E), as V-MoE's jnp.var.

    The square of the coefficient of variation, not std / mean, so the gradient stays defined when every expert
    gets the same value (std has an infinite derivative at zero).
    """
    return values.var(dim=-1, correction=0) / values.mean(dim=-1).square()


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Importance loss (Shazeer et al. 2017; V-MoE, Riquelme et al. 2021, appendix A.2).

    Imp[e] = sum_t probs[t, e]; loss = var_e(Imp) / mean_e(Imp)^2, the squared coefficient of variation of the
    importance, with the POPULATION variance (divide by E), as V-MoE's ``_importance_auxiliary_loss``
    (vmoe/nn/routing.py, ``jnp.var``) and tensor2tensor's ``cv_squared`` (utils/expert_utils.py, which divides
    by the size). PyTorch ports that call ``x.var()`` with its default (sample variance, divide by E - 1) give
    E / (E - 1) times this value.
    The loss is scale-invariant, so the mean over tokens (TGR's Imp) gives the same value as the sum.
    0 when every expert has the same importance; (E - 1) when one expert takes all the probability mass.

    Args:
        probs: [G, T, E] or [T, E] routing probabilities (softmax over E of the clean logits in V-MoE).

    Returns:
        scalar: the loss of each group, averaged over groups. Differentiable in ``probs``.
    """
    probs = _router_tensor(probs, "probs")
    return _squared_coefficient_of_variation(probs.sum(dim=1)).mean()


def load_loss(
    logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    noise_std: float,
    k: int,
    *,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Load loss: the squared coefficient of variation of Shazeer's smooth estimate of the expert load.

    For each token t, threshold[t] = the k-th largest of noisy_logits[t, :]. The probability that expert e would
    still be selected if the noise were sampled again is
        P[t, e] = 1 - Phi((threshold[t] - logits[t, e]) / noise_std) = Phi((logits[t, e] - threshold[t]) / noise_std)
    (Phi the standard normal CDF, ``logits`` WITHOUT noise; the second form avoids the cancellation of 1 - Phi
    near 1). load[e] = mean_t P[t, e]; loss = var_e(load) / mean_e(load)^2 with the population variance.

    Threshold, by ``exclude_self``:
        False (default): the k-th largest noisy logit for every expert, selected or not. This is V-MoE's
            ``_load_auxiliary_loss`` (google-research/vmoe, vmoe/nn/routing.py) and the formula of PAPERS.md.
        True: Shazeer et al. 2017's kth_excluding(H(x), k, e), the k-th largest noisy logit among the OTHER
            experts: for an expert in the token's top k (noisy logit above the (k+1)-th largest) that is the
            (k+1)-th largest, otherwise the k-th largest, as in tensor2tensor's ``_prob_in_top_k``. When k = E
            an expert in the top k has no competitor left: its threshold is -inf and P = 1.

    Gradients flow into ``logits`` and, through the threshold, into ``noisy_logits`` (pass
    ``logits + noise`` to reach the router through both, as V-MoE does).

    Args:
        logits: [G, T, E] or [T, E] router logits without noise.
        noisy_logits: logits plus the Gaussian noise that was used to select the experts; same shape.
        noise_std: the standard deviation of that noise, > 0 (V-MoE: noise_std / E). The loss needs noise.
        k: experts selected per token, 1 <= k <= E.
        exclude_self: see above.

    Returns:
        scalar: the loss of each group, averaged over groups.
    """
    grouped_logits = _router_tensor(logits, "logits")
    grouped_noisy_logits = _router_tensor(noisy_logits, "noisy_logits")
    if noisy_logits.shape != logits.shape:
        raise ValueError(
            f"noisy_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(noisy_logits.shape)}"
        )
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
        raise ValueError(f"noise_std must be a positive number, got {type(noise_std).__name__}")
    if not (noise_std > 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be positive and finite (the load loss needs noise), got {noise_std}")
    num_experts = grouped_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer in [1, E] = [1, {num_experts}], got {k!r}")

    if exclude_self:
        # A -inf column makes the (k+1)-th largest exist when k = E; no real logit ever falls below it.
        padded = torch.nn.functional.pad(grouped_noisy_logits, (0, 1), value=-math.inf)
        top = padded.topk(k + 1, dim=-1).values
        threshold_if_selected, threshold_if_not = top[..., k : k + 1], top[..., k - 1 : k]
        selected = grouped_noisy_logits > threshold_if_selected
        threshold = torch.where(selected, threshold_if_selected, threshold_if_not)
    else:
        threshold = grouped_noisy_logits.topk(k, dim=-1).values[..., k - 1 : k]
    prob_selected = torch.special.ndtr((grouped_logits - threshold) / noise_std)
    return _squared_coefficient_of_variation(prob_selected.mean(dim=1)).mean()


def switch_load_balancing_loss(probs: torch.Tensor, expert_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_e f[e] * P[e].

    f[e] is the fraction of the group's tokens whose first choice is expert e (a count: no gradient), P[e] the
    mean over tokens of probs[t, e]. The minimum, 1, is reached when f and P are both uniform (1 / E); a
    router sending every token to one expert with probability 1 scores E.

    Args:
        probs: [G, T, E] or [T, E] routing probabilities.
        expert_index: [G, T] or [T] integer first choice of each token, in [0, E); matching the rank of
            ``probs``. ``None``: the argmax of ``probs``. Use it when the choice was made on other scores
            (noisy logits, Sinkhorn scores).

    Returns:
        scalar: the loss of each group, averaged over groups. Differentiable in ``probs`` (through P only).
    """
    grouped_probs = _router_tensor(probs, "probs")
    num_experts = grouped_probs.shape[-1]
    if expert_index is None:
        expert_index = grouped_probs.argmax(dim=-1)
    else:
        if not isinstance(expert_index, torch.Tensor):
            raise ValueError(f"expert_index must be a tensor or None, got {type(expert_index).__name__}")
        if expert_index.is_floating_point() or expert_index.is_complex() or expert_index.dtype == torch.bool:
            raise ValueError(f"expert_index must be an integer tensor, got {expert_index.dtype}")
        if expert_index.shape != probs.shape[:-1]:
            raise ValueError(
                f"expert_index must have the shape of probs without its last axis, {tuple(probs.shape[:-1])}, "
                f"got {tuple(expert_index.shape)}"
            )
        expert_index = expert_index.reshape(grouped_probs.shape[:-1])
        torch._assert_async(
            ((expert_index >= 0) & (expert_index < num_experts)).all(),
            "expert_index out of range: expected values in [0, E)",
        )
    experts = torch.arange(num_experts, device=expert_index.device)
    fraction = (expert_index.unsqueeze(-1) == experts).to(grouped_probs.dtype).mean(dim=1)  # [G, E]
    return (num_experts * (fraction * grouped_probs.mean(dim=1)).sum(dim=-1)).mean()


def gshard_loss(probs: torch.Tensor) -> torch.Tensor:
    """GShard auxiliary loss (Lepikhin et al. 2020, Algorithm 1, scaled by E^2 as in their code and V-MoE's
    ``_gshard_auxiliary_loss``): E^2 * mean_e (fraction of tokens whose top-1 is e) * (mean_t probs[t, e]).

    E^2 * mean_e equals E * sum_e, so this is :func:`switch_load_balancing_loss` with the first choice taken as
    the argmax of ``probs`` (its minimum is 1 as well); it is kept under its own name because V-MoE's router
    reports it as such (computed on the noisy softmax).

    Args:
        probs: [G, T, E] or [T, E] routing probabilities.

    Returns:
        scalar: the loss of each group, averaged over groups. Differentiable in ``probs``.
    """
    return switch_load_balancing_loss(probs)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean_t (logsumexp_e logits[t, e])^2.

    Keeps router logits small, which keeps the softmax (and bf16 routers) well conditioned.

    Args:
        logits: [G, T, E] or [T, E] router logits.

    Returns:
        scalar: the loss of each group, averaged over groups. Differentiable in ``logits``.
    """
    logits = _router_tensor(logits, "logits")
    return torch.logsumexp(logits, dim=-1).square().mean(dim=1).mean()


_ENTROPY_KINDS = ("token", "batch")


def entropy_loss(probs: torch.Tensor, kind: str = "token") -> torch.Tensor:
    """Entropy of the routing distribution, in nats.

    kind:
        "token" (default): the mean over tokens of each token's entropy, mean_t -sum_e p[t, e] log p[t, e].
            This is the term of TGR-MoE's teacher-router loss (PAPERS.md section 4: L_teacher = 0.005 * CV(Imp)^2
            + 0.005 * "mean entropy of p_t"): minimising it makes each token's routing confident, while the
            importance term keeps the experts balanced.
        "batch": the entropy of the group's mean distribution, -sum_e pbar[e] log pbar[e] with
            pbar[e] = mean_t p[t, e]. It is largest (log E) when the experts are used evenly, so as a balancing
            loss it is MAXIMISED: give it a negative weight.

    The value is the entropy itself (between 0 and log E); the sign of its weight is the caller's choice.

    Args:
        probs: [G, T, E] or [T, E] routing probabilities (rows summing to 1).
        kind: "token" or "batch".

    Returns:
        scalar: the entropy of each group, averaged over groups. Differentiable in ``probs``.
    """
    if kind not in _ENTROPY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _ENTROPY_KINDS))}, got {kind!r}")
    probs = _router_tensor(probs, "probs")
    distribution = probs if kind == "token" else probs.mean(dim=1, keepdim=True)
    # A softmax underflows to exact zeros; clamping inside the log keeps 0 * log 0 = 0 with a finite gradient
    # (log of the smallest normal number) where log(0) = -inf would make it NaN. Values above tiny are unchanged.
    log_distribution = distribution.clamp_min(torch.finfo(distribution.dtype).tiny).log()
    return -(distribution * log_distribution).sum(dim=-1).mean(dim=1).mean()
