"""WhatWhereBlock, the WWT models and the ViT baseline's class-token attention maps."""

import math

import pytest
import torch

from visionmoe import reference
from visionmoe.layers import SLOT_UPDATES, WHERE_RESIDUALS, WhatWhereBlock
from visionmoe.layers.mlp import Mlp
from visionmoe.metrics import normalise_maps
from visionmoe.models import ObjectDiscovery, SlotAttentionClassifier, WhatWhereTransformer, create_model, list_models

B, N, S, D, H = 2, 6, 3, 8, 2


def make_block(last=False, **options):
    return WhatWhereBlock(
        D,
        H,
        S,
        slot_mlp=Mlp(D, 16),
        token_mlp=None if last else Mlp(D, 16),
        where_mlp=None if last else Mlp(H * S + D, 12, out_dim=H * S),
        **options,
    ).double()


def block_inputs():
    return (
        torch.randn(B, N, D, dtype=torch.float64),
        torch.randn(B, S, D, dtype=torch.float64),
        torch.randn(B, H, N, S, dtype=torch.float64),
    )


def test_reference_whatwhere_attention_by_hand():
    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4)
    v_tokens, v_slots, where = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 2)
    token_update, slot_update, logits = reference.whatwhere_attention(q, k, v_tokens, v_slots, where)
    expected_logits = torch.empty(3, 2)
    for n in range(3):
        for s in range(2):
            expected_logits[n, s] = where[0, 0, n, s] + (q[0, 0, n] * k[0, 0, s]).sum() / 2  # sqrt(dh) = 2
    torch.testing.assert_close(logits[0, 0], expected_logits)
    over_tokens, over_slots = expected_logits.softmax(dim=0), expected_logits.softmax(dim=1)
    torch.testing.assert_close(token_update[0, 0], over_tokens @ v_slots[0, 0])
    torch.testing.assert_close(slot_update[0, 0], over_slots.T @ v_tokens[0, 0])


