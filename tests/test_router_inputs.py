"""Routers and layers reject bad options at construction, and bad inputs at forward, with errors naming the
option or input and what was expected; empty inputs route to empty outputs."""

import contextlib
import math
import re

import pytest
import torch

from visionmoe.layers import ConvMoE, MoEMLP, SoftMoEMLP
from visionmoe.routers import create_router, list_routers

NAN, INF = math.nan, math.inf

# (router, options, the error's start): non-finite numbers, and options of the wrong type.
BAD_ROUTER_OPTIONS = [
    ("topk", dict(capacity_multiple=NAN), "capacity_multiple must be an integer >= 1"),
    ("topk", dict(capacity_multiple=4.0), "capacity_multiple must be an integer >= 1"),
    ("topk", dict(capacity_factor=INF), "capacity_factor must be a finite number > 0"),
    ("topk", dict(capacity_factor=NAN), "capacity_factor must be a finite number > 0"),
    ("topk", dict(capacity_factor="1.0"), "capacity_factor must be a number > 0"),
    ("topk", dict(k=2.0), "k must be an integer in [1, 4]"),
    ("topk", dict(k="2"), "k must be an integer in [1, 4]"),
    ("topk", dict(k=True), "k must be an integer in [1, 4]"),
    ("topk", dict(noise_std=NAN), "noise_std must be a finite number >= 0"),
    ("topk", dict(noise_std=-INF), "noise_std must be a finite number >= 0"),
    ("topk", dict(batch_priority=1), "batch_priority must be True or False"),
    ("topk", dict(renormalize="yes"), "renormalize must be True or False"),
    ("topk", dict(check_finite=None), "check_finite must be True or False"),
    ("sinkhorn_topk", dict(sinkhorn_iterations="20"), "sinkhorn_iterations must be an integer >= 0"),
    ("sinkhorn_topk", dict(sinkhorn_iterations=True), "sinkhorn_iterations must be an integer >= 0"),
    ("expert_choice", dict(capacity_factor=None), "capacity_factor must be a number > 0"),
    ("expert_choice", dict(capacity_factor=INF), "capacity_factor must be a finite number > 0"),
    ("expert_choice", dict(noise_std=INF), "noise_std must be a finite number >= 0"),
    ("sinkhorn_expert_choice", dict(sinkhorn_iterations=2.5), "sinkhorn_iterations must be an integer >= 0"),
    ("sparse_expert_choice", dict(gamma=NAN), "gamma must be a finite number > 0"),
    ("sparse_expert_choice", dict(lr=INF), "lr must be a finite number > 0"),
    ("sparse_expert_choice", dict(capacity_multiple=NAN), "capacity_multiple must be an integer >= 1"),
    ("sparse_topk", dict(k=1.5), "k must be an integer in [1, 4]"),
    ("sparse_topk", dict(iterations="100"), "iterations must be an integer >= 1"),
    ("sparse_topk", dict(combine=None), "combine must be one of"),
    ("soft", dict(slots_per_expert=2.0), "slots_per_expert must be an integer >= 1"),
    (
        "soft",
        dict(slots_per_expert=None, num_tokens=16, capacity_factor=NAN),
        "capacity_factor must be a finite number > 0",
    ),
    ("soft", dict(noise_std=NAN), "noise_std must be a finite number >= 0"),
    ("hindsight", dict(tau=INF), "tau must be a finite number > 0"),
    ("hindsight", dict(output_dim=8.0), "output_dim must be an integer >= 1"),
]


@contextlib.contextmanager
def raises_option_error(message):
    """The error contract for options: a TypeError for an option of the wrong type (its message says "got <type>
    <value>"), a ValueError for one of the right type out of range."""
    with pytest.raises((TypeError, ValueError), match=message) as error:
        yield
    wrong_type = re.search(r", got [A-Za-z_]\w* ", str(error.value)) is not None
    assert isinstance(error.value, TypeError) == wrong_type, (type(error.value), str(error.value))
    assert not isinstance(error.value, TypeError) or not isinstance(error.value, ValueError)


@pytest.mark.parametrize("name, options, message", BAD_ROUTER_OPTIONS)
def test_bad_router_options_are_rejected_at_construction(name, options, message):
    options = {"slots_per_expert": 2, **options} if name == "soft" else options
    with raises_option_error("^" + message.replace("[", r"\[").replace("]", r"\]")):
        create_router(name, 8, 4, **options)


@pytest.mark.parametrize("name", list_routers())
@pytest.mark.parametrize(
    "dim, num_experts, message",
    [
        (8.0, 4, "dim must be an integer >= 1"),
        (8, "4", "num_experts must be an integer >= 1"),
        (True, 4, "dim must be an integer >= 1"),
    ],
)
def test_bad_router_sizes_are_rejected(name, dim, num_experts, message):
    with raises_option_error(message):
        create_router(name, dim, num_experts, **({"slots_per_expert": 1} if name == "soft" else {}))


def test_wrong_option_types_are_type_errors():
    with pytest.raises(TypeError, match="k must be an integer"):
        create_router("topk", 8, 4, k=2.0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MoEMLP(8, 16, 4, group_size=2.0), "group_size must be an integer >= 1"),
        (lambda: MoEMLP(8, 16.0, 4), "hidden_dim must be an integer >= 1"),
        (lambda: MoEMLP(8, 16, 4, capacity_factor=INF), "capacity_factor must be a finite number > 0"),
        (lambda: SoftMoEMLP(8, 16, 4, slots_per_expert=NAN), "slots_per_expert must be an integer >= 1"),
        (lambda: ConvMoE(3, 4, 4, k=1.0), r"k must be an integer in \[1, 4\]"),
        (lambda: ConvMoE(3, 4, 4, stride=2.0), "stride must be an integer >= 1"),
        (lambda: ConvMoE(3, 4, 4, capacity_factor=NAN), "capacity_factor must be a finite number > 0"),
        (
            lambda: ConvMoE(3, 4, 4, constraint="relative_importance", constraint_threshold=NAN),
            "constraint_threshold must be a finite number >= 0",
        ),
        (lambda: ConvMoE(3, 4, 4, renormalize=0), "renormalize must be True or False"),
    ],
)
def test_bad_layer_options_are_rejected_at_construction(build, message):
    with raises_option_error(message):
        build()


