"""MoE MLP layers: shapes, routing through every sparse router, upcycling, groups, aux losses, compile."""

import pytest
import torch
import torch.nn.functional as F

from visionmoe.layers import ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses

CAPACITY_ROUTERS = {
    "topk": dict(k=2, capacity_factor=1.0, batch_priority=True),
    "sinkhorn_topk": dict(k=1),
    "expert_choice": dict(),
    "sinkhorn_expert_choice": dict(),
    "sparse_expert_choice": dict(iterations=5),
    "sparse_topk": dict(iterations=5),
}


def dense_mlp_reference(layer, x):
    """What MoEMLP computes, written as plain loops: sum over each token's kept assignments of
    weight * expert_e(x_t)."""
    plan = layer.last_plan
    tokens = x.reshape(-1, x.shape[-1])
    y = torch.zeros_like(tokens)
    experts = layer.experts
    for a in torch.nonzero(plan.kept()).flatten().tolist():
        t = plan.sorted_token[a].item()
        e = plan.sorted_expert[a].item() // plan.num_groups
        hidden = F.gelu(tokens[t] @ experts.w1[e] + experts.b1[e])
        y[t] += plan.weight[a] * (hidden @ experts.w2[e] + experts.b2[e])
    return y.view_as(x)


@pytest.mark.parametrize("router", list(CAPACITY_ROUTERS))
@pytest.mark.parametrize("group_size", [None, 2])
def test_moe_mlp_computes_the_routed_mixture(router, group_size):
    torch.manual_seed(0)
    layer = MoEMLP(16, 24, 4, router, group_size=group_size, **CAPACITY_ROUTERS[router]).eval()
    x = torch.randn(4, 9, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense_mlp_reference(layer, x), atol=1e-5, rtol=1e-5)
    (y.square().mean() + sum(aux_losses(layer).values())).backward()
    assert all(p.grad is not None for p in layer.experts.parameters())
    assert layer.router.proj.weight.grad is not None and x.grad is not None


def test_silu_gated_experts():
    torch.manual_seed(0)
    experts = ExpertMLPs(3, 8, 5, "silu_gated")
    x = torch.randn(3, 4, 8)
    y = experts(x)
    for e in range(3):
        gate, value = (x[e] @ experts.w1[e] + experts.b1[e]).chunk(2, dim=-1)
        torch.testing.assert_close(y[e], (F.silu(gate) * value) @ experts.w2[e] + experts.b2[e])


def test_upcycled_layer_starts_as_the_dense_mlp():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    # K = 1, capacity for every token, weights renormalised to 1: every token gets exactly the dense output.
    layer = MoEMLP.from_dense(fc1, fc2, 4, "topk", k=1, capacity_factor=4.0, renormalize=True).eval()
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(layer(x), fc2(F.gelu(fc1(x))))
    with pytest.raises(ValueError, match="do not match D=16, F=8"):
        ExpertMLPs(4, 16, 8).load_dense_(fc1, fc2)


def test_soft_moe_mlp():
    torch.manual_seed(0)
    layer = SoftMoEMLP(16, 24, 4, slots_per_expert=2)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    # Reference: explicit dispatch and combine weights.
    logits = layer.router(x)[0].logits
    dispatch_w, combine_w = logits.softmax(dim=1), logits.softmax(dim=2)
    slots = torch.einsum("bts,btd->bsd", dispatch_w, x).view(3, 4, 2, 16).transpose(0, 1).reshape(4, 6, 16)
    out = layer.experts(slots).view(4, 3, 2, 16).transpose(0, 1).reshape(3, 8, 16)
    torch.testing.assert_close(y, torch.einsum("bts,bsd->btd", combine_w, out), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert layer.router.phi.grad is not None


def test_dropped_tokens_get_zeros():
    torch.manual_seed(0)
    layer = MoEMLP(8, 8, 2, "topk", k=1, capacity_factor=0.25).eval()  # C = ceil(20 * 0.25 / 2) = 3
    x = torch.randn(1, 20, 8)
    y = layer(x)
    reached = torch.zeros(20).index_add(0, layer.last_plan.sorted_token, layer.last_plan.kept().float())
    assert reached.sum().item() == 6
    assert not y[0, reached == 0].any() and y[0, reached > 0].abs().sum(-1).gt(0).all()


def test_compile_fullgraph():
    torch._dynamo.reset()
    layer = MoEMLP(16, 24, 4, "topk", k=2, capacity_factor=1.0).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(compiled(x), layer(x))


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="use SoftMoEMLP"):
        MoEMLP(8, 8, 2, "soft")
    with pytest.raises(ValueError, match="activation must be one of"):
        MoEMLP(8, 8, 2, activation="relu")
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        MoEMLP(8, 8, 2, group_size=0)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, D\] with D = 8"):
        MoEMLP(8, 8, 2)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="batch size 3 is not a multiple of group_size=2"):
        MoEMLP(8, 8, 2, group_size=2)(torch.randn(3, 4, 8))


def test_aux_losses_sum_over_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoEMLP(8, 8, 2, "topk"), MoEMLP(8, 8, 2, "topk"))
    model(torch.randn(2, 5, 8))
    first, second = (layer.last_metrics.aux_losses["importance"] for layer in model)
    torch.testing.assert_close(aux_losses(model)["importance"], first + second)


@pytest.mark.parametrize("router,options", [("topk", dict(k=2, capacity_factor=None)), ("hindsight", {})])
def test_dropless_and_hindsight_layers(router, options):
    torch.manual_seed(0)
    layer = MoEMLP(16, 24, 4, router, group_size=2, **options).eval()
    x = torch.randn(4, 9, 16, requires_grad=True)
    y = layer(x)
    assert layer.last_plan.capacity is None
    torch.testing.assert_close(y, dense_mlp_reference(layer, x), atol=1e-5, rtol=1e-5)
    y.square().mean().backward()
    assert all(p.grad is not None for p in layer.experts.parameters())
    if router == "hindsight":
        # Each token receives exactly one expert's output (weight 1), chosen from the outputs.
        per_token = torch.zeros(36).index_add(0, layer.last_plan.sorted_token, layer.last_plan.weight.detach())
        torch.testing.assert_close(per_token, torch.ones(36))
        assert layer.router.scorer.weight.grad is not None