@pytest.mark.parametrize("slot_update", SLOT_UPDATES)
@pytest.mark.parametrize("where_residual", WHERE_RESIDUALS)
def test_block_shapes_and_gradients(slot_update, where_residual):
    block = make_block(slot_update=slot_update, where_residual=where_residual)
    x, z, where = (t.requires_grad_() for t in block_inputs())
    x_out, z_out, where_out, logits = block(x, z, where)
    assert x_out.shape == (B, N, D) and z_out.shape == (B, S, D)
    assert where_out.shape == (B, H, N, S) and logits.shape == (B, H, N, S)
    (x_out.sum() + z_out.sum() + where_out.square().sum()).backward()
    for tensor in (x, z, where, *block.parameters()):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_block_logits_are_where_plus_scaled_dot_products():
    block = make_block()
    x, z, where = block_inputs()
    _, _, _, logits = block(x, z, where)
    q = block._heads(block.query(block.norm_tokens(x)))
    k = block._heads(block.key(block.norm_slots(z)))
    torch.testing.assert_close(logits, where + q @ k.transpose(-2, -1) / math.sqrt(D // H))


def test_where_residual_add_differs_from_replace_by_the_where_state():
    replace = make_block(where_residual="replace")
    add = make_block(where_residual="add")
    add.load_state_dict(replace.state_dict())
    x, z, where = block_inputs()
    torch.testing.assert_close(add(x, z, where)[2], replace(x, z, where)[2] + where)


def test_mean_slot_update_is_a_weighted_mean_of_token_values():
    # With a zero slot MLP and identity value/output projections, the slot update is visible in z directly.
    block = make_block(slot_update="mean")
    with torch.no_grad():
        block.value_tokens.weight.copy_(torch.eye(D))
        block.proj_slots.weight.copy_(torch.eye(D))
        block.proj_slots.bias.zero_()
        block.slot_mlp.fc2.weight.zero_()
        block.slot_mlp.fc2.bias.zero_()
    x, z, where = block_inputs()
    _, z_out, _, logits = block(x, z, where)
    weights = logits.softmax(dim=-1)  # [B, H, N, S]
    weights = weights / weights.sum(dim=-2, keepdim=True)  # each slot's weights over the tokens sum to 1
    values = block._heads(block.norm_tokens(x))
    expected = block._merge_heads(weights.transpose(-2, -1) @ values)
    torch.testing.assert_close(z_out - z, expected)


def test_slots_only_block_leaves_tokens_and_returns_no_where_state():
    block = make_block(last=True)
    x, z, where = block_inputs()
    x_out, z_out, where_out, logits = block(x, z, where)
    assert x_out is x and where_out is None
    assert z_out.shape == (B, S, D) and logits.shape == (B, H, N, S)
    assert not hasattr(block, "token_mlp") and not hasattr(block, "where_mlp")


def test_block_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="slot_update"):
        make_block(slot_update="sum")
    with pytest.raises(ValueError, match="where_residual"):
        make_block(where_residual="gated")
    with pytest.raises(ValueError, match="token_mlp and where_mlp"):
        WhatWhereBlock(D, H, S, slot_mlp=Mlp(D, 16), token_mlp=Mlp(D, 16), where_mlp=None)
    with pytest.raises(ValueError, match="num_heads"):
        WhatWhereBlock(D, 3, S, slot_mlp=Mlp(D, 16), token_mlp=None, where_mlp=None)
    block = make_block()
    x, z, where = block_inputs()
    with pytest.raises(ValueError, match="where"):
        block(x, z, where[..., :-1])
    with pytest.raises(ValueError, match="z"):
        block(x, z[:, :-1], where)


def test_wwt_models_are_registered_with_their_sizes():
    assert {"wwt_tiny", "wwt_small", "wwt_tiny_32", "wwt_small_32"} <= set(list_models())
    model = create_model("wwt_tiny_32", depth=2)
    assert isinstance(model, WhatWhereTransformer)
    assert model.slots.shape == (8, 192) and model.num_heads == 3
    assert model.patch_embed.num_patches == 64 and model.head.out_features == 10
    assert create_model("wwt_small", depth=1).slots.shape == (16, 384)


@pytest.mark.parametrize("options", [{}, dict(slot_update="mean", where_residual="add")])
def test_wwt_forward_backward_reaches_every_parameter(options):
    model = create_model("wwt_tiny_32", depth=3, embed_dim=32, num_heads=2, num_slots=4, **options)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    unreached = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or parameter.grad.abs().sum() == 0
    ]
    assert unreached == []


def test_discover_maps_masks_and_boxes():
    model = create_model("wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4).eval()
    images = torch.randn(3, 3, 32, 32)
    found = model.discover(images, threshold=0.3, readout="token_softmax")
    assert isinstance(found, ObjectDiscovery) and found.readout == "token_softmax"
    assert found.logits.shape == (3, 10) and found.slot_logits.shape == (3, 4, 10)
    assert found.where_maps.shape == (3, 2, 64, 4)
    assert found.slot_maps.shape == (3, 4, 32, 32) and found.masks.shape == (3, 4, 32, 32)
    assert found.boxes.shape == (3, 4, 4)
    torch.testing.assert_close(found.logits, model(images))
    torch.testing.assert_close(found.logits, found.slot_logits.mean(dim=1))
    # Slot s's map: its attention over the 8 x 8 patches (a softmax over N, averaged over the heads), upsampled.
    attention = found.where_maps.softmax(dim=2).mean(dim=1).transpose(1, 2).reshape(3, 4, 8, 8)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(3, 4))
    torch.testing.assert_close(found.slot_maps, torch.nn.functional.interpolate(attention, size=32, mode="bilinear"))
    torch.testing.assert_close(found.masks, normalise_maps(found.slot_maps) >= 0.3)
    assert found.masks.flatten(2).any(dim=-1).all()  # a rescaled map reaches 1 somewhere, unless it is constant
    torch.testing.assert_close(found.segments, normalise_maps(attention).argmax(dim=1))
    with pytest.raises(ValueError, match="threshold"):
        model.discover(images, threshold=1.5)
    with pytest.raises(ValueError, match="readout"):
        model.discover(images, readout="tokens")


