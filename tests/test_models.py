import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionmoe.convert import moeify
from visionmoe.layers import MoEMLP, SoftMoEMLP, aux_losses
from visionmoe.models import (
    VMOE_OPTIONS,
    VisionTransformer,
    create_model,
    default_moe_blocks,
    list_models,
    upcycle,
)
from visionmoe.routers import ExpertChoiceRouter, TokenChoiceRouter

EXPECTED_MODELS = sorted(
    f"{family}_{size}{resolution}"
    for family, sizes in (
        ("vit", ("tiny", "small", "base")),
        ("vmoe", ("tiny", "small", "base")),
        ("softmoe_vit", ("tiny", "small")),
    )
    for size in sizes
    for resolution in ("", "_32")
)

# Options under which an upcycled top-1 MoE layer computes exactly its dense MLP: the one combine weight is
# renormalised to 1 and the capacity (C = T * capacity_factor / E = T) drops nothing.
EXACT_UPCYCLING = dict(num_experts=4, k=1, renormalize=True, capacity_factor=4.0)


def images_for(model: VisionTransformer, batch: int) -> torch.Tensor:
    config = model.config
    return torch.randn(batch, config["in_chans"], config["img_size"], config["img_size"])


# The Vision Transformer entrypoints; ResNet-MoE models are tested in test_conv_moe.py, What-Where Transformers and
# the slot-attention baseline in test_whatwhere_models.py.
TRANSFORMERS = [name for name in list_models() if not name.startswith(("resnet", "wwt", "slot_attention"))]


def test_registry_lists_every_entrypoint():
    assert TRANSFORMERS == EXPECTED_MODELS


def check_moe_blocks(name, model):
    expected = [] if name.startswith("vit") else [7, 9, 11]
    assert model.moe_blocks == expected
    layer_type = MoEMLP if name.startswith("vmoe") else SoftMoEMLP
    assert all(isinstance(model.blocks[i].mlp, layer_type) for i in expected)


# A training step at 224 px costs as much as at 32 px plus the larger activations; the 224 px small and base models
# run a forward pass only, their 32 px twins (same layers and widths) the full step, to keep this file fast.
FORWARD_ONLY = [name for name in TRANSFORMERS if not name.endswith("_32") and "tiny" not in name]


@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_model_forward(name):
    model = create_model(name).eval()
    with torch.no_grad():
        logits = model(images_for(model, batch=1))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    check_moe_blocks(name, model)


@pytest.mark.parametrize("name", [name for name in TRANSFORMERS if name not in FORWARD_ONLY])
def test_model_trains_a_step(name):
    model = create_model(name).train()
    small_images = name.endswith("_32")
    x = images_for(model, batch=2 if small_images else 1)
    labels = torch.arange(x.shape[0])
    logits = model(x)
    assert logits.shape == (x.shape[0], 10 if small_images else 1000)
    check_moe_blocks(name, model)
    losses = aux_losses(model)
    loss = F.cross_entropy(logits, labels) + sum(losses.values())
    loss.backward()
    missing = [param_name for param_name, param in model.named_parameters() if param.grad is None]
    assert missing == []
    assert torch.isfinite(torch.stack([param.grad.norm() for param in model.parameters()])).all()
    assert set(losses) == ({"importance", "load", "switch", "z_loss"} if name.startswith("vmoe") else set())
    head_before = model.head.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.head.weight, head_before)


def test_default_moe_blocks_every_other_block_of_the_last_half():
    assert default_moe_blocks(12) == [7, 9, 11]
    assert default_moe_blocks(8) == [5, 7]
    assert default_moe_blocks(7) == [3, 5]
    assert default_moe_blocks(1) == []


def test_vmoe_defaults():
    model = create_model("vmoe_tiny_32")
    assert model.moe_blocks == [7, 9, 11]
    for i, block in enumerate(model.blocks):
        assert isinstance(block.mlp, MoEMLP) == (i in (7, 9, 11))
    layer = model.blocks[7].mlp
    assert layer.num_experts == VMOE_OPTIONS["num_experts"] == 8
    assert isinstance(layer.router, TokenChoiceRouter)
    assert (layer.router.k, layer.router.capacity_factor, layer.router.capacity_multiple) == (2, 1.05, 4)
    assert layer.group_size is None
    assert layer.experts.hidden_dim == 4 * 192


@pytest.mark.parametrize("name, slots_per_expert", [("softmoe_vit_tiny_32", 8), ("softmoe_vit_tiny", 25)])
def test_softmoe_slots_about_equal_tokens(name, slots_per_expert):
    model = create_model(name)
    layer = model.blocks[11].mlp
    assert isinstance(layer, SoftMoEMLP)
    assert layer.num_experts == 8
    assert layer.router.slots_per_expert == slots_per_expert == round(model.num_tokens / 8)


