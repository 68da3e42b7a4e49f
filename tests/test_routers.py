"""Router modules: every registered router builds by name, routes, reports metrics, trains, and compiles;
options and inputs are validated."""

import math

import pytest
import torch

import visionmoe
from visionmoe import ops
from visionmoe import reference as ref
from visionmoe.routers import capacity_from_factor, create_router, list_routers

# Options that make each router's forward self-contained at the test sizes.
OPTIONS = {"soft": dict(slots_per_expert=2)}
SPARSE = ["topk", "sinkhorn_topk", "expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice", "sparse_topk"]


def make(name, dim=16, num_experts=4, **options):
    torch.manual_seed(0)
    return create_router(name, dim, num_experts, **{**OPTIONS.get(name, {}), **options})


def test_all_routers_are_registered():
    expected = {"topk", "sinkhorn_topk", "expert_choice", "sinkhorn_expert_choice"}
    assert expected <= set(list_routers())
    with pytest.raises(ValueError, match="unknown router 'nope'; available: "):
        create_router("nope", 8, 2)


@pytest.mark.parametrize("name", [n for n in list_routers() if n != "hindsight"])
def test_forward_metrics_and_training_step(name):
    router = make(name).train()
    x = torch.randn(3, 10, 16, requires_grad=True)
    plan, metrics = router(x)
    assert metrics.probs.shape == (3, 10, 4)
    torch.testing.assert_close(metrics.probs.sum(-1), torch.ones(3, 10))
    assert metrics.load.shape == (4,)
    assert 0 <= metrics.dropped_fraction.item() <= 1 and 0 <= metrics.unrouted_fraction.item() <= 1
    if name in SPARSE:
        assert plan.num_groups == 3 and plan.num_experts == 12 and plan.token_offsets.shape == (31,)
        loss = (
            ops.combine(
                ops.dispatch(x.reshape(30, 16), plan, "padded" if plan.capacity is not None else "packed"), plan, 30
            )
            .square()
            .mean()
        )
    else:
        loss = plan.combine(plan.dispatch(x)).square().mean()
    loss = loss + sum(metrics.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in router.parameters())


@pytest.mark.parametrize("name", [n for n in list_routers() if n != "hindsight"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    router = make(name).eval()
    compiled = torch.compile(router, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 12, 16)
    plan, metrics = compiled(x)
    expected_plan, expected_metrics = router(x)
    torch.testing.assert_close(metrics.probs, expected_metrics.probs)
    if name in SPARSE:
        assert torch.equal(plan.sorted_token, expected_plan.sorted_token)
        torch.testing.assert_close(plan.weight, expected_plan.weight)


def test_token_choice_matches_reference_operators():
    router = make("topk", k=2, capacity_factor=1.0, batch_priority=True, renormalize=True).eval()
    x = torch.randn(2, 40, 16)
    plan, metrics = router(x)
    expected = ref.topk_route(metrics.probs, 2, router.capacity(40), batch_priority=True, renormalize=True)
    assert torch.equal(plan.sorted_token, expected.sorted_token) and torch.equal(plan.slot, expected.slot)
    torch.testing.assert_close(plan.weight, expected.weight)


def test_capacity_formula_and_rounding():
    # C = ceil(K * T * cf / E): K=2, T=100, cf=1.25, E=8 -> ceil(31.25) = 32; rounded to a multiple of 4: 32.
    assert capacity_from_factor(2 * 100, 8, 1.25) == 32
    # K=1, T=10, cf=1.0, E=4 -> ceil(2.5) = 3; to a multiple of 4 -> 4.
    assert capacity_from_factor(10, 4, 1.0, multiple=4) == 4
    router = make("topk", k=2, capacity_factor=1.25, capacity_multiple=4)
    assert router.capacity(100) == math.ceil(2 * 100 * 1.25 / 4 / 4) * 4


@pytest.mark.parametrize("name", ["topk", "expert_choice", "sparse_expert_choice", "sparse_topk"])
def test_capacity_factor_beyond_the_number_of_experts_is_rejected(name):
    # At E every expert has room for every token of its group; 1e30 (from a config) once failed mid-training.
    with pytest.raises(ValueError, match="capacity_factor must be > 0 and <= 4"):
        create_router(name, 16, 4, capacity_factor=1e30)
    assert create_router(name, 16, 4, capacity_factor=4.0).capacity_factor == 4.0


def test_capacity_larger_than_tokens():
    # C = ceil(5 * 4 / 4) = 5 rounded up to 8 > T = 5
    router = make("expert_choice", capacity_factor=4.0, capacity_multiple=4).eval()
    plan, _ = router(torch.randn(1, 5, 16))
    assert plan.capacity == 8 and plan.num_assignments == 4 * 5  # each expert takes all 5 tokens
    hidden = ops.dispatch(torch.randn(5, 16), plan, "padded")
    assert hidden.shape == (4, 8, 16) and not hidden[:, 5:].any()


def test_noise_only_in_training_and_load_loss():
    router = make("topk", noise_std=1.0)
    x = torch.randn(1, 50, 16)
    router.eval()
    _, first = router(x)
    _, second = router(x)
    assert torch.equal(first.logits, second.logits) and "load" not in first.aux_losses
    router.train()
    _, noisy = router(x)
    assert not torch.equal(noisy.logits, first.logits) and "load" in noisy.aux_losses


def test_dropless_token_choice_keeps_everything():
    router = make("topk", k=2, capacity_factor=None).eval()
    plan, metrics = router(torch.randn(2, 30, 16))
    assert plan.capacity is None and metrics.dropped_fraction.item() == 0.0
    assert plan.expert_load().sum().item() == 2 * 30 * 2


@pytest.mark.parametrize("name", ["topk", "sinkhorn_topk", "expert_choice", "sinkhorn_expert_choice"])
def test_bad_options_are_rejected(name):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        make(name, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        make(name, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="capacity_multiple must be >= 1"):
        make(name, capacity_multiple=0)


def test_k_larger_than_experts_is_rejected():
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\], got 5"):
        make("topk", k=5)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        create_router("topk", 8, 0)


@pytest.mark.parametrize("name", ["topk", "expert_choice", "sinkhorn_topk"])
def test_non_finite_logits_are_rejected(name):
    router = make(name)
    x = torch.randn(1, 6, 16)
    x[0, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="router logits contain NaN or infinite values"):
        router(x)
    x[0, 2, 3] = float("inf")
    with pytest.raises(RuntimeError, match="router logits contain NaN or infinite values"):
        router(x)


def test_bad_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"x must have shape \[T, D\] or \[G, T, D\]"):
        make("topk")(torch.randn(16))


@pytest.mark.parametrize("name", ["topk", "expert_choice"])
def test_empty_input(name):
    plan, metrics = make(name).eval()(torch.randn(2, 0, 16))
    assert plan.num_assignments == 0 and metrics.load.sum().item() == 0
    assert metrics.unrouted_fraction.item() == 0 and metrics.aux_losses == {}


def test_groups_of_unequal_content():
    # One group whose tokens all prefer one expert, one balanced group: capacity applies per group.
    router = make("topk", k=1, capacity_factor=1.0).eval()
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0, 0] = 10.0
    x = torch.randn(2, 20, 16)
    x[0, :, 0] = 5.0  # group 0: every token's logit for expert 0 is large
    plan, metrics = router(x)
    counts = plan._virtual_counts().view(4, 2)  # [E, G]
    assert counts[0, 0].item() == 20  # all of group 0 wants expert 0 ...
    assert plan.expert_load().sum().item() <= 20 + 20
    kept = plan.kept()
    group0_expert0 = plan.sorted_expert == 0
    assert kept[group0_expert0].sum().item() == router.capacity(20)  # ... and only C = 5 of them fit
    assert metrics.dropped_fraction.item() > 0