def test_discover_reads_the_models_own_assignment_by_default():
    model = create_model("wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4).eval()
    images = torch.randn(3, 3, 32, 32)
    found = model.discover(images)
    assert found.readout == "assignment"
    # The assignment: the where-maps' softmax over the 4 slots, averaged over the heads; rows sum to 1.
    assignment = found.where_maps.softmax(dim=-1).mean(dim=1)  # [3, 64, 4]
    torch.testing.assert_close(found.segments, assignment.argmax(dim=-1).view(3, 8, 8))
    torch.testing.assert_close(found.slot_maps.sum(dim=1), torch.ones(3, 32, 32))
    # Masks: each 4 x 4 pixel patch in the mask of its argmax slot, so every pixel lies in exactly one mask.
    assert torch.equal(found.masks.sum(dim=1), torch.ones(3, 32, 32, dtype=torch.long))
    patch = found.segments[:, 2, 5]  # patch row 2, column 5 covers pixels rows 8-11, columns 20-23
    assert bool(found.masks[torch.arange(3), patch, 8:12, 20:24].all())


@pytest.mark.parametrize("readout", ["assignment", "token_softmax"])
def test_discover_boxes_surround_the_masks(readout):
    model = create_model("wwt_tiny_32", depth=1, embed_dim=16, num_heads=1, num_slots=2).eval()
    found = model.discover(torch.randn(4, 3, 32, 32), threshold=0.5, readout=readout)
    for masks, boxes in zip(found.masks.flatten(0, 1), found.boxes.flatten(0, 1)):
        if masks.any():
            rows, cols = masks.nonzero().unbind(1)
            assert boxes.tolist() == [
                cols.min().item(),
                rows.min().item(),
                cols.max().item() + 1,
                rows.max().item() + 1,
            ]
        else:
            assert boxes.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("variant", ["w0", "w1", "w3", "w12"])
def test_wwt_variants_train_every_parameter(variant):
    model = create_model("wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4, variant=variant)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 7])).backward()
    unreached = {name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    # A full last block's token FFN comes after its where stream has read the tokens, so it reaches no output.
    dead = {
        f"blocks.1.{name}"
        for name in (
            "norm_token_mlp.weight",
            "norm_token_mlp.bias",
            "token_mlp.fc1.weight",
            "token_mlp.fc1.bias",
            "token_mlp.fc2.weight",
            "token_mlp.fc2.bias",
        )
    }
    assert unreached == (dead if variant == "w12" else set())


def test_wwt_w2_final_maps_are_the_last_where_state():
    model = create_model("wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4, variant="w2").eval()
    images = torch.randn(2, 3, 32, 32)
    assert model.blocks[-1].updates_tokens
    tokens = model.patch_embed(images) + model.pos_embed
    slots = model.slots.expand(2, -1, -1)
    where = tokens.new_zeros(2, 2, 64, 4)
    for block in model.blocks:
        tokens, slots, where, _ = block(tokens, slots, where)
    torch.testing.assert_close(model.discover(images).where_maps, where)


def test_wwt_w1_head_weights_slot_logits_by_mean_assignment():
    model = create_model("wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4, variant="w1").eval()
    images = torch.randn(2, 3, 32, 32)
    found = model.discover(images)
    weights = found.where_maps.softmax(dim=-1).mean(dim=1).mean(dim=1)  # [B, S], each slot's mean assignment
    torch.testing.assert_close(model(images), (weights[:, :, None] * found.slot_logits).sum(dim=1))
    torch.testing.assert_close(found.logits, model(images))
    maxed = create_model(
        "wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4, variant="w1", head_pool="max"
    ).eval()
    found = maxed.discover(images)
    token_logits = found.where_maps.softmax(dim=-1).mean(dim=1) @ found.slot_logits  # [B, N, C]
    torch.testing.assert_close(maxed(images), token_logits.amax(dim=1))


def test_wwt_w3_samples_slots_per_image():
    model = create_model("wwt_tiny_32", depth=2, embed_dim=32, num_heads=2, num_slots=4, variant="w3").eval()
    assert not hasattr(model, "slots") and model.slots_mu.shape == (1, 1, 32)
    image = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    torch.manual_seed(0)
    first = model(image)
    assert not torch.allclose(first[0], first[1])  # one image, two draws of the slots
    torch.manual_seed(0)
    torch.testing.assert_close(model(image), first)  # reproducible under the global seed


def test_wwt_rejects_bad_configuration():
    with pytest.raises(ValueError, match="num_slots"):
        WhatWhereTransformer(num_slots=0)
    with pytest.raises(ValueError, match="patch_size"):
        WhatWhereTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="slot_update"):
        create_model("wwt_tiny_32", depth=1, slot_update="max")
    with pytest.raises(ValueError, match="variant"):
        create_model("wwt_tiny_32", depth=1, variant="w9")
    with pytest.raises(ValueError, match="head_pool"):
        create_model("wwt_tiny_32", depth=1, head_pool="sum")


def test_vit_class_token_attention_matches_the_last_block():
    model = create_model("vit_tiny_32", depth=2, embed_dim=32, num_heads=2).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = model.class_token_attention(images)
    assert maps.shape == (2, 8, 8)
    # Recompute by hand: the input of the last block, its normed queries and keys, the class token's row.
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images)], dim=1) + model.pos_embed
    normed = model.blocks[-1].norm1(model.blocks[0](tokens))
    q, k, _ = model.blocks[-1].attn.qkv(normed).view(2, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = (q[:, :, :1] @ k.transpose(-2, -1) / 4).softmax(dim=-1)  # [B, H, 1, 65], sqrt(16) = 4
    torch.testing.assert_close(maps, weights[:, :, 0, 1:].mean(dim=1).view(2, 8, 8))
    torch.testing.assert_close(model.class_token_attention(images, heads="all"), weights[:, :, 0, 1:].view(2, 2, 8, 8))
    with pytest.raises(ValueError, match="heads"):
        model.class_token_attention(images, heads="best")
    # The attention the block applies: the same weights reproduce scaled_dot_product_attention's output.
    attention = model.blocks[-1].attn
    v = attention.qkv(normed).view(2, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    out = (attention.attention_probabilities(normed) @ v).transpose(1, 2).reshape(2, 65, 32)
    torch.testing.assert_close(attention.proj(out), attention(normed))


def test_wwt_trains_with_visionmoe_train_on_digit_scenes(tmp_path):
    from visionmoe.train.cli import main

    overrides = [
        "model=wwt_tiny_32",
        "dataset=digit_scenes",
        "dataset_options.canvas_size=32",
        "dataset_options.digit_size=[10,14]",
        "dataset_options.length=8",
        "model_options.depth=2",
        "model_options.embed_dim=16",
        "model_options.num_heads=2",
        "epochs=1",
        "batch_size=4",
        f"output_dir={tmp_path}",
        "progress=false",
        "tensorboard=false",
    ]
    assert main([argument for override in overrides for argument in ("--set", override)]) == 0
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 2  # header and the one epoch


def test_slot_attention_baseline_trains_and_discovers():
    model = create_model("slot_attention_32", embed_dim=32, depth=1, num_heads=2, num_slots=4)
    assert isinstance(model, SlotAttentionClassifier) and model.slot_attention.iterations == 3
    images = torch.randn(3, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(images), torch.tensor([1, 7, 0])).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    model.eval()
    torch.manual_seed(1)
    found = model.discover(images)
    torch.manual_seed(1)
    torch.testing.assert_close(found.logits, model(images))  # slots are sampled: the same draw, the same logits
    assert found.where_maps.shape == (3, 1, 64, 4) and found.segments.shape == (3, 8, 8)
    weights = found.where_maps[:, 0].softmax(dim=-1).mean(dim=1)  # each slot's mean assignment [B, S]
    torch.testing.assert_close(found.logits, (weights[:, :, None] * found.slot_logits).sum(dim=1))
    assert torch.equal(found.masks.sum(dim=1), torch.ones(3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="head_pool"):
        create_model("slot_attention_32", head_pool="sum")
    with pytest.raises(ValueError, match="num_slots"):
        create_model("slot_attention_32", num_slots=0)
