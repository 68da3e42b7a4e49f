"""MoE blocks for CNNs (ConvMoE), the ResNet-MoE models, the DDR diversity loss and the expert-class report."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from visionmoe.layers import ConvMoE, SlotBatchNorm2d, aux_losses
from visionmoe.losses import diversity_loss
from visionmoe.metrics import expert_class_usage
from visionmoe.models import create_model, list_models, register_model


def _layer(gating="image", expert="basic", **options):
    options.setdefault("noise_std", 0.0)
    return ConvMoE(8, 16, 4, k=2, stride=2, expert=expert, gating=gating, **options)


@pytest.mark.parametrize("gating", ["image", "location"])
@pytest.mark.parametrize("expert", ["basic", "bottleneck"])
def test_forward_backward(gating, expert):
    layer = _layer(gating, expert, noise_std=1.0)
    x = torch.randn(6, 8, 7, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == (6, 16, 4, 4)
    (y.square().mean() + sum(aux_losses(layer).values())).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert layer.router.proj.weight.grad.abs().sum() > 0
    expected_weights = (6, 4) if gating == "image" else (6, 4, 4, 4)
    assert layer.last_gate_weights.shape == expected_weights


@pytest.mark.parametrize("gating", ["image", "location"])
def test_output_is_the_gated_mixture_of_expert_blocks(gating):
    # In eval mode batch norm is per image, so the routed computation must equal running every expert on every
    # image and mixing with the reported gate weights.
    layer = _layer(gating).eval()
    x = torch.randn(6, 8, 7, 7)
    y = layer(x)
    weights = layer.last_gate_weights
    if gating == "image":
        weights = weights[:, :, None, None]
    per_image_k = (weights > 0).sum(dim=1)
    assert (per_image_k <= 2).all()
    mixture = sum(weights[:, e : e + 1] * body(x) for e, body in enumerate(layer.experts))
    torch.testing.assert_close(y, F.relu(layer.shortcut(x) + mixture), rtol=1e-5, atol=1e-5)


def test_image_gating_runs_each_expert_on_its_capacity_only():
    layer = _layer(capacity_factor=1.0)  # C = ceil(K * B / E) = 4 of the B = 8 images
    batch_sizes = []
    for body in layer.experts:
        body.convs[0].register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    layer(torch.randn(8, 8, 6, 6))
    assert batch_sizes == [4, 4, 4, 4]


def test_an_unchosen_expert_gets_no_image_and_keeps_its_statistics():
    layer = _layer(constraint="absolute_importance", constraint_threshold=0.1).train()
    layer.router.importance_statistic.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    norm = layer.experts[0].norms[0]
    running_mean, running_var = norm.running_mean.clone(), norm.running_var.clone()
    layer(torch.randn(8, 8, 6, 6))
    assert (layer.last_gate_weights[:, 0] == 0).all()
    assert (layer.last_gate_weights[:, 1:].sum(dim=1) > 0).all()
    assert torch.equal(norm.running_mean, running_mean) and torch.equal(norm.running_var, running_var)
    assert not torch.equal(layer.experts[1].norms[0].running_mean, torch.zeros(16))


def test_slot_batch_norm_normalises_over_the_valid_slots():
    norm, reference = SlotBatchNorm2d(5), torch.nn.BatchNorm2d(5)
    x = torch.randn(6, 5, 3, 3)
    valid = torch.tensor([True, False, True, True, False, True])
    y = norm(x, valid)
    torch.testing.assert_close(y[valid], reference(x[valid]))
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    torch.testing.assert_close(norm.running_var, reference.running_var)
    before = norm.running_mean.clone()
    norm(x, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(norm.running_mean, before)


@pytest.mark.parametrize("gating", ["image", "location"])
def test_soft_constraint_losses_reach_the_gate(gating):
    layer = _layer(gating, noise_std=1.0).train()
    layer(torch.randn(6, 8, 7, 7))
    losses = aux_losses(layer)
    assert {"importance", "load", "switch", "z_loss"} <= set(losses)
    losses["importance"].backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0


def test_relative_importance_constraint_statistic():
    layer = _layer(constraint="relative_importance", capacity_factor=2.0).train()  # C = B: nothing dropped
    x = torch.randn(8, 8, 6, 6)
    layer(x)
    first_share = layer.last_gate_weights.sum(dim=0) / 8
    torch.testing.assert_close(layer.router.importance_statistic, 4 * first_share - 1)
    excluded = layer.router.excluded_experts()
    assert excluded.any()  # with 8 images, some expert got more than its share by over 0.1
    layer(x)
    second_share = layer.last_gate_weights.sum(dim=0) / 8
    assert (second_share[excluded] == 0).all()
    torch.testing.assert_close(layer.router.importance_statistic, 4 * first_share - 1 + 4 * second_share - 1)


def test_absolute_importance_constraint_statistic_is_a_running_mean():
    layer = _layer(constraint="absolute_importance", capacity_factor=2.0).train()
    shares = []
    for _ in range(2):
        layer(torch.randn(8, 8, 6, 6))
        shares.append(layer.last_gate_weights.sum(dim=0) / 8)
    torch.testing.assert_close(layer.router.importance_statistic, (shares[0] + shares[1]) / 2 - 0.25)


def test_hard_constraint_excludes_at_most_e_minus_k_and_only_in_training():
    layer = _layer(gating="location", constraint="relative_importance", constraint_threshold=0.1)
    layer.router.importance_statistic.copy_(torch.tensor([0.2, 3.0, 0.5, 1.0]))
    assert layer.router.excluded_experts().tolist() == [False, True, False, True]  # the E - K = 2 largest
    x = torch.randn(4, 8, 6, 6)
    layer.train()(x)
    assert (layer.last_gate_weights[:, [1, 3]] == 0).all()
    layer.router.importance_statistic.copy_(torch.tensor([0.2, 3.0, 0.5, 1.0]))
    layer.eval()(x)
    assert layer.router.excluded_experts().tolist() == [False, True, False, True]
    assert layer.last_gate_weights[:, [1, 3]].sum() > 0  # no constraint at inference


@pytest.mark.parametrize("gating", ["image", "location"])
def test_trains_under_bfloat16_autocast(gating):
    # The batch norms of capacity-padded batches keep float32 statistics, as nn.BatchNorm2d does under autocast.
    layer = _layer(gating).train()
    reference = copy.deepcopy(layer)
    x = torch.randn(6, 8, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    reference(x)
    for norm, expected in zip(layer.experts[0].norms, reference.experts[0].norms):
        assert norm.running_mean.dtype == torch.float32
        torch.testing.assert_close(norm.running_mean, expected.running_mean, rtol=0.05, atol=0.02)


def test_switch_loss_counts_the_admitted_experts_under_the_hard_constraint():
    # Expert 1 is excluded, so no location is sent to it even where its probability is the highest: the Switch
    # loss counts each location's first choice among the admitted experts.
    layer = _layer(gating="location", constraint="relative_importance", noise_std=0.0)
    layer.router.importance_statistic.copy_(torch.tensor([0.0, 3.0, 0.0, 0.0]))
    with torch.no_grad():
        layer.router.proj.weight[1] = 1.0  # the inputs are positive: expert 1 has the largest logit everywhere
    layer.train()(torch.rand(4, 8, 6, 6))
    metrics = layer.last_metrics
    sent_to = layer.last_gate_weights.argmax(dim=1).flatten()  # K = 1: the one expert of each location
    assert 1 not in sent_to.tolist() and metrics.probs.argmax(-1).eq(1).all()
    fraction = torch.bincount(sent_to, minlength=4).float() / sent_to.numel()
    expected = 4 * (fraction * metrics.probs[0].mean(0)).sum()
    torch.testing.assert_close(metrics.aux_losses["switch"], expected)


@pytest.mark.parametrize("gating, constraint", [("image", None), ("location", None), ("image", "relative_importance")])
def test_compiles_without_graph_breaks(gating, constraint):
    layer = _layer(gating, constraint=constraint).train()
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 8, 7, 7, requires_grad=True)
    for _ in range(2):  # the second step routes with the state (statistics, running averages) the first left
        y = compiled(x)
        y.sum().backward()
        grad, x.grad = x.grad, None
        expected = reference(x)
        expected.sum().backward()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-5)
        x.grad = None
    torch.testing.assert_close(layer.state_dict(), reference.state_dict())


def test_models_are_registered():
    assert {"resnet18_moe", "resnet18_moe_32", "resnet50_moe", "resnet50_moe_32"} <= set(list_models())


@pytest.mark.parametrize("name", [n for n in list_models() if "resnet" in n])
def test_model_trains_a_step_at_32x32(name):
    model = create_model(name, num_classes=10).train()
    moe_blocks = [m for m in model.modules() if isinstance(m, ConvMoE)]
    assert len(moe_blocks) == len(model.stages[-1])  # the default: the last stage's blocks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 10)
    losses = aux_losses(model)
    assert "importance" in losses
    loss = F.cross_entropy(logits, labels) + 0.01 * sum(losses.values())
    loss.backward()
    gate = moe_blocks[0].router.proj.weight
    before = gate.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(gate, before)


def test_model_options():
    model = create_model("resnet18_moe_32", moe_blocks=[(2, 0)], gating="location", num_experts=2, k=1)
    assert isinstance(model.stages[2][0], ConvMoE) and model.stages[2][0].gating == "location"
    assert sum(isinstance(m, ConvMoE) for m in model.modules()) == 1
    assert not any(isinstance(m, ConvMoE) for m in create_model("resnet18_moe_32", moe_blocks=[]).modules())


def test_diversity_loss_hand_cases():
    assert diversity_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == 0.0  # a partition
    torch.testing.assert_close(diversity_loss(torch.tensor([[0.5, 0.5], [0.5, 0.5]])), torch.tensor(1.0))
    torch.testing.assert_close(diversity_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]])), torch.tensor(1 / math.sqrt(2)))
    # Columns (1, 1), (0, 1), (0, 0): cos = 1/sqrt(2), 0, 0 over 3 pairs, each counted twice, / (E (E - 1)) = 6.
    three = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], requires_grad=True)
    loss = diversity_loss(three)
    torch.testing.assert_close(loss, torch.tensor(2 / math.sqrt(2) / 6))
    loss.backward()
    assert torch.isfinite(three.grad).all()
    groups = torch.stack([torch.eye(2), torch.full((2, 2), 0.5)])
    torch.testing.assert_close(diversity_loss(groups), torch.tensor(0.5))  # groups are averaged
    assert diversity_loss(torch.ones(3, 1)).item() == 0.0


def test_diversity_loss_pushes_experts_apart():
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6]], requires_grad=True)
    diversity_loss(probs).backward()
    # Lowering the loss means each token moving towards its own expert.
    assert probs.grad[0, 0] < 0 and probs.grad[1, 1] < 0


def test_diversity_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="assignments"):
        diversity_loss(torch.tensor([[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match="assignments"):
        diversity_loss(torch.zeros(2, 2, 2, 2))


def test_expert_class_usage_counts_and_weights():
    counts = expert_class_usage(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1]), 3, 2)
    assert counts.tolist() == [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    usage = expert_class_usage(weights, torch.tensor([1, 0]), 2, 3)
    assert usage.tolist() == [[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]]


def test_expert_class_usage_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        expert_class_usage(torch.tensor([0, 1]), torch.tensor([0, 5]), 2, 3)
    with pytest.raises(ValueError, match="assignments"):
        expert_class_usage(torch.tensor([0, 2]), torch.tensor([0, 1]), 2, 3)
    with pytest.raises(ValueError, match="same B images"):
        expert_class_usage(torch.tensor([0]), torch.tensor([0, 1]), 2, 3)
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        expert_class_usage(torch.rand(2, 3), torch.tensor([0, 1]), 2, 3)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(gating="pixel"), "gating must be one of"),
        (dict(expert="dense"), "expert must be one of"),
        (dict(constraint="soft"), "constraint must be None or one of"),
        (dict(constraint="relative_importance", constraint_threshold=-1.0), "constraint_threshold"),
        (dict(gating="location", capacity_factor=1.0), "capacity_factor applies to image gating only"),
        (dict(expert_width=0), "expert_width"),
    ],
)
def test_bad_layer_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        _layer(**options)


def test_bad_model_requests_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'resnet7_moe'; available: .*resnet18_moe"):
        create_model("resnet7_moe")
    with pytest.raises(ValueError, match="moe_blocks entry"):
        create_model("resnet18_moe_32", moe_blocks=[(3, 2)])
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18_moe", stem="tiny")
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18_moe")(lambda: None)
    with pytest.raises(ValueError, match=r"x must have shape \[B, Ci, H, W\]"):
        _layer()(torch.randn(2, 3, 5, 5))


def test_slot_batch_norm_rejects_a_cumulative_momentum():
    with pytest.raises(TypeError, match="momentum"):
        SlotBatchNorm2d(4, momentum=None)
