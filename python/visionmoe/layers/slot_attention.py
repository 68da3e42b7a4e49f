"""Slot Attention (Locatello et al. 2020, "Object-Centric Learning with Slot Attention"): S slots, sampled per image
from a learned Gaussian, compete for the input tokens by a softmax over the slots, and are updated by a GRU and an
MLP over a few iterations. The object-discovery baseline of the What-Where Transformer's experiment.

Shape letters: B images, N tokens, S slots, D width.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..routers.checks import check_int
from .mlp import Mlp

# Slot attention's epsilon: added to the attention before the weighted mean over the tokens.
SLOT_ATTENTION_EPS = 1e-8
LAYER_NORM_EPS = 1e-6


class SlotAttention(nn.Module):
    """Slot Attention over tokens [B, N, D]: slots start as ``mu + sigma * noise`` (one learned mean and scale shared
    by all slots, so slots are exchangeable and none is tied to a position), then for ``iterations`` rounds

        A = softmax_over_S(k(LN(x)) q(LN(z))^T / sqrt(D))          [B, N, S]   the assignment
        U = (A / sum_N A)^T v(LN(x))                                [B, S, D]   each slot's weighted mean
        z = GRU(U, z);  z = z + MLP(LN(z))

    Args:
        dim: D. num_slots: S. iterations: rounds (3 as the paper). hidden_dim: the MLP's hidden width.

    ``forward(x) -> (slots [B, S, D], the last round's assignment logits [B, N, S])``; their softmax over S is the
    assignment the slots' last update used.
    """

    def __init__(self, dim: int, num_slots: int, iterations: int = 3, hidden_dim: int = 128):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.num_slots = check_int("num_slots", num_slots, 1)
        self.iterations = check_int("iterations", iterations, 1)
        check_int("hidden_dim", hidden_dim, 1)
        self.norm_inputs = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_slots = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_mlp = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = Mlp(dim, hidden_dim)
        self.slots_mu = nn.Parameter(torch.empty(1, 1, dim))
        self.slots_log_sigma = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.slots_mu)
        nn.init.xavier_uniform_(self.slots_log_sigma)

    def initial_slots(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """[batch, S, D] slots drawn from the learned Gaussian (torch's global generator)."""
        noise = torch.randn(batch, self.num_slots, self.dim, dtype=like.dtype, device=like.device)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, {self.dim}], got {tuple(x.shape)}")
        B, _, D = x.shape
        x = self.norm_inputs(x)
        keys, values = self.key(x), self.value(x)  # [B, N, D]
        slots = self.initial_slots(B, x)
        for _ in range(self.iterations):
            logits = keys @ self.query(self.norm_slots(slots)).transpose(1, 2) * D**-0.5  # [B, N, S]
            attention = logits.softmax(dim=-1) + SLOT_ATTENTION_EPS
            updates = (attention / attention.sum(dim=1, keepdim=True)).transpose(1, 2) @ values  # [B, S, D]
            slots = self.gru(updates.reshape(-1, D), slots.reshape(-1, D)).view(B, self.num_slots, D)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, logits