def test_routers_are_importable_from_the_package():
    assert visionmoe.routers.create_router is create_router


@pytest.mark.parametrize("name", ["sinkhorn_topk", "sinkhorn_expert_choice"])
def test_sinkhorn_iterations_are_validated_and_used(name):
    with pytest.raises(ValueError, match="sinkhorn_iterations must be >= 0, got -1"):
        make(name, sinkhorn_iterations=-1)
    # With zero rounds the Sinkhorn scores are the logits themselves: selection runs on them, weights stay p.
    router = make(name, sinkhorn_iterations=0).eval()
    plan, metrics = router(torch.randn(1, 24, 16))
    if name == "sinkhorn_topk":
        expected = ops.topk_route(metrics.logits, 1, router.capacity(24), weights=metrics.probs)
    else:
        expected = ops.expert_choice_route(metrics.logits, router.capacity(24), weights=metrics.probs)
    assert torch.equal(plan.sorted_token, expected.sorted_token)
    torch.testing.assert_close(plan.weight, expected.weight)


@pytest.mark.parametrize("name", ["topk", "sinkhorn_topk", "expert_choice", "sinkhorn_expert_choice"])
def test_importance_loss_is_of_the_probabilities_without_noise(name):
    # V-MoE's test of its router: the importance loss is the same for two noise seeds (the noise only changes
    # which experts are selected), and equals the loss of softmax(x W).
    router = make(name, noise_std=1.0).train()
    x = torch.randn(2, 24, 16)
    torch.manual_seed(1)
    _, first = router(x)
    torch.manual_seed(2)
    _, second = router(x)
    assert not torch.equal(first.logits, second.logits)
    assert torch.equal(first.aux_losses["importance"], second.aux_losses["importance"])
    torch.testing.assert_close(
        first.aux_losses["importance"], visionmoe.losses.importance_loss(router.proj(x).softmax(dim=-1))
    )


def test_sinkhorn_switch_loss_counts_the_experts_tokens_were_sent_to():
    # Every token prefers expert 0, so the argmax of the probabilities is 0 everywhere, while the Sinkhorn scores
    # balance the choice: the Switch loss must count the experts the plan sends the tokens to.
    router = make("sinkhorn_topk", k=1, capacity_factor=None).eval()
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0, 0] = 1.0
    x = torch.randn(1, 32, 16)
    x[..., 0] = 2.0 + 0.1 * x[..., 0]
    plan, metrics = router(x)
    sent_to = torch.empty(32, dtype=torch.long)
    sent_to[plan.sorted_token] = plan.sorted_expert  # dropless, K = 1, one group: one assignment per token
    assert sent_to.unique().numel() > 1 and metrics.probs.argmax(-1).unique().tolist() == [0]
    fraction = torch.bincount(sent_to, minlength=4).float() / 32
    expected = 4 * (fraction * metrics.probs[0].mean(0)).sum()
    torch.testing.assert_close(metrics.aux_losses["switch"], expected)
