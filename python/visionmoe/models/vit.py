"""Vision Transformer (Dosovitskiy et al. 2021) with optional MoE MLPs: dense ViT, V-MoE (Riquelme et al. 2021)
and Soft-MoE ViT (Puigcerver et al. 2023), plus sparse upcycling of a dense ViT into an MoE one.

Shape letters: B images, N tokens per image (patches plus the class token), D width, H heads, F MLP hidden width,
E experts, P slots per expert.

Module and parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks[i].norm1/.attn.qkv/.attn.proj/.norm2/.mlp.fc1/.mlp.fc2``, ``norm``, ``head``), so tools written for
timm ViTs, such as :func:`visionmoe.convert.moeify`, find the same modules here.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..layers import MoEMLP, SoftMoEMLP
from ..layers.attention import Attention
from ..layers.block_indices import check_block_indices
from ..layers.mlp import Mlp, vit_linear
from ..layers.patch_embed import PatchEmbed
from .registry import register_model

MOE_LAYERS = ("sparse", "soft")

# timm's ViT LayerNorm epsilon.
LAYER_NORM_EPS = 1e-6

# V-MoE's router settings (vmoe/configs/vmoe_paper: "ViT-B/16, E=8, K=2"): each token picks its top 2 of 8
# experts; capacity C = ceil(K * T * 1.05 / E) rounded up to a multiple of 4; router noise std 1/E (the router's
# default noise_std=1.0). V-MoE routes groups of 8 images; here the whole batch is one group unless ``group_size``
# is given, so that any batch size works.
VMOE_OPTIONS = dict(num_experts=8, router="topk", k=2, capacity_factor=1.05, capacity_multiple=4)

# Soft MoE: 8 experts; without slots_per_expert, P = round(N * capacity_factor / E) with the Soft MoE capacity
# factor 1.0, so the S = E * P slots about equal the N tokens and the experts' cost about equals the dense MLP's.
SOFT_MOE_OPTIONS = dict(num_experts=8)


def default_moe_blocks(depth: int) -> List[int]:
    """V-MoE's placement: every other block of the last half, i.e. the odd zero-based indices i >= depth // 2.

    depth 12 -> [7, 9, 11] (V-MoE's "Last 3"); depth 8 -> [5, 7]. For even depths the last block is an MoE block.
    """
    return [i for i in range(depth // 2, depth) if i % 2 == 1]


def default_moe_options(moe_layer: str, overrides: Optional[Dict] = None) -> Dict:
    """MoE options for ``moe_layer``: ``overrides`` merged over VMOE_OPTIONS ("sparse") or SOFT_MOE_OPTIONS
    ("soft"). An override naming another sparse router than "topk" keeps only the default num_experts: the top-K
    options (k, capacity_multiple) need not exist for other routers."""
    if moe_layer not in MOE_LAYERS:
        raise ValueError(f"moe_layer must be one of {MOE_LAYERS}, got {moe_layer!r}")
    overrides = dict(overrides or {})
    defaults = VMOE_OPTIONS if moe_layer == "sparse" else SOFT_MOE_OPTIONS
    if overrides.get("router", defaults.get("router")) != defaults.get("router"):
        defaults = {"num_experts": defaults["num_experts"]}
    return {**defaults, **overrides}


def check_vit_sizes(sizes: Dict[str, int], mlp_ratio: float) -> int:
    """Checks a ViT-style model's sizes: every entry of ``sizes`` (which holds at least img_size, patch_size,
    embed_dim and num_heads) >= 1, patches tiling the image, heads dividing the width, and at least one MLP hidden
    unit; returns the MLP hidden width ``int(embed_dim * mlp_ratio)``."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    img_size, patch_size, embed_dim, num_heads = (
        sizes[name] for name in ("img_size", "patch_size", "embed_dim", "num_heads")
    )
    if img_size % patch_size != 0:
        raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
    hidden_dim = int(embed_dim * mlp_ratio)
    if hidden_dim < 1:
        raise ValueError(f"mlp_ratio must give at least one hidden unit, got {mlp_ratio}")
    return hidden_dim


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)). ``mlp`` is a dense :class:`Mlp` or an
    MoE layer with the same [B, N, D] -> [B, N, D] contract."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token and learned position embeddings; chosen blocks may have MoE MLPs.

    ``forward(x [B, in_chans, img_size, img_size]) -> logits [B, num_classes]`` from the class token after the
    final norm; ``forward_features`` returns all N = (img_size / patch_size)^2 + 1 tokens, [B, N, D].

    Args:
        img_size, patch_size, in_chans: the square input and its patches (img_size a multiple of patch_size).
        num_classes: outputs of the head. embed_dim: D. depth: blocks. num_heads: H (D a multiple of H).
        mlp_ratio: F = int(D * mlp_ratio).
        moe_blocks: zero-based indices of the blocks whose MLP is an MoE layer (see :func:`default_moe_blocks`).
        moe: the MoE layers' options, used as given: ``num_experts`` (required with moe_blocks), and for
            "sparse" ``router``, ``group_size``, ``activation`` and the router's options (k, capacity_factor, ...),
            for "soft" ``slots_per_expert`` (default: derived from N, see SOFT_MOE_OPTIONS) or ``capacity_factor``,
            and the soft router's options. The entrypoints merge their defaults in (:func:`default_moe_options`).
        moe_layer: "sparse" (:class:`~visionmoe.layers.MoEMLP`) or "soft" (:class:`~visionmoe.layers.SoftMoEMLP`).

    The MoE layers keep their router metrics after each forward; :func:`visionmoe.layers.aux_losses` sums their
    auxiliary losses.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        moe_blocks: Iterable[int] = (),
        moe: Optional[Dict] = None,
        moe_layer: str = "sparse",
    ):
        super().__init__()
        hidden_dim = check_vit_sizes(
            dict(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                num_classes=num_classes,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=num_heads,
            ),
            mlp_ratio,
        )
        if moe_layer not in MOE_LAYERS:
            raise ValueError(f"moe_layer must be one of {MOE_LAYERS}, got {moe_layer!r}")
        moe_blocks = check_block_indices(moe_blocks, depth, "moe_blocks")
        if moe_blocks and "num_experts" not in (moe or {}):
            raise ValueError("moe must give num_experts for the MoE blocks (e.g. moe=dict(num_experts=8))")
        # The dense architecture, from which upcycle() builds the MoE model.
        self.config = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens, embed_dim))
        self.blocks = nn.Sequential(
            *(
                Block(
                    embed_dim,
                    num_heads,
                    self._moe_mlp(embed_dim, hidden_dim, moe, moe_layer)
                    if i in moe_blocks
                    else Mlp(embed_dim, hidden_dim),
                )
                for i in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = vit_linear(embed_dim, num_classes)
        # As timm: the class token starts near zero, the position embeddings as the linear layers.
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _moe_mlp(self, dim: int, hidden_dim: int, moe: Dict, moe_layer: str) -> nn.Module:
        if moe_layer == "sparse":
            return MoEMLP(dim, hidden_dim, **moe)
        options = dict(moe)
        if "slots_per_expert" not in options:
            options.update(slots_per_expert=None, num_tokens=self.num_tokens)
        return SoftMoEMLP(dim, hidden_dim, **options)

    @property
    def moe_blocks(self) -> List[int]:
        """Indices of the blocks whose MLP is currently an MoE layer (also after :func:`visionmoe.convert.moeify`)."""
        return [i for i, block in enumerate(self.blocks) if isinstance(block.mlp, (MoEMLP, SoftMoEMLP))]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, img, img] -> the first block's input [B, N, D]: class token first, position embeddings
        added."""
        patches = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, img, img] -> [B, N, D]: class token first, after the final norm."""
        return self.norm(self.blocks(self._embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])

    def class_token_attention(self, x: torch.Tensor, heads: str = "mean") -> torch.Tensor:
        """The last block's attention of the class token over the patches (the DINO/LOST object-discovery map):
        [B, in_chans, img, img] -> [B, img / patch_size, img / patch_size] averaged over heads (``heads="mean"``),
        or [B, H, img / patch_size, img / patch_size] per head (``heads="all"``).

        The weights are those of the softmax over all N keys (the class token included), not renormalised over
        the patches."""
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {heads!r}")
        last = self.blocks[-1]
        probabilities = last.attn.attention_probabilities(last.norm1(self.blocks[:-1](self._embed(x))))
        side = self.config["img_size"] // self.config["patch_size"]
        per_head = probabilities[:, :, 0, 1:].reshape(x.shape[0], -1, side, side)
        return per_head.mean(dim=1) if heads == "mean" else per_head


def upcycle(
    dense_model: VisionTransformer, moe_blocks: Optional[Iterable[int]] = None, moe_layer: str = "sparse", **moe
) -> VisionTransformer:
    """Sparse upcycling (Komatsuzaki et al. 2023): an MoE ViT with ``dense_model``'s architecture and weights,
    whose MoE layers' experts all start as copies of the dense MLP they replace; routers start fresh.

    Use it for visionmoe's own ViTs: the new model's config names its MoE blocks and options, so checkpoints,
    ``visionmoe-train --init-from`` and ``visionmoe-eval`` rebuild it. For a ViT built elsewhere use
    :func:`visionmoe.convert.moeify` (in place); for a single MLP, :meth:`visionmoe.layers.MoEMLP.from_dense`.

    Args:
        dense_model: a :class:`VisionTransformer` whose chosen blocks have dense MLPs.
        moe_blocks: blocks to turn into MoE layers; default :func:`default_moe_blocks`.
        moe_layer: "sparse" or "soft".
        **moe: MoE options merged over the defaults (:func:`default_moe_options`).

    The result has the dense model's device, dtype and training mode; ``dense_model`` is left unchanged.
    """
    if not isinstance(dense_model, VisionTransformer):
        raise TypeError(
            f"dense_model must be a visionmoe VisionTransformer, got {type(dense_model).__name__}; "
            "for other timm-style models use visionmoe.convert.moeify"
        )
    depth = dense_model.config["depth"]
    moe_blocks = (
        default_moe_blocks(depth) if moe_blocks is None else check_block_indices(moe_blocks, depth, "moe_blocks")
    )
    if dense_model.moe_blocks:
        raise ValueError(f"dense_model has MoE layers in blocks {dense_model.moe_blocks}; upcycle a dense model")
    model = VisionTransformer(
        **dense_model.config, moe_blocks=moe_blocks, moe=default_moe_options(moe_layer, moe), moe_layer=moe_layer
    )
    reference = dense_model.pos_embed
    model.to(device=reference.device, dtype=reference.dtype).train(dense_model.training)
    replaced = tuple(f"blocks.{i}.mlp." for i in moe_blocks)
    loaded = model.load_state_dict(
        {name: value for name, value in dense_model.state_dict().items() if not name.startswith(replaced)}, strict=False
    )
    # Only the MoE layers may be left out; anything else (e.g. a subclass's extra parameters) would be lost.
    unmatched = loaded.unexpected_keys + [name for name in loaded.missing_keys if not name.startswith(replaced)]
    if unmatched:
        raise ValueError(
            f"dense_model's parameters {unmatched} have no place in the VisionTransformer built from its config"
        )
    for i in moe_blocks:
        dense_mlp = dense_model.blocks[i].mlp
        model.blocks[i].mlp.experts.load_dense_(dense_mlp.fc1, dense_mlp.fc2)
    return model


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
_IMAGENET = dict(img_size=224, patch_size=16, num_classes=1000)
# CPU-experiment resolution (CIFAR-sized images): 8 x 8 patches of 4 px, N = 65 tokens.
_SMALL_IMAGES = dict(img_size=32, patch_size=4, num_classes=10)


def _build(size: str, resolution: Dict, moe_layer: Optional[str], kwargs: Dict) -> VisionTransformer:
    """An entrypoint's model: keyword arguments override the size and resolution defaults; for MoE models,
    ``moe`` is merged over the default options and ``moe_blocks`` defaults to :func:`default_moe_blocks`."""
    config = {**_SIZES[size], **resolution, **kwargs}
    if moe_layer is not None:
        config.setdefault("moe_layer", moe_layer)
        config["moe"] = default_moe_options(config["moe_layer"], config.get("moe"))
        config.setdefault("moe_blocks", default_moe_blocks(config["depth"]))
    return VisionTransformer(**config)


@register_model("vit_tiny")
def vit_tiny(**kwargs) -> VisionTransformer:
    """ViT-Ti/16, 224 px: D=192, 12 blocks, 3 heads, F=768, 1000 classes."""
    return _build("tiny", _IMAGENET, None, kwargs)


@register_model("vit_small")
def vit_small(**kwargs) -> VisionTransformer:
    """ViT-S/16, 224 px: D=384, 12 blocks, 6 heads, F=1536, 1000 classes."""
    return _build("small", _IMAGENET, None, kwargs)


@register_model("vit_base")
def vit_base(**kwargs) -> VisionTransformer:
    """ViT-B/16, 224 px: D=768, 12 blocks, 12 heads, F=3072, 1000 classes."""
    return _build("base", _IMAGENET, None, kwargs)


@register_model("vmoe_tiny")
def vmoe_tiny(**kwargs) -> VisionTransformer:
    """V-MoE-Ti/16: vit_tiny with MoE MLPs in blocks 7, 9, 11 (VMOE_OPTIONS: E=8, top-2, capacity 1.05)."""
    return _build("tiny", _IMAGENET, "sparse", kwargs)


@register_model("vmoe_small")
def vmoe_small(**kwargs) -> VisionTransformer:
    """V-MoE-S/16: vit_small with MoE MLPs in blocks 7, 9, 11 (VMOE_OPTIONS: E=8, top-2, capacity 1.05)."""
    return _build("small", _IMAGENET, "sparse", kwargs)


@register_model("vmoe_base")
def vmoe_base(**kwargs) -> VisionTransformer:
    """V-MoE-B/16: vit_base with MoE MLPs in blocks 7, 9, 11 (VMOE_OPTIONS: E=8, top-2, capacity 1.05)."""
    return _build("base", _IMAGENET, "sparse", kwargs)


@register_model("softmoe_vit_tiny")
def softmoe_vit_tiny(**kwargs) -> VisionTransformer:
    """Soft-MoE-Ti/16: vit_tiny with Soft MoE MLPs in blocks 7, 9, 11 (E=8, P=round(197 / 8)=25 slots each)."""
    return _build("tiny", _IMAGENET, "soft", kwargs)


@register_model("softmoe_vit_small")
def softmoe_vit_small(**kwargs) -> VisionTransformer:
    """Soft-MoE-S/16: vit_small with Soft MoE MLPs in blocks 7, 9, 11 (E=8, P=round(197 / 8)=25 slots each)."""
    return _build("small", _IMAGENET, "soft", kwargs)


@register_model("vit_tiny_32")
def vit_tiny_32(**kwargs) -> VisionTransformer:
    """vit_tiny for 32 px images: patch 4 (N=65 tokens), 10 classes."""
    return _build("tiny", _SMALL_IMAGES, None, kwargs)


@register_model("vit_small_32")
def vit_small_32(**kwargs) -> VisionTransformer:
    """vit_small for 32 px images: patch 4 (N=65 tokens), 10 classes."""
    return _build("small", _SMALL_IMAGES, None, kwargs)


@register_model("vit_base_32")
def vit_base_32(**kwargs) -> VisionTransformer:
    """vit_base for 32 px images: patch 4 (N=65 tokens), 10 classes."""
    return _build("base", _SMALL_IMAGES, None, kwargs)


@register_model("vmoe_tiny_32")
def vmoe_tiny_32(**kwargs) -> VisionTransformer:
    """vmoe_tiny for 32 px images: patch 4 (N=65 tokens), 10 classes."""
    return _build("tiny", _SMALL_IMAGES, "sparse", kwargs)


@register_model("vmoe_small_32")
def vmoe_small_32(**kwargs) -> VisionTransformer:
    """vmoe_small for 32 px images: patch 4 (N=65 tokens), 10 classes."""
    return _build("small", _SMALL_IMAGES, "sparse", kwargs)


@register_model("vmoe_base_32")
def vmoe_base_32(**kwargs) -> VisionTransformer:
    """vmoe_base for 32 px images: patch 4 (N=65 tokens), 10 classes."""
    return _build("base", _SMALL_IMAGES, "sparse", kwargs)


@register_model("softmoe_vit_tiny_32")
def softmoe_vit_tiny_32(**kwargs) -> VisionTransformer:
    """softmoe_vit_tiny for 32 px images: patch 4 (N=65 tokens, P=round(65 / 8)=8 slots per expert), 10 classes."""
    return _build("tiny", _SMALL_IMAGES, "soft", kwargs)


@register_model("softmoe_vit_small_32")
def softmoe_vit_small_32(**kwargs) -> VisionTransformer:
    """softmoe_vit_small for 32 px images: patch 4 (N=65 tokens, P=round(65 / 8)=8 slots per expert), 10 classes."""
    return _build("small", _SMALL_IMAGES, "soft", kwargs)
