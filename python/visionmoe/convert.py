"""Turning existing dense models into MoE models in place, so code bases adopt MoE without rewriting them.

:func:`moeify` works on timm-style Vision Transformers: any module with ``.blocks[i].mlp`` computing
fc2(gelu(fc1(x))) on [B, N, D] tokens (timm's VisionTransformer and its Mlp, visionmoe's own ViT).

Which upcycling entry point to use (README, "Upcycling: which entry point"): :func:`moeify` for a model built
elsewhere, changed in place; :func:`visionmoe.models.upcycle` for visionmoe's own ``VisionTransformer`` (a new
model whose config records the MoE blocks, so the training tools and checkpoints know them; sparse or Soft MoE);
:meth:`visionmoe.layers.MoEMLP.from_dense` for one MLP of your own architecture.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from .layers import MoEMLP
from .layers.block_indices import check_block_indices
from .models.vit import default_moe_blocks


def _dense_mlp(block: nn.Module, index: int) -> nn.Module:
    """``block.mlp`` after checking that experts upcycled from its fc1 and fc2 compute what it computes."""
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"blocks[{index}] ({type(block).__name__}) has no .mlp module")
    where = f"blocks[{index}].mlp ({type(mlp).__name__})"
    if not (isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)):
        raise ValueError(
            f"{where} must have nn.Linear attributes fc1 and fc2, as timm's Mlp (an MoE layer is not converted again)"
        )
    activation = getattr(mlp, "act", None)
    if not (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        raise ValueError(f"{where}.act must be nn.GELU() (exact, as the experts compute), got {activation!r}")
    for name, child in mlp.named_children():
        harmless = isinstance(child, nn.Identity) or (isinstance(child, nn.Dropout) and child.p == 0)
        if name not in ("fc1", "act", "fc2") and not harmless:
            raise ValueError(f"{where}.{name} ({child!r}) would be lost: the experts compute fc2(gelu(fc1(x))) only")
    return mlp


def moeify(
    model: nn.Module, blocks: Optional[Iterable[int]] = None, num_experts: int = 8, router: str = "topk", **options
) -> nn.Module:
    """Replaces the MLPs of chosen blocks by :class:`~visionmoe.layers.MoEMLP` layers upcycled from them, in place.

    Use it for a ViT built elsewhere (timm's, your own with timm's block layout). For visionmoe's own
    ``VisionTransformer`` prefer :func:`visionmoe.models.upcycle`, whose result records its MoE blocks in its
    config (the training and evaluation tools rebuild models from it) and which also makes Soft MoE layers.

    Each chosen ``model.blocks[i].mlp`` (fc1: nn.Linear, act: exact nn.GELU, fc2: nn.Linear; other children may
    only be nn.Identity or zero-rate nn.Dropout, as in timm's Mlp) becomes
    ``MoEMLP.from_dense(fc1, fc2, num_experts, router, **options)``: every expert starts as a copy of the dense
    MLP, the router starts fresh, on the MLP's device and dtype and in its training mode. All chosen blocks are
    checked before any is replaced, so on error the model is unchanged.

    An MoE layer of identical experts outputs MLP(x) times the sum of the token's kept combine weights, so the
    converted model computes what the dense one did only when each token's weights sum to 1 and none of its
    assignments is dropped: e.g. ``router="topk", renormalize=True, capacity_factor=None`` (any K). With the
    defaults (K=1, no renormalisation, capacity factor 1.0) each MLP output is scaled by the token's top
    probability, and tokens beyond an expert's capacity get none.

    Args:
        model: a module with ``.blocks``, an indexable sequence of blocks (nn.Sequential or nn.ModuleList).
        blocks: zero-based block indices; default :func:`visionmoe.models.default_moe_blocks` (every other block
            of the last half, V-MoE's placement).
        num_experts: E. router: a sparse router name (:func:`visionmoe.routers.list_routers`).
        **options: for :class:`~visionmoe.layers.MoEMLP`: ``group_size`` and the router's options; the router's
            own defaults apply otherwise (for "topk": K=1, capacity factor 1.0; V-MoE's settings are
            ``visionmoe.models.VMOE_OPTIONS``).

    Returns ``model``.
    """
    stack = getattr(model, "blocks", None)
    if stack is None:
        raise ValueError(
            f"model ({type(model).__name__}) has no .blocks: moeify converts timm-style Vision "
            "Transformers, whose blocks hold an .mlp"
        )
    depth = len(stack)
    chosen = default_moe_blocks(depth) if blocks is None else check_block_indices(blocks, depth, "blocks")
    dense_mlps = {i: _dense_mlp(stack[i], i) for i in chosen}
    for i, mlp in dense_mlps.items():
        stack[i].mlp = MoEMLP.from_dense(mlp.fc1, mlp.fc2, num_experts, router, **options).train(mlp.training)
    return model
