"""Sparse MoE layers for CNNs (Pavlitska et al., "Sparsely-gated Mixture-of-Expert Layers for CNN
Interpretability", PAPERS.md section 2): a residual block whose body is E expert bodies mixed by a gate.

Shape letters: B images, Ci / Co input / output channels, H x W input and H' x W' output resolution, E experts,
K experts per image (or location), C capacity (image slots per expert).

Design, and where it comes from:
- What an expert is. The authors' code (github.com/BikLihi/cnn-moe-interpretability, ``ResidualMoeBlockLayer``)
  makes each expert a residual body and adds ONE shared shortcut to the gated mixture. Here the MoE layer
  replaces one ResNet block: ``relu(shortcut(x) + sum_e w_e * body_e(x))``, with each expert a basic
  (3x3-BN-ReLU-3x3-BN) or bottleneck (1x1-BN-ReLU-3x3-BN-ReLU-1x1-BN) body, so it is a drop-in replacement for
  the block it replaces (same input and output shapes, same stride).
- The gate reads globally average-pooled features (the paper's "GAP-FC" gate) for ``gating="image"``, or each
  output location's input pixel (a strided 1x1 convolution) for ``gating="location"``. Both are the library's
  softmax top-K token-choice router (:class:`visionmoe.routers.TokenChoiceRouter`, training-time logit noise),
  with images or locations as tokens (the authors add Shazeer's learned softplus noise to the gate logits;
  here it is the router's fixed-std noise, ``noise_std / E``). The router's auxiliary losses (importance, load,
  Switch, z-loss) are the soft constraint and land in ``last_metrics`` for :func:`visionmoe.layers.aux_losses`.
  As the authors' gate takes a softmax over the K chosen logits, the combine weights are renormalised over the
  K by default.
- The hard constraint is the authors' importance constraint (``RelativeImportanceGate`` /
  ``AbsoluteImportanceGate`` in their code): during training, a running statistic of each expert's importance
  (the share of the combine weight it received) is kept, and an expert that got more than its share by more
  than ``constraint_threshold`` is masked out of the selection, so its gate weight is exactly zero until its
  statistic drops back. See :class:`ConstrainedTokenChoiceRouter`.
- Image gating computes only the chosen experts: images are dispatched by the routing operators into
  capacity-padded expert batches [E, C, Ci*H*W] (C = ceil(K * B * capacity_factor / E)), so each expert body
  runs on C images rather than B, with fixed shapes (``torch.compile`` captures it without graph breaks).
  Images beyond an expert's capacity keep only the shortcut path, as tokens do in V-MoE. The padding slots are
  excluded from the experts' batch-norm statistics (:class:`SlotBatchNorm2d`), so each expert normalises over
  exactly the images routed to it, as the authors' gather-based code does.
- Location gating computes every expert on every image: a convolution at a chosen location needs its
  neighbourhood, so the bodies run densely and are mixed per pixel by the [B, E, H', W'] gate weights.
- The experts run in a Python loop over experts (E convolution bodies), never over images.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..routers import RouterMetrics, TokenChoiceRouter
from ..routers.checks import check_choice, check_input_dtype, check_int, check_real

GATINGS = ("image", "location")
EXPERT_BODIES = ("basic", "bottleneck")
HARD_CONSTRAINTS = ("relative_importance", "absolute_importance")
DEFAULT_IMAGE_CAPACITY_FACTOR = 1.25


class SlotBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over a capacity-padded batch: in training, the statistics (and the running averages) come
    from the valid slots only. ``forward(x [N, Ch, H, W], valid [N] bool or None) -> [N, Ch, H, W]``; with
    ``valid=None`` (or in eval mode) it is exactly :class:`torch.nn.BatchNorm2d`.

    A batch with no valid slot leaves the running averages unchanged. The running averages use an exponential
    ``momentum`` (a number; the cumulative average of ``momentum=None`` is not supported).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(
            check_int("num_features", num_features, 1),
            eps=check_real("eps", eps, greater_than=0),
            momentum=check_real("momentum", momentum, at_least=0, at_most=1),
        )

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if valid is None or not self.training:
            return super().forward(x)
        # In the dtype of the running statistics, as nn.BatchNorm2d computes under autocast, where x may be
        # bfloat16: its 8-bit mantissa cannot even hold the count of a large batch's pixels.
        x = x.to(self.running_mean.dtype)
        slot_weight = valid.to(x.dtype).view(-1, 1, 1, 1)
        count = slot_weight.sum() * (x.shape[2] * x.shape[3])
        mean = (x * slot_weight).sum(dim=(0, 2, 3)) / count.clamp_min(1)
        centered = x - mean.view(1, -1, 1, 1)
        var = (centered.square() * slot_weight).sum(dim=(0, 2, 3)) / count.clamp_min(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        with torch.no_grad():
            # Branch-free, so a compiled graph needs no data-dependent guard on the number of valid slots.
            seen = count > 0
            unbiased_var = var * count / (count - 1).clamp_min(1)
            self.running_mean.copy_(
                torch.where(seen, torch.lerp(self.running_mean, mean, self.momentum), self.running_mean)
            )
            self.running_var.copy_(
                torch.where(seen, torch.lerp(self.running_var, unbiased_var, self.momentum), self.running_var)
            )
            self.num_batches_tracked.add_(1)
        return centered * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ResidualBody(nn.Module):
    """The body of a ResNet block without its shortcut: "basic" (3x3 conv-BN-ReLU-3x3 conv-BN) or "bottleneck"
    (1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1-BN, torchvision's ResNet v1.5 placement of the stride).

    ``forward(x [N, Ci, H, W], valid [N] bool or None) -> [N, Co, H', W']``; ``valid`` marks the real images
    of a capacity-padded batch for the batch norms.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, stride: int = 1, kind: str = "basic"):
        super().__init__()
        check_choice("expert", kind, EXPERT_BODIES)
        in_channels, out_channels, width, stride = (
            check_int(name, value, 1)
            for name, value in (
                ("in_channels", in_channels),
                ("out_channels", out_channels),
                ("expert_width", width),
                ("stride", stride),
            )
        )
        if kind == "basic":
            shapes = [(in_channels, width, 3, stride), (width, out_channels, 3, 1)]
        else:
            shapes = [(in_channels, width, 1, 1), (width, width, 3, stride), (width, out_channels, 1, 1)]
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, size, stride=s, padding=size // 2, bias=False) for cin, cout, size, s in shapes
        )
        self.norms = nn.ModuleList(SlotBatchNorm2d(cout) for _, cout, _, _ in shapes)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        last = len(self.convs) - 1
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x), valid)
            if index < last:
                x = F.relu(x)
        return x


