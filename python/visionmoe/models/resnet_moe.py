"""ResNets with sparse MoE blocks (Pavlitska et al., PAPERS.md section 2).

Chosen blocks of a ResNet (He et al. 2016; torchvision's layout, stride in the bottleneck's 3x3) are replaced by
:class:`visionmoe.layers.ConvMoE` blocks of the same kind, stride and widths, each expert a full copy of the
block's body. By default every block of the last stage is an MoE block: the paper inserts its MoE layers into
the late ResNet stages, where features are most class-specific and experts specialise by domain (its ResBlock-MoE
replaces a whole stage; here each block of that stage is routed on its own). Default E = 4 experts with K = 2
per image, as the authors' code (github.com/BikLihi/cnn-moe-interpretability).

Registered models:
- ``resnet18_moe`` (basic blocks, stages 2-2-2-2) and ``resnet50_moe`` (bottleneck blocks, 3-4-6-3): ImageNet
  stem (7x7 stride-2 convolution and 3x3 max-pool), 1000 classes by default.
- ``resnet18_moe_32`` and ``resnet50_moe_32``: the same nets with the CIFAR stem (one 3x3 stride-1 convolution,
  no max-pool) for 32x32 inputs, 100 classes by default (CIFAR-100, as in the paper).
Every entrypoint passes its keyword arguments to :class:`ResNetMoE` (``moe_blocks``, ``num_experts``, ``k``,
``gating``, ``constraint``, ...).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.conv_moe import EXPERT_BODIES, ConvMoE, ResidualBody, residual_shortcut
from .registry import register_model

STEMS = ("imagenet", "cifar")
STAGE_PLANES = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4


class ResidualBlock(nn.Module):
    """A dense ResNet block: ``relu(shortcut(x) + body(x))`` with a basic or bottleneck body."""

    def __init__(self, in_channels: int, out_channels: int, width: int, stride: int, kind: str):
        super().__init__()
        self.body = ResidualBody(in_channels, out_channels, width, stride, kind)
        self.shortcut = residual_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.body(x))


class ResNetMoE(nn.Module):
    """A ResNet whose chosen blocks are sparse MoE blocks. [B, 3, H, W] -> [B, num_classes] logits.

    Args:
        block: "basic" or "bottleneck". layers: blocks per stage (four stages, widths 64-128-256-512, times 4
            at a bottleneck's output).
        num_classes: classifier outputs. stem: "imagenet" or "cifar" (see the module docstring).
        moe_blocks: (stage, block) pairs, 0-based, of the blocks to make MoE blocks; None: every block of the
            last stage; an empty sequence gives the dense ResNet.
        num_experts: E. k: K. **moe_options: passed to every :class:`~visionmoe.layers.ConvMoE` (gating,
            capacity_factor, constraint, constraint_threshold, noise_std, ...).

    The MoE blocks' auxiliary losses are collected by :func:`visionmoe.layers.aux_losses`.
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        stem: str = "imagenet",
        moe_blocks: Optional[Iterable[Tuple[int, int]]] = None,
        num_experts: int = 4,
        k: int = 2,
        **moe_options,
    ):
        super().__init__()
        if block not in EXPERT_BODIES:
            raise ValueError(f"block must be one of {EXPERT_BODIES}, got {block!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if len(layers) != len(STAGE_PLANES) or any(n < 1 for n in layers):
            raise ValueError(f"layers must give {len(STAGE_PLANES)} stage depths >= 1, got {tuple(layers)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if moe_blocks is None:
            moe_blocks = [(len(layers) - 1, index) for index in range(layers[-1])]
        moe_blocks = {tuple(position) for position in moe_blocks}
        for stage, index in moe_blocks:
            if not (0 <= stage < len(layers) and 0 <= index < layers[stage]):
                raise ValueError(
                    f"moe_blocks entry {(stage, index)} names no block; stages have "
                    f"{tuple(layers)} blocks (0-based stage and block indices)"
                )
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        expansion = 1 if block == "basic" else BOTTLENECK_EXPANSION
        stages = []
        channels = 64
        for stage, (planes, depth) in enumerate(zip(STAGE_PLANES, layers)):
            blocks = []
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                out_channels = planes * expansion
                if (stage, index) in moe_blocks:
                    blocks.append(
                        ConvMoE(
                            channels,
                            out_channels,
                            num_experts,
                            k,
                            stride=stride,
                            expert=block,
                            expert_width=planes,
                            **moe_options,
                        )
                    )
                else:
                    blocks.append(ResidualBlock(channels, out_channels, planes, stride, block))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape [B, 3, H, W], got {tuple(x.shape)}")
        features = self.stages(self.stem(x))
        return self.fc(features.mean(dim=(2, 3)))


@register_model("resnet18_moe")
def resnet18_moe(**kwargs) -> ResNetMoE:
    """ResNet-18 (basic blocks, 2-2-2-2), ImageNet stem; MoE in the last stage by default."""
    return ResNetMoE("basic", (2, 2, 2, 2), **kwargs)


@register_model("resnet18_moe_32")
def resnet18_moe_32(num_classes: int = 100, **kwargs) -> ResNetMoE:
    """ResNet-18 with MoE blocks and the CIFAR stem, for 32x32 inputs."""
    return ResNetMoE("basic", (2, 2, 2, 2), num_classes, stem="cifar", **kwargs)


@register_model("resnet50_moe")
def resnet50_moe(**kwargs) -> ResNetMoE:
    """ResNet-50 (bottleneck blocks, 3-4-6-3), ImageNet stem; MoE in the last stage by default."""
    return ResNetMoE("bottleneck", (3, 4, 6, 3), **kwargs)


@register_model("resnet50_moe_32")
def resnet50_moe_32(num_classes: int = 100, **kwargs) -> ResNetMoE:
    """ResNet-50 with MoE blocks and the CIFAR stem, for 32x32 inputs."""
    return ResNetMoE("bottleneck", (3, 4, 6, 3), num_classes, stem="cifar", **kwargs)
