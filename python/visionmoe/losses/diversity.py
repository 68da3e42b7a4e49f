"""Diversity loss of Diversified Dynamic Routing (Csaba et al., PAPERS.md section 3).

DivDR trains the routing to partition the data so that the experts "rely the least on common features", and
shows that without such an objective the routing collapses onto one subset of experts. The paper's exact
objective is not public beyond its abstract; this is the library's reading of "diversity between experts'
assignments", a pure function of routing assignments usable with any router:

    a_e = A[:, e], the column of expert e: how much of each token of the group expert e receives;
    loss = mean over ordered pairs e != f of cos(a_e, a_f) = <a_e, a_f> / (|a_e| |a_f|).

It is 0 exactly when the experts serve disjoint sets of tokens (a partition of the data) and 1 when every
expert serves every token in the same proportions, which is what collapse looks like in probabilities (if all
tokens route alike, every column is proportional to the same vector). Cosine similarity rather than a raw dot
product makes the loss indifferent to how much each expert is used, so it does not fight a balancing loss.
With any router: ``diversity_loss(layer.last_metrics.probs)`` for a layer whose router reports RouterMetrics
(MoEMLP, ConvMoE), weighted and added to the task loss like the other auxiliary losses.
Shape letters: G groups, T tokens per group, E experts.
"""

from __future__ import annotations

import torch

from .router import _router_tensor

__all__ = ["diversity_loss"]


def diversity_loss(assignments: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean pairwise cosine similarity between the experts' assignment columns (see the module docstring).

    Args:
        assignments: [G, T, E] or [T, E] non-negative routing assignments: router probabilities (to reach
            every expert's logit), dense combine weights, or one-hot choices.
        eps: floor of each column's norm, so an unused expert (an all-zero column) contributes 0.

    Returns:
        scalar in [0, 1] for non-negative input: each group's loss, averaged over groups; 0 when E = 1.
        Differentiable in ``assignments``.
    """
    columns = _router_tensor(assignments, "assignments").transpose(1, 2)  # [G, E, T]
    num_experts = columns.shape[1]
    if num_experts < 2:
        return columns.new_zeros(())
    unit = columns / columns.norm(dim=-1, keepdim=True).clamp_min(eps)
    similarity = unit @ unit.transpose(1, 2)  # [G, E, E]
    off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return (off_diagonal / (num_experts * (num_experts - 1))).mean()