def residual_shortcut(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """A ResNet block's shortcut: the identity, or a strided 1x1 convolution and batch norm where the shape
    changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ConstrainedTokenChoiceRouter(TokenChoiceRouter):
    """Softmax top-K token choice with the hard importance constraint of Pavlitska et al. (the authors' code:
    ``RelativeImportanceGate`` and ``AbsoluteImportanceGate``).

    After every training step, with share[e] = (kept combine weight of expert e) / T (the experts' shares sum to
    1 when the weights are renormalised over the K):
        "relative_importance": statistic[e] += E * share[e] - 1, the accumulated relative excess of the
            importance over its mean, (Imp[e] - T / E) / (T / E);
        "absolute_importance": statistic[e] = the running mean over steps of share[e] - 1 / E.
    In training, an expert whose statistic exceeds ``threshold`` is excluded from the selection (ranked below
    every other expert), so no token selects it and its gate weight is exactly zero. An excluded expert gets
    share 0, so its statistic falls until it is admitted again. At most E - K experts are excluded at once
    (those with the largest statistic), so every token still finds K experts. In eval mode nothing is excluded,
    as in the authors' code. ``constraint=None`` is the plain router.

    The statistics are buffers (``importance_statistic`` [E], ``constraint_steps``), saved with the model.
    """

    def __init__(self, dim: int, num_experts: int, constraint: Optional[str] = None, threshold: float = 0.1, **options):
        super().__init__(dim, num_experts, **options)
        self.constraint = check_choice("constraint", constraint, HARD_CONSTRAINTS, allow_none=True)
        self.threshold = check_real("constraint_threshold", threshold, at_least=0)
        self.register_buffer("importance_statistic", torch.zeros(num_experts))
        self.register_buffer("constraint_steps", torch.zeros((), dtype=torch.long))

    def excluded_experts(self) -> torch.Tensor:
        """[E] bool, the experts the hard constraint currently removes from the selection."""
        over = self.importance_statistic > self.threshold
        rank = torch.empty(self.num_experts, dtype=torch.long, device=over.device)
        rank.scatter_(
            0,
            self.importance_statistic.argsort(descending=True, stable=True),
            torch.arange(self.num_experts, device=rank.device),
        )
        return over & (rank < self.num_experts - self.k)

    def selection_scores(self, noisy_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.constraint is None or not self.training:
            return probs
        # Probabilities are >= 0, so -1 ranks an excluded expert below every admitted one.
        return probs.masked_fill(self.excluded_experts(), -1.0)

    def forward(self, x: torch.Tensor):
        plan, metrics = super().forward(x)
        # An empty batch gives no expert any share; counted as a step, it would move every statistic.
        if self.constraint is not None and self.training and plan.num_tokens > 0:
            self._update_statistic(plan)
        return plan, metrics

    @torch.no_grad()
    def _update_statistic(self, plan) -> None:
        kept_weight = (plan.weight * plan.kept()).to(self.importance_statistic.dtype)
        expert = plan.sorted_expert // plan.num_groups
        share = torch.zeros_like(self.importance_statistic).index_add(0, expert, kept_weight) / plan.num_tokens
        if self.constraint == "relative_importance":
            self.importance_statistic.add_(self.num_experts * share - 1)
        else:
            steps = self.constraint_steps.to(share.dtype)
            excess = share - 1.0 / self.num_experts
            self.importance_statistic.copy_((self.importance_statistic * steps + excess) / (steps + 1))
        self.constraint_steps.add_(1)


class ConvMoE(nn.Module):
    """A sparse MoE residual block for CNNs: ``relu(shortcut(x) + sum_e w_e * body_e(x))``.
    [B, Ci, H, W] -> [B, Co, H', W'] with H' = ceil(H / stride); replaces a ResNet basic or bottleneck block.

    Args:
        in_channels: Ci. out_channels: Co. num_experts: E. k: K, experts per image or location.
        stride: the block's stride (in each expert's strided convolution and in the shortcut).
        expert: "basic" or "bottleneck" body (see :class:`ResidualBody`).
        expert_width: each body's inner width (the replaced block's planes; narrower experts keep the
            parameter count down, as the paper's narrow experts do). Default: Co for "basic", Co // 4 for
            "bottleneck".
        gating: "image" (one top-K choice per image from pooled features) or "location" (per output pixel).
        capacity_factor: image gating only: each expert takes C = ceil(K * B * capacity_factor / E) images
            (default ``DEFAULT_IMAGE_CAPACITY_FACTOR``, V-MoE's 1.25); E / K never drops an image (and computes
            every expert on B slots). Location gating rejects it.
        constraint: None, or a hard constraint from ``HARD_CONSTRAINTS`` (see
            :class:`ConstrainedTokenChoiceRouter`); constraint_threshold: its threshold.
        noise_std, batch_priority, renormalize, ...: router options (see :class:`TokenChoiceRouter`);
            ``renormalize`` defaults to True (the authors' softmax over the K chosen logits).

    After each forward: ``last_metrics`` holds the router's :class:`~visionmoe.routers.RouterMetrics` (with the
    auxiliary losses that :func:`visionmoe.layers.aux_losses` collects) and ``last_gate_weights`` the combine
    weights, [B, E] for image gating (0 for unchosen experts and for images beyond the capacity) or
    [B, E, H', W'] for location gating; :func:`visionmoe.metrics.expert_class_usage` turns them into a report.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int,
        k: int = 1,
        *,
        stride: int = 1,
        expert: str = "basic",
        expert_width: Optional[int] = None,
        gating: str = "image",
        capacity_factor: Optional[float] = None,
        constraint: Optional[str] = None,
        constraint_threshold: float = 0.1,
        renormalize: bool = True,
        **router_options,
    ):
        super().__init__()
        check_choice("gating", gating, GATINGS)
        check_choice("expert", expert, EXPERT_BODIES)
        # Checked here, not only by the router and the bodies, so that errors name this layer's options.
        in_channels, out_channels, stride = (
            check_int(name, value, 1)
            for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride))
        )
        if gating == "image" and capacity_factor is None:
            capacity_factor = DEFAULT_IMAGE_CAPACITY_FACTOR
        if gating == "location" and capacity_factor is not None:
            raise ValueError(
                "capacity_factor applies to image gating only; location gating computes every expert on every image"
            )
        if expert_width is None:
            expert_width = out_channels if expert == "basic" else max(out_channels // 4, 1)
        self.router = ConstrainedTokenChoiceRouter(
            in_channels,
            num_experts,
            constraint,
            constraint_threshold,
            k=k,
            capacity_factor=capacity_factor if gating == "image" else None,
            renormalize=renormalize,
            **router_options,
        )
        self.in_channels, self.out_channels, self.num_experts = in_channels, out_channels, self.router.num_experts
        self.stride, self.gating = stride, gating
        self.experts = nn.ModuleList(
            ResidualBody(in_channels, out_channels, expert_width, stride, expert) for _ in range(self.num_experts)
        )
        self.shortcut = residual_shortcut(in_channels, out_channels, stride)
        self.last_metrics: Optional[RouterMetrics] = None
        self.last_gate_weights: Optional[torch.Tensor] = None

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        return -(-height // self.stride), -(-width // self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_dtype("x", x, self.router.proj.weight.dtype)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                f"x must have shape [B, Ci, H, W] with Ci = {self.in_channels} and H, W >= 1 (an image "
                f"of no pixels has nothing to gate on), got {tuple(x.shape)}"
            )
        mixed = self._image_moe(x) if self.gating == "image" else self._location_moe(x)
        return F.relu(self.shortcut(x) + mixed)

    def _image_moe(self, x: torch.Tensor) -> torch.Tensor:
        B, Ci, H, W = x.shape
        E = self.num_experts
        Ho, Wo = self.output_size(H, W)
        plan, self.last_metrics = self.router(x.mean(dim=(2, 3)).unsqueeze(0))  # images are the tokens
        C = plan.capacity
        # The router's plan is consistent by construction: no validation pass (a synchronisation on CUDA).
        rows = ops.dispatch(x.reshape(B, Ci * H * W), plan, "padded", validate=False).view(E, C, Ci, H, W)
        valid = torch.arange(C, device=x.device) < plan.expert_load().unsqueeze(1)  # [E, C]
        expert_out = torch.stack(
            [body(rows[e], valid[e]).reshape(C, self.out_channels * Ho * Wo) for e, body in enumerate(self.experts)]
        )
        self.last_gate_weights = self._dense_weights(plan, B)
        return ops.combine(expert_out, plan, B, validate=False).view(B, self.out_channels, Ho, Wo)

    def _location_moe(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        E = self.num_experts
        Ho, Wo = self.output_size(x.shape[2], x.shape[3])
        # A stride-s 1x1 convolution reads the input pixel under each output location: those are the tokens.
        pixels = x[:, :, :: self.stride, :: self.stride]
        plan, self.last_metrics = self.router(pixels.permute(0, 2, 3, 1).reshape(1, B * Ho * Wo, self.in_channels))
        weights = self._dense_weights(plan, B * Ho * Wo).view(B, Ho, Wo, E).permute(0, 3, 1, 2)  # [B, E, H', W']
        self.last_gate_weights = weights
        mixed = 0
        for e, body in enumerate(self.experts):
            mixed = mixed + weights[:, e : e + 1] * body(x)
        return mixed

    @staticmethod
    def _dense_weights(plan, num_tokens: int) -> torch.Tensor:
        """[T, E] combine weights of the kept assignments, 0 elsewhere."""
        kept_weight = plan.weight * plan.kept()
        dense = kept_weight.new_zeros(num_tokens, plan.num_experts // plan.num_groups)
        return dense.index_put((plan.sorted_token, plan.sorted_expert // plan.num_groups), kept_weight)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"num_experts={self.num_experts}, stride={self.stride}, gating={self.gating!r}"
        )