def test_entrypoint_keyword_overrides():
    model = create_model("vmoe_tiny_32", num_classes=5, depth=4, moe=dict(num_experts=4))
    assert model.head.out_features == 5
    assert model.moe_blocks == [3]
    layer = model.blocks[3].mlp
    assert layer.num_experts == 4 and layer.router.k == 2  # the other V-MoE options stay

    model = create_model(
        "vmoe_tiny_32", depth=2, moe_blocks=[0, 1], moe=dict(router="expert_choice", capacity_factor=1.0)
    )
    assert model.moe_blocks == [0, 1]
    assert isinstance(model.blocks[0].mlp.router, ExpertChoiceRouter)
    assert model.blocks[0].mlp.num_experts == 8

    model = create_model("softmoe_vit_tiny_32", depth=2, moe_blocks=[1], moe=dict(num_experts=4, slots_per_expert=1))
    assert model.blocks[1].mlp.router.slots_per_expert == 1


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'vit_gigantic'.*vit_tiny.*vmoe_tiny_32"):
        create_model("vit_gigantic")


def test_aux_losses_reach_the_routers():
    model = create_model("vmoe_tiny_32", depth=4, moe_blocks=[1, 3]).train()
    model(images_for(model, batch=2))
    losses = aux_losses(model)
    assert set(losses) == {"importance", "load", "switch", "z_loss"}
    sum(losses.values()).backward()
    for i in (1, 3):
        grad = model.blocks[i].mlp.router.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the auxiliary losses do not depend on the head


def test_vmoe_compiles_without_graph_breaks():
    model = create_model("vmoe_tiny_32").eval()
    x = images_for(model, batch=2)
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)


def test_vision_transformer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="img_size .* multiple of patch_size"):
        VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="embed_dim .* multiple of num_heads"):
        VisionTransformer(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        VisionTransformer(depth=0)
    with pytest.raises(ValueError, match=r"moe_blocks must hold block indices in \[0, 2\), got 2"):
        VisionTransformer(img_size=32, patch_size=4, depth=2, moe_blocks=[2], moe=dict(num_experts=2))
    with pytest.raises(ValueError, match="moe_blocks has duplicate"):
        VisionTransformer(img_size=32, patch_size=4, depth=2, moe_blocks=[1, 1], moe=dict(num_experts=2))
    with pytest.raises(ValueError, match="moe must give num_experts"):
        VisionTransformer(img_size=32, patch_size=4, depth=2, moe_blocks=[1])
    with pytest.raises(ValueError, match="moe_layer must be one of"):
        VisionTransformer(
            img_size=32, patch_size=4, depth=2, moe_blocks=[1], moe=dict(num_experts=2), moe_layer="dense"
        )
    model = create_model("vit_tiny_32", depth=1)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 32, 32\], got \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))


