"""Teacher-guided routing (TGR-MoE, PAPERS.md section 4): a teacher router on a frozen dense model, whose
per-token expert distributions the student's MoE routers are distilled towards.

Shape letters: B images, N tokens per image, D width, E experts, G groups, T tokens per group.

Token alignment: the student's MoE layers route every token of the block, the class token included (MoEMLP
reshapes [B, N, D] to groups of whole images, token ``b * N + n``), and the teacher's block outputs are
[B, N, D] in the same order (class token first in both of our ViTs and in timm's). The distillation therefore
pairs token n of image b in the student with token n of image b in the teacher, the class token included; a
teacher with another number of tokens (another patch size, register tokens) is rejected.
"""

from __future__ import annotations

import collections.abc
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..routers.checks import check_flag, check_input_dtype, check_int, check_real
from .block_indices import check_block_indices
from .moe_mlp import MoEMLP

# The TGR paper's teacher-router loss weights: 0.005 * CV(Imp)^2 + 0.005 * mean token entropy, per layer.
TEACHER_IMPORTANCE_WEIGHT = 0.005
TEACHER_ENTROPY_WEIGHT = 0.005

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.")


class _FeaturesCaptured(Exception):
    """Raised by the hook of the deepest tapped block: the teacher's remaining blocks and head are not needed."""