def make_router(name):
    return create_router(name, 8, 4, **({"slots_per_expert": 2} if name == "soft" else {}))


@pytest.mark.parametrize("name", list_routers())
def test_routers_name_a_wrong_width_or_dtype_of_x(name):
    router = make_router(name)
    with pytest.raises(ValueError, match=r"x must have width D = 8, got shape \(2, 5, 7\)"):
        router(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
        router(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        router([[0.0] * 8])
    if name in ("soft", "hindsight"):  # they cast their weights to x's dtype, or have none that x meets
        assert router(torch.randn(2, 5, 8, dtype=torch.float64))[0] is not None
    else:
        with pytest.raises(
            ValueError, match="x must have the dtype of the layer's weights, torch.float32, got torch.float64"
        ):
            router(torch.randn(2, 5, 8, dtype=torch.float64))


def test_under_autocast_any_floating_dtype_of_x_is_accepted():
    router = make_router("topk")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan, metrics = router(torch.randn(2, 5, 8, dtype=torch.bfloat16))
    assert metrics.probs.shape == (2, 5, 4)


@pytest.mark.parametrize(
    "layer, x, message",
    [
        (
            lambda: MoEMLP(8, 16, 4),
            torch.randn(2, 5, 8, dtype=torch.float64),
            ("x must have the dtype of the layer's weights, torch.float32, got torch.float64"),
        ),
        (
            lambda: MoEMLP(8, 16, 4, "expert_choice"),
            torch.ones(2, 5, 8, dtype=torch.long),
            "x must be a floating-point tensor",
        ),
        (
            lambda: SoftMoEMLP(8, 16, 4),
            torch.randn(2, 5, 8, dtype=torch.bfloat16),
            ("x must have the dtype of the layer's weights, torch.float32, got torch.bfloat16"),
        ),
        (lambda: SoftMoEMLP(8, 16, 4), torch.randn(2, 5, 6), r"x must have shape \[B, N, D\] with D = 8"),
        (
            lambda: ConvMoE(3, 4, 4),
            torch.randn(2, 3, 8, 8, dtype=torch.float64),
            ("x must have the dtype of the layer's weights, torch.float32, got torch.float64"),
        ),
        (
            lambda: ConvMoE(3, 4, 4, gating="location"),
            torch.ones(2, 3, 8, 8, dtype=torch.uint8),
            "x must be a floating-point tensor",
        ),
    ],
)
def test_layers_name_a_wrong_dtype_or_width_of_x(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer()(x)


@pytest.mark.parametrize("name", list_routers())
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (0, 0, 8), (0, 8)])
def test_routers_route_empty_inputs_to_empty_plans(name, training, shape):
    router = make_router(name).train(training)
    plan, metrics = router(torch.randn(shape))
    groups, tokens = (1, 0) if len(shape) == 2 else shape[:2]
    assert metrics.probs.shape == metrics.logits.shape == (groups, tokens, 4)
    assert metrics.load.tolist() == ([groups * 2.0] * 4 if name == "soft" else [0.0] * 4)  # Soft MoE: G * P
    assert metrics.dropped_fraction.item() == 0 and metrics.unrouted_fraction.item() == 0
    assert metrics.aux_losses == {}
    if name == "soft":
        return
    assert plan.num_assignments == 0 and plan.num_tokens == 0
    if name == "hindsight":
        chosen, choice = router.choose(plan, torch.randn(0, 8))
        assert chosen.num_assignments == 0 and choice.load.tolist() == [0.0] * 4 and choice.aux_losses == {}
        assert choice.unrouted_fraction.item() == 0


@pytest.mark.parametrize("router", [n for n in list_routers() if n != "soft"])
@pytest.mark.parametrize("group_size", [None, 1])
@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)])
def test_moe_mlp_maps_an_empty_batch_to_an_empty_output(router, group_size, shape):
    layer = MoEMLP(8, 16, 4, router, group_size=group_size).train()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape and layer.last_metrics.load.tolist() == [0.0] * 4
    y.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)])
def test_soft_moe_mlp_maps_an_empty_batch_to_an_empty_output(shape):
    layer = SoftMoEMLP(8, 16, 4, slots_per_expert=2)
    assert layer(torch.randn(shape)).shape == shape
    assert layer.last_metrics.probs.shape == (*shape[:2], 4)


@pytest.mark.parametrize("gating", ["image", "location"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_moe_maps_an_empty_batch_to_an_empty_output(gating, training):
    layer = ConvMoE(3, 4, 4, k=2, stride=2, gating=gating, constraint="relative_importance").train(training)
    statistic = layer.router.importance_statistic.clone()
    x = torch.randn(0, 3, 7, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 4, 4) and layer.last_gate_weights.shape[:2] == (0, 4)
    assert torch.equal(layer.router.importance_statistic, statistic)  # no image, no change of the statistic
    y.sum().backward()
    with pytest.raises(ValueError, match=r"x must have shape \[B, Ci, H, W\] with Ci = 3 and H, W >= 1"):
        layer(torch.randn(2, 3, 0, 7))