def _assert_experts_copy(layer: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> None:
    experts = layer.experts
    for e in range(experts.num_experts):
        assert torch.equal(experts.w1[e], fc1.weight.t())
        assert torch.equal(experts.b1[e], fc1.bias)
        assert torch.equal(experts.w2[e], fc2.weight.t())
        assert torch.equal(experts.b2[e], fc2.bias)


@pytest.mark.parametrize("moe_layer", ["sparse", "soft"])
def test_upcycle_copies_the_dense_weights(moe_layer):
    dense = create_model("vit_tiny_32", depth=4)
    model = upcycle(dense, moe_layer=moe_layer, num_experts=4)
    assert model.moe_blocks == [3]
    dense_state = dense.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith("blocks.3.mlp."):
            assert torch.equal(value, dense_state[name]), name
    _assert_experts_copy(model.blocks[3].mlp, dense.blocks[3].mlp.fc1, dense.blocks[3].mlp.fc2)
    assert isinstance(dense.blocks[3].mlp.fc1, nn.Linear)  # the dense model is left unchanged


def test_upcycled_top1_model_computes_the_dense_model():
    dense = create_model("vit_tiny_32", depth=4).eval()
    x = images_for(dense, batch=3)
    model = upcycle(dense, moe_blocks=[1, 3], **EXACT_UPCYCLING)
    assert not model.training
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert model.blocks[3].mlp.last_metrics.dropped_fraction == 0


def test_upcycle_keeps_dtype_and_rejects_bad_input():
    dense = create_model("vit_tiny_32", depth=2).double()
    model = upcycle(dense, num_experts=2)
    assert model.blocks[1].mlp.experts.w1.dtype == torch.float64 and model.pos_embed.dtype == torch.float64
    with pytest.raises(ValueError, match=r"dense_model has MoE layers in blocks \[1\]"):
        upcycle(model, moe_blocks=[0], num_experts=2)
    with pytest.raises(TypeError, match="dense_model must be a visionmoe VisionTransformer"):
        upcycle(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="moe_blocks must hold block indices"):
        upcycle(dense, moe_blocks=[5])

    class ViTWithExtraParameter(VisionTransformer):
        def __init__(self, **config):
            super().__init__(**config)
            self.scale = nn.Parameter(torch.ones(()))

    with pytest.raises(ValueError, match=r"dense_model's parameters \['scale'\] have no place"):
        upcycle(ViTWithExtraParameter(**dense.config), num_experts=2)


class TimmLikeMlp(nn.Module):
    """timm's Mlp layout: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, dim, hidden_dim, act=None, norm=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act or nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = norm or nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmLikeBlock(nn.Module):
    def __init__(self, dim, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.ls1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        self.ls2 = nn.Identity()

    def forward(self, x):
        normed = self.norm1(x)
        x = x + self.ls1(self.attn(normed, normed, normed, need_weights=False)[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmLikeViT(nn.Module):
    """A stand-in for timm's VisionTransformer (not a dependency): tokens [B, N, D] -> logits [B, classes]."""

    def __init__(self, dim=16, depth=4, num_classes=3, mlps=None):
        super().__init__()
        self.blocks = nn.Sequential(
            *(TimmLikeBlock(dim, mlps[i] if mlps and i in mlps else TimmLikeMlp(dim, 2 * dim)) for i in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def test_moeify_timm_like_model():
    model = TimmLikeViT().eval()
    dense_mlps = {i: model.blocks[i].mlp for i in range(4)}
    tokens = torch.randn(2, 5, 16)
    expected = model(tokens)
    assert moeify(model, blocks=[0, 2], **EXACT_UPCYCLING) is model
    for i in range(4):
        layer = model.blocks[i].mlp
        if i in (0, 2):
            assert isinstance(layer, MoEMLP) and not layer.training and layer.num_experts == 4
            _assert_experts_copy(layer, dense_mlps[i].fc1, dense_mlps[i].fc2)
        else:
            assert layer is dense_mlps[i]
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)

    model.train()
    loss = model(tokens).sum() + sum(aux_losses(model).values())
    loss.backward()
    assert model.blocks[2].mlp.router.proj.weight.grad.abs().sum() > 0


def test_moeify_our_vit_default_blocks():
    model = create_model("vit_tiny_32", depth=8).eval()
    x = images_for(model, batch=2)
    expected = model(x)
    moeify(model, **EXACT_UPCYCLING)
    assert model.moe_blocks == default_moe_blocks(8) == [5, 7]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    moeify(model, blocks=[0], num_experts=2)  # a further block, with the router's own defaults
    assert model.moe_blocks == [0, 5, 7]
    assert model.blocks[0].mlp.router.k == 1


def test_moeify_rejects_unconvertible_models():
    with pytest.raises(ValueError, match=r"model \(Linear\) has no .blocks"):
        moeify(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"blocks must hold block indices in \[0, 4\), got 4"):
        moeify(TimmLikeViT(), blocks=[4])

    sequential_mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    model = TimmLikeViT(mlps={1: sequential_mlp})
    with pytest.raises(ValueError, match=r"blocks\[1\].mlp \(Sequential\) must have nn.Linear attributes fc1 and fc2"):
        moeify(model, blocks=[0, 1])
    assert isinstance(model.blocks[0].mlp, TimmLikeMlp)  # nothing replaced when any chosen block fails

    model = TimmLikeViT(mlps={3: TimmLikeMlp(16, 32, act=nn.GELU(approximate="tanh"))})
    with pytest.raises(ValueError, match=r"blocks\[3\].mlp \(TimmLikeMlp\).act must be nn.GELU\(\) \(exact"):
        moeify(model)
    model = TimmLikeViT(mlps={3: TimmLikeMlp(16, 32, norm=nn.LayerNorm(32))})
    with pytest.raises(ValueError, match=r"blocks\[3\].mlp \(TimmLikeMlp\).norm .* would be lost"):
        moeify(model)

    model = moeify(TimmLikeViT(), blocks=[3], num_experts=2)
    with pytest.raises(ValueError, match=r"blocks\[3\].mlp \(MoEMLP\) must have nn.Linear attributes"):
        moeify(model, blocks=[3])