class TeacherRouter(nn.Module):
    """One learned linear router per student MoE layer, on the features of a frozen dense teacher.

    The teacher is any model with a ``blocks`` sequence (our :class:`~visionmoe.models.VisionTransformer`, a
    timm ViT) whose block ``i`` returns [B, N, D]. Forward hooks tap the outputs of the blocks in ``layers``;
    the teacher itself is not modified, runs in eval mode under ``torch.no_grad``, and stops at the deepest
    tapped block (the hook ends its forward). Router ``i`` maps the tapped features (layer-normalised without
    parameters when ``normalize_features``, so that one initialisation suits teachers whose residual streams
    differ in scale) to p_t = softmax over E per token.

    The routers are trained only with :meth:`losses` (importance and token entropy, 0.005 each as in the paper),
    never with the task loss: jointly with the student (the default), or by :meth:`pretrain` and then frozen.
    Nothing of this module is needed at inference.

    Args:
        teacher: the frozen dense model (its parameters are set to ``requires_grad=False``).
        layers: zero-based indices into ``teacher.blocks``, one per student MoE layer, in the student's order
            (see :func:`aligned_blocks`).
        num_experts: E of every layer, or one E per layer.
        dim: D of the teacher's blocks; default ``teacher.embed_dim`` or ``teacher.config["embed_dim"]``.
        importance_weight, entropy_weight: the weights of the router losses.
        normalize_features: layer-normalise the tapped features (no learned parameters) before the routers.

    ``forward(images) -> list of [B, N, E]`` teacher routing probabilities, one per layer.
    """

    def __init__(
        self,
        teacher: nn.Module,
        layers: Sequence[int],
        num_experts: int | Sequence[int],
        *,
        dim: Optional[int] = None,
        importance_weight: float = TEACHER_IMPORTANCE_WEIGHT,
        entropy_weight: float = TEACHER_ENTROPY_WEIGHT,
        normalize_features: bool = True,
    ):
        super().__init__()
        blocks = getattr(teacher, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                f"teacher must have a 'blocks' nn.Sequential or nn.ModuleList (a ViT), got {type(teacher).__name__}"
            )
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one teacher block")
        if check_block_indices(layers, len(blocks), "layers") != layers:
            raise ValueError(
                f"layers must be increasing block indices (the student's MoE layers in order), got {layers}"
            )
        if isinstance(num_experts, collections.abc.Sequence):
            if len(num_experts) != len(layers):
                raise ValueError(
                    f"num_experts must be an integer >= 1 or one per layer ({len(layers)}), got {num_experts!r}"
                )
            experts_per_layer = [check_int(f"num_experts[{i}]", e, 1) for i, e in enumerate(num_experts)]
        else:
            experts_per_layer = [check_int("num_experts", num_experts, 1)] * len(layers)
        if dim is None:
            dim = getattr(teacher, "embed_dim", None) or getattr(teacher, "config", {}).get("embed_dim")
            if dim is None:
                raise ValueError("dim could not be read from teacher.embed_dim or teacher.config; pass dim")
        self.dim = check_int("dim", dim, 1)
        self.teacher = teacher.requires_grad_(False).eval()
        self.layers = layers
        self.importance_weight = check_real("importance_weight", importance_weight, at_least=0)
        self.entropy_weight = check_real("entropy_weight", entropy_weight, at_least=0)
        self.normalize_features = check_flag("normalize_features", normalize_features)
        self.routers = nn.ModuleList(nn.Linear(self.dim, e, bias=False) for e in experts_per_layer)
        self._features: Dict[int, torch.Tensor] = {}
        self._capturing = False
        self._hooks = [blocks[i].register_forward_hook(self._capture_hook(i)) for i in layers]

    @classmethod
    def from_student(cls, teacher: nn.Module, student: nn.Module, **options) -> "TeacherRouter":
        """A teacher router aligned with ``student``'s MoE layers: the teacher blocks of the same indices, and
        each layer's E."""
        moe_layers = student_moe_layers(student)
        return cls(teacher, aligned_blocks(student), [layer.num_experts for layer in moe_layers], **options)

    def _capture_hook(self, index: int):
        def hook(module, inputs, output):
            if not self._capturing:
                return
            if not isinstance(output, torch.Tensor) or output.dim() != 3 or output.shape[-1] != self.dim:
                raise ValueError(
                    f"teacher block {index} must return [B, N, D] features with D = {self.dim} (the "
                    f"teacher router's dim), got {tuple(getattr(output, 'shape', ()))}"
                )
            self._features[index] = output
            if index == self.layers[-1]:
                raise _FeaturesCaptured

        return hook

    def train(self, mode: bool = True) -> "TeacherRouter":
        """Sets the routers' mode; the teacher always stays in eval mode (frozen, no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """[B, N, D] features of each tapped teacher block, computed without gradients."""
        self._features.clear()
        self._capturing = True
        try:
            with torch.no_grad():
                self.teacher(images)
        except _FeaturesCaptured:
            pass
        finally:
            self._capturing = False
        features = [self._features[i] for i in self.layers]
        self._features.clear()
        return features

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        probs = []
        for index, router, features in zip(self.layers, self.routers, self.teacher_features(images)):
            check_input_dtype(f"teacher block {index}'s features", features, router.weight.dtype)
            if self.normalize_features:
                features = F.layer_norm(features, features.shape[-1:])
            probs.append(router(features).softmax(dim=-1))
        return probs

    def losses(self, probs: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The routers' own losses, weighted and summed over layers: ``teacher_importance`` (the squared
        coefficient of variation of Imp_e = mean_t p_t[t, e], over the whole batch) and ``teacher_entropy`` (the
        mean entropy of each token's p_t)."""
        # A layer of no tokens (an empty batch) adds 0: the losses are undefined on none, and there is nothing to
        # balance or make confident.
        tokens = [p.reshape(-1, p.shape[-1]) for p in probs if p.numel() > 0]
        zero = probs[0].new_zeros((), dtype=torch.float32)
        return {
            "teacher_importance": self.importance_weight * sum((losses.importance_loss(p) for p in tokens), zero),
            "teacher_entropy": self.entropy_weight * sum((losses.entropy_loss(p) for p in tokens), zero),
        }

    @property
    def trainable(self) -> bool:
        return any(parameter.requires_grad for parameter in self.routers.parameters())

    def freeze(self) -> "TeacherRouter":
        """Stops training the routers (after :meth:`pretrain`, or to keep given router weights)."""
        self.routers.requires_grad_(False)
        return self

    def pretrain(self, image_batches: Iterable[torch.Tensor], lr: float = 1e-3) -> List[float]:
        """Trains the routers alone with AdamW on :meth:`losses` over ``image_batches`` (the paper's pre-train
        variant), then freezes them. Returns the loss of each step."""
        if not self.trainable:
            raise ValueError("the routers are frozen already; pretrain a fresh TeacherRouter")
        optimizer = torch.optim.AdamW(self.routers.parameters(), lr=lr)
        history = []
        for images in image_batches:
            loss = sum(self.losses(self(images)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        self.freeze()
        return history

    def extra_repr(self) -> str:
        return f"layers={self.layers}, normalize_features={self.normalize_features}"


def student_moe_layers(model: nn.Module) -> List[MoEMLP]:
    """The sparse MoE layers of ``model`` in module order (Soft MoE layers have no per-token expert choice)."""
    return [module for module in model.modules() if isinstance(module, MoEMLP)]


def aligned_blocks(student: nn.Module) -> List[int]:
    """The block index of each of ``student``'s MoE layers (modules named ``blocks.<i>.…``), in order."""
    indices = []
    for name, module in student.named_modules():
        if isinstance(module, MoEMLP):
            match = _BLOCK_NAME.match(name)
            if match is None:
                raise ValueError(
                    f"the student's MoE layer {name!r} is not inside 'blocks.<i>'; pass the teacher "
                    "block of each MoE layer to TeacherRouter as layers"
                )
            indices.append(int(match.group(1)))
    if not indices:
        raise ValueError("the student has no sparse MoE layers (MoEMLP) to guide")
    return indices


def student_router_logits(model: nn.Module) -> List[torch.Tensor]:
    """[G, T, E] router logits of each sparse MoE layer of ``model`` in its last forward (as its router
    selected on, with the training noise), in module order."""
    logits = []
    for layer in student_moe_layers(model):
        if layer.last_metrics is None:
            raise ValueError("the student's MoE layers have no routing yet; run the student's forward first")
        logits.append(layer.last_metrics.logits)
    return logits
