"""What routing does, measured on routing decisions: which classes each expert serves and how often two routings
of the same tokens agree.

Shape letters (README, "Shape letters"): B images, E experts, T tokens.
"""

from __future__ import annotations

import torch


def expert_class_usage(
    assignments: torch.Tensor, labels: torch.Tensor, num_experts: int, num_classes: int
) -> torch.Tensor:
    """Which classes each expert serves: the expert-specialisation table of Pavlitska et al. (PAPERS.md
    section 2; the paper's class-wise expert weight allocation).

    Args:
        assignments: either [B] integer, the expert each image went to (e.g. the argmax of the gate weights),
            giving counts; or [B, E] floating-point per-image expert weights (e.g. ``ConvMoE.last_gate_weights``
            of image gating, or location gating's weights averaged over H' x W'), giving the summed weight each
            class sends to each expert.
        labels: [B] integer class of each image, in [0, num_classes).
        num_experts: E. num_classes: the number of classes.

    Returns:
        [E, num_classes] float: ``usage[e, c]`` = number (or summed weight) of class-c images routed to expert e.
        Normalise rows to read an expert's class mix, columns to read how a class spreads over experts.
    """
    if num_experts < 1 or num_classes < 1:
        raise ValueError(f"num_experts and num_classes must be >= 1, got {num_experts} and {num_classes}")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} "
            f"of shape {tuple(getattr(labels, 'shape', ()))}"
        )
    if not isinstance(assignments, torch.Tensor):
        raise ValueError(f"assignments must be a tensor, got {type(assignments).__name__}")
    if assignments.shape[0] != labels.shape[0]:
        raise ValueError(
            f"assignments and labels must describe the same B images, got {assignments.shape[0]} and {labels.shape[0]}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes) = [0, {num_classes})")
    if assignments.is_floating_point():
        if assignments.dim() != 2 or assignments.shape[1] != num_experts:
            raise ValueError(
                f"floating-point assignments must have shape [B, E] with E = {num_experts}, got "
                f"{tuple(assignments.shape)}"
            )
        weights = assignments
    else:
        if assignments.dim() != 1 or assignments.dtype == torch.bool:
            raise ValueError(
                f"integer assignments must have shape [B], got {tuple(assignments.shape)} ({assignments.dtype})"
            )
        if assignments.numel() and (assignments.min() < 0 or assignments.max() >= num_experts):
            raise ValueError(f"assignments must lie in [0, num_experts) = [0, {num_experts})")
        weights = torch.nn.functional.one_hot(assignments, num_experts).to(torch.float32)
    class_one_hot = torch.nn.functional.one_hot(labels.to(weights.device), num_classes).to(weights.dtype)
    return weights.transpose(0, 1) @ class_one_hot


def routing_consistency(assign_a: torch.Tensor, assign_b: torch.Tensor) -> float:
    """The fraction of tokens whose top-1 expert is the same in two routings (TGR-MoE's routing consistency,
    PAPERS.md section 4): e.g. the same probe tokens at two epochs, or before and after fine-tuning.

    Args:
        assign_a, assign_b: integer tensors of the same shape (e.g. [T]), the top-1 expert of each token.

    Returns:
        a float in [0, 1].
    """
    for name, value in (("assign_a", assign_a), ("assign_b", assign_b)):
        if (
            not isinstance(value, torch.Tensor)
            or value.is_floating_point()
            or value.is_complex()
            or value.dtype == torch.bool
        ):
            raise ValueError(
                f"{name} must be an integer tensor of expert indices, got "
                f"{getattr(value, 'dtype', type(value).__name__)}"
            )
    if assign_a.shape != assign_b.shape:
        raise ValueError(
            f"assign_a and assign_b must describe the same tokens, got shapes {tuple(assign_a.shape)} "
            f"and {tuple(assign_b.shape)}"
        )
    if assign_a.numel() == 0:
        raise ValueError("assign_a and assign_b are empty: there are no tokens to compare")
    return (assign_a == assign_b.to(assign_a.device)).float().mean().item()


def expert_class_information(usage: torch.Tensor) -> float:
    """How much knowing a token's expert tells about its image's class: the mutual information, in bits, between
    expert and class under the joint distribution ``usage / usage.sum()``.

    0 when every expert serves the classes in the same proportions (no specialisation); at most
    log2(min(E, L)), reached when each class goes to experts of its own. A scale-free summary of the
    :func:`expert_class_usage` table.

    Args:
        usage: [E, L] non-negative counts or weights, as returned by :func:`expert_class_usage`.
    """
    if not isinstance(usage, torch.Tensor) or usage.dim() != 2 or not usage.is_floating_point():
        raise ValueError(
            f"usage must be a floating-point [E, L] tensor, got {getattr(usage, 'dtype', type(usage))} "
            f"of shape {tuple(getattr(usage, 'shape', ()))}"
        )
    usage = usage.double()
    if not torch.isfinite(usage).all() or (usage < 0).any():
        raise ValueError("usage must be finite and non-negative")
    total = usage.sum()
    if total <= 0:
        raise ValueError("usage is all zero: no image was routed, so there is nothing to measure")
    joint = usage / total
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    # Cells of zero probability add nothing (0 log 0 = 0); where joint > 0 both marginals are > 0.
    present = joint > 0
    return float((joint[present] * torch.log2(joint[present] / outer[present])).sum().clamp_min(0.0))
