"""Soft MoE dispatch and combine, and the Soft MoE router: reference agreement, accuracy, gradcheck, opcheck,
torch.compile, bad input, and router behaviour."""

import pytest
import torch
from op_contract import OpTester

from visionmoe import ops
from visionmoe import reference as ref
from visionmoe.routers import RouterMetrics, SoftRouter, SoftRoutingPlan, create_router, list_routers

# ops against the reference run in the same dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# ops in a reduced dtype against the float64 reference: a few roundings of that dtype on O(1) values.
ACCURACY = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}

OPS = {
    # name: (operator, reference, features shape from (G, T, S, D), output shape)
    "dispatch": (ops.soft_dispatch, ref.soft_dispatch, lambda G, T, S, D: (G, T, D), lambda G, T, S, D: (G, S, D)),
    "combine": (ops.soft_combine, ref.soft_combine, lambda G, T, S, D: (G, S, D), lambda G, T, S, D: (G, T, D)),
}

SHAPES = [
    # (G, T, S, D)
    (2, 7, 6, 5),
    (3, 1, 4, 3),  # one token: every slot is that token
    (1, 9, 1, 4),  # one slot: every token gets it
    (2, 33, 40, 17),  # more slots than tokens, odd width
    (4, 50, 16, 32),
]


def make_inputs(name, G, T, S, D, device, dtype, seed=0):
    """Features, logits (spread over a few units, so the softmaxes are far from uniform) and an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    _, _, features_shape, out_shape = OPS[name]
    features = torch.randn(features_shape(G, T, S, D), generator=generator, dtype=torch.float64)
    logits = 2 * torch.randn(G, T, S, generator=generator, dtype=torch.float64)
    grad = torch.randn(out_shape(G, T, S, D), generator=generator, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (features, logits, grad))


def transposed_storage(t):
    """The same values with other strides."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def run_with_grads(fn, features, logits, grad):
    features = features.detach().clone().requires_grad_()
    logits = logits.detach().clone().requires_grad_()
    out = fn(features, logits)
    out.backward(grad)
    return out.detach(), features.grad, logits.grad


def op_samples(device, contiguous):
    G, T, S, D = 2, 5, 4, 3
    x, logits, grad_slots = make_inputs("dispatch", G, T, S, D, device, torch.float32)
    y, _, grad_out = make_inputs("combine", G, T, S, D, device, torch.float32, seed=1)
    if not contiguous:
        x, logits, grad_slots, y, grad_out = map(transposed_storage, (x, logits, grad_slots, y, grad_out))
    return {
        "soft_dispatch": (x.requires_grad_(), logits.requires_grad_()),
        "soft_dispatch_backward": (grad_slots, x.detach(), logits.detach()),
        "soft_combine": (y.requires_grad_(), logits),
        "soft_combine_backward": (grad_out, y.detach(), logits.detach()),
    }


class SoftMoETester(OpTester):
    """Both operators take (features, logits); ``name`` picks which features make_inputs draws."""

    name = None
    dtypes = list(TOLERANCES)
    tolerances = TOLERANCES
    accuracy = ACCURACY
    cases = SHAPES
    gradcheck_cases = [(2, 5, 4, 3), (1, 1, 3, 2), (2, 3, 7, 2)]

    def sample_inputs(self, device, dtype, case):
        features, logits, _ = make_inputs(self.name, *case, device, dtype)
        return features.requires_grad_(), logits.requires_grad_()

    op_samples = staticmethod(op_samples)

    def compile_inputs(self, device):
        # A second size must reuse the dynamic graph, not break it.
        return [self.sample_inputs(device, torch.float32, (G, T, S, 8)) for G, T, S in ((2, 12, 6), (3, 17, 9))]

    def determinism_inputs(self, device):
        return self.sample_inputs(device, torch.float32, (8, 196, 32, 64))


class TestSoftDispatch(SoftMoETester):
    name = "dispatch"
    op = staticmethod(ops.soft_dispatch)
    reference = staticmethod(ref.soft_dispatch)
    opcheck_cases = [
        (name, contiguous) for name in ("soft_dispatch", "soft_dispatch_backward") for contiguous in (True, False)
    ]

    def compile_fn(self, x, logits):
        return torch.relu(ops.soft_dispatch(x, logits)) * 2


class TestSoftCombine(SoftMoETester):
    name = "combine"
    op = staticmethod(ops.soft_combine)
    reference = staticmethod(ref.soft_combine)
    opcheck_cases = [
        (name, contiguous) for name in ("soft_combine", "soft_combine_backward") for contiguous in (True, False)
    ]

    def compile_fn(self, y, logits):
        return ops.soft_combine(torch.relu(y) * 2, logits)


def test_mixing_weights_are_normalised(device):
    G, T, S, D = 3, 11, 8, 5
    logits = 3 * torch.randn(G, T, S, device=device)
    # Every slot is a convex combination of its group's tokens, and every output one of its group's slots.
    torch.testing.assert_close(
        ops.soft_dispatch(torch.ones(G, T, D, device=device), logits), torch.ones(G, S, D, device=device)
    )
    torch.testing.assert_close(
        ops.soft_combine(torch.ones(G, S, D, device=device), logits), torch.ones(G, T, D, device=device)
    )
    # Uniform logits: each slot is its group's mean token, each output its group's mean slot.
    x, y = torch.randn(G, T, D, device=device), torch.randn(G, S, D, device=device)
    uniform = torch.zeros(G, T, S, device=device)
    torch.testing.assert_close(ops.soft_dispatch(x, uniform), x.mean(1, keepdim=True).expand(G, S, D))
    torch.testing.assert_close(ops.soft_combine(y, uniform), y.mean(1, keepdim=True).expand(G, T, D))
    # A dominant logit selects: slot 2 of group 0 takes token 5; token 4 of group 1 takes slot 7.
    peaked = torch.zeros(G, T, S, device=device)
    peaked[0, 5, 2] = peaked[1, 4, 7] = 100.0
    assert torch.allclose(ops.soft_dispatch(x, peaked)[0, 2], x[0, 5])
    assert torch.allclose(ops.soft_combine(y, peaked)[1, 4], y[1, 7])


def test_logit_gradients_sum_to_zero_along_the_softmax(device):
    # A softmax is invariant to a shift of its logits, so their gradient sums to zero along its axis.
    for name, axis in (("dispatch", 1), ("combine", 2)):
        operator = OPS[name][0]
        _, _, grad_logits = run_with_grads(operator, *make_inputs(name, 2, 13, 6, 4, device, torch.float64))
        torch.testing.assert_close(grad_logits.sum(axis), torch.zeros_like(grad_logits.sum(axis)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(OPS))
def test_non_contiguous_inputs(device, name):
    operator, reference, _, _ = OPS[name]
    features, logits, grad = make_inputs(name, 3, 8, 6, 5, device, torch.float32)
    strided = [transposed_storage(t) for t in (features, logits, grad)]
    assert not any(t.is_contiguous() for t in strided)
    for actual, expected in zip(run_with_grads(operator, *strided), run_with_grads(reference, features, logits, grad)):
        torch.testing.assert_close(actual, expected)


def test_empty_dimensions(device):
    # No groups, no slots to dispatch into, no tokens to combine into, zero width: empty or zero results.
    def randn(*shape):
        return torch.randn(shape, device=device)

    assert ops.soft_dispatch(randn(0, 4, 3), randn(0, 4, 5)).shape == (0, 5, 3)
    assert ops.soft_dispatch(randn(2, 4, 3), randn(2, 4, 0)).shape == (2, 0, 3)
    assert ops.soft_combine(randn(2, 5, 3), randn(2, 0, 5)).shape == (2, 0, 3)
    assert ops.soft_combine(randn(2, 5, 0), randn(2, 4, 5)).shape == (2, 4, 0)
    x = torch.randn(2, 4, 3, device=device, requires_grad=True)
    logits = torch.randn(2, 4, 0, device=device, requires_grad=True)
    ops.soft_dispatch(x, logits).sum().backward()
    assert not x.grad.any() and logits.grad.shape == (2, 4, 0)


@pytest.mark.parametrize("name", list(OPS))
def test_autograd_saves_only_the_inputs(device, name):
    # Recompute rather than store: no [G, T, S] softmax is kept for the backward.
    operator = OPS[name][0]
    features, logits, _ = make_inputs(name, 2, 6, 5, 4, device, torch.float32)
    features.requires_grad_()
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        operator(features, logits)
    assert len(saved) == 2
    assert saved[0] is features and saved[1] is logits


@pytest.mark.parametrize("name", list(OPS))
def test_backward_holds_one_gts_temporary_besides_its_results(device, name, allocated_peak_bytes):
    # The backward recomputes the weights [G, T, S] and makes the weights' gradient [G, T, S], from which
    # grad_logits [G, T, S] comes; the weights' gradient is freed before the features' gradient is allocated, so
    # at most the weights, grad_logits and the features' gradient are alive at once.
    G, T, S, D = 4, 64, 8, 32
    backward = getattr(torch.ops.visionmoe, f"soft_{name}_backward")
    features, logits, grad = make_inputs(name, G, T, S, D, device, torch.float32)
    features_grad_bytes = features.numel() * 4
    backward(grad, features, logits)  # a first call may allocate library workspaces (cuBLAS) that stay
    peak = allocated_peak_bytes(lambda: backward(grad, features, logits), device)
    assert peak <= 2 * G * T * S * 4 + features_grad_bytes + 4096


# ---- gradcheck in float64 on tiny shapes ----


def test_gradcheck_dispatch_then_combine(device):
    # The router's case: one set of logits feeds both operators, and its gradient is the sum of both.
    x = torch.randn(2, 5, 3, device=device, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 5, 4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, logits: ops.soft_combine(ops.soft_dispatch(x, logits).sin(), logits), (x, logits)
    )


def soft_moe_layer(router, expert_weight, x):
    """A minimal Soft MoE layer: expert e is a linear map applied to its P slots."""
    plan, metrics = router(x)
    expert_out = torch.einsum("gepd,edf->gepf", plan.dispatch(x), expert_weight)
    return plan.combine(torch.tanh(expert_out)), metrics


def test_router_compiles_fullgraph_dynamic(device):
    torch._dynamo.reset()
    router = SoftRouter(8, 3, slots_per_expert=2).to(device)
    expert_weight = torch.randn(3, 8, 8, device=device)
    compiled = torch.compile(soft_moe_layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for G, T in ((2, 10), (3, 13)):
        x = torch.randn(G, T, 8, device=device)
        out, metrics = compiled(router, expert_weight, x)
        out.sum().backward()
        compiled_grad = router.phi.grad.clone()
        router.zero_grad()
        out_eager, metrics_eager = soft_moe_layer(router, expert_weight, x)
        out_eager.sum().backward()
        torch.testing.assert_close(out, out_eager)
        torch.testing.assert_close(compiled_grad, router.phi.grad)
        torch.testing.assert_close(metrics.load, metrics_eager.load)
        router.zero_grad()


# ---- bad input: clear errors naming the argument ----


def test_wrong_rank_is_rejected():
    with pytest.raises(ValueError, match=r"soft_dispatch: x must have shape \[G, T, D\], got \[5, 4\]"):
        ops.soft_dispatch(torch.randn(5, 4), torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match=r"soft_dispatch: logits must have shape \[G, T, S\], got \[5, 3\]"):
        ops.soft_dispatch(torch.randn(1, 5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"soft_combine: y must have shape \[G, S, D\], got \[1, 1, 3, 4\]"):
        ops.soft_combine(torch.randn(1, 1, 3, 4), torch.randn(1, 5, 3))


def test_wrong_dtype_is_rejected():
    with pytest.raises(TypeError, match=r"soft_dispatch: logits must have the dtype of x \(Float\), got Double"):
        ops.soft_dispatch(torch.randn(1, 5, 4), torch.randn(1, 5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"soft_combine: logits must have the dtype of y \(BFloat16\), got Float"):
        ops.soft_combine(torch.randn(1, 3, 4, dtype=torch.bfloat16), torch.randn(1, 5, 3))
    with pytest.raises(TypeError, match="soft_dispatch: x must be float32, float64, float16 or bfloat16, got Long"):
        ops.soft_dispatch(torch.ones(1, 5, 4, dtype=torch.long), torch.ones(1, 5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="grad_slots must have the dtype of x"):
        torch.ops.visionmoe.soft_dispatch_backward(
            torch.randn(1, 3, 4).double(), torch.randn(1, 5, 4), torch.randn(1, 5, 3)
        )


def test_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match=r"logits must have shape \[G, T, S\] = \[2, 5, S\] to match x"):
        ops.soft_dispatch(torch.randn(2, 5, 4), torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match=r"logits must have shape \[G, T, S\] = \[2, 5, S\] to match x"):
        ops.soft_dispatch(torch.randn(2, 5, 4), torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match=r"logits must have shape \[G, T, S\] = \[2, T, 3\] to match y"):
        ops.soft_combine(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"soft_dispatch_backward: grad_slots must have shape \[2, 3, 4\]"):
        torch.ops.visionmoe.soft_dispatch_backward(torch.randn(2, 3, 5), torch.randn(2, 5, 4), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"soft_combine_backward: grad_out must have shape \[2, 5, 4\]"):
        torch.ops.visionmoe.soft_combine_backward(torch.randn(2, 6, 4), torch.randn(2, 3, 4), torch.randn(2, 5, 3))


def test_wrong_device_is_rejected():
    with pytest.raises(ValueError, match="soft_dispatch: logits must be on cpu like x, got meta"):
        ops.soft_dispatch(torch.randn(2, 5, 4), torch.randn(2, 5, 3, device="meta"))
    with pytest.raises(ValueError, match="soft_combine: logits must be on meta like y, got cpu"):
        ops.soft_combine(torch.randn(2, 3, 4, device="meta"), torch.randn(2, 5, 3))


@pytest.mark.cuda
def test_cpu_logits_with_cuda_features_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(ValueError, match="logits must be on cuda:0 like x, got cpu"):
        ops.soft_dispatch(torch.randn(2, 5, 4, device="cuda"), torch.randn(2, 5, 3))


def test_undefined_softmax_is_rejected(device):
    with pytest.raises(ValueError, match=r"x has no tokens \(T = 0\)"):
        ops.soft_dispatch(torch.randn(2, 0, 4, device=device), torch.randn(2, 0, 3, device=device))
    with pytest.raises(ValueError, match=r"y has no slots \(S = 0\)"):
        ops.soft_combine(torch.randn(2, 0, 4, device=device), torch.randn(2, 5, 0, device=device))


# ---- the router ----


def test_router_is_registered():
    assert "soft" in list_routers()
    router = create_router("soft", 16, 4, slots_per_expert=3, noise_std=0.5)
    assert isinstance(router, SoftRouter)
    assert router.phi.shape == (16, 12) and router.scale.item() == 1.0 and router.num_slots == 12


@pytest.mark.parametrize("groups", [None, 3])
def test_router_shapes_and_plan_layout(device, groups):
    D, E, P, T = 12, 4, 2, 9
    router = SoftRouter(D, E, slots_per_expert=P).to(device)
    x = torch.randn(T, D, device=device) if groups is None else torch.randn(groups, T, D, device=device)
    G = groups or 1
    plan, metrics = router(x)
    assert isinstance(plan, SoftRoutingPlan) and isinstance(metrics, RouterMetrics)
    assert plan.logits.shape == (G, T, E * P) and plan.num_groups == G and plan.num_tokens == T
    slots = plan.dispatch(x)
    assert slots.shape == (G, E, P, D)
    # Expert-major slots: expert e's p-th slot is slot e * P + p of the operator's [G, S, D] output.
    flat = ops.soft_dispatch(x.view(G, T, D), plan.logits)
    for e in range(E):
        assert torch.equal(slots[:, e], flat[:, e * P : (e + 1) * P])
    expert_out = slots * torch.arange(1.0, E + 1, device=device).view(1, E, 1, 1)
    torch.testing.assert_close(plan.combine(expert_out), ops.soft_combine(expert_out.flatten(1, 2), plan.logits))
    assert plan.combine(expert_out).shape == (G, T, D)


def test_router_weights_are_normalised(device):
    router = SoftRouter(16, 4, slots_per_expert=3).to(device)
    with torch.no_grad():
        router.scale.fill_(10.0)  # sharp softmaxes
    plan, metrics = router(torch.randn(5, 20, 16, device=device))
    dispatch_weights, combine_weights = plan.dispatch_weights(), plan.combine_weights()
    # Each slot's dispatch weights sum to 1 over its group's tokens; each token's combine weights over slots.
    torch.testing.assert_close(dispatch_weights.sum(1), torch.ones(5, 12, device=device))
    torch.testing.assert_close(combine_weights.sum(2), torch.ones(5, 20, device=device))
    torch.testing.assert_close(metrics.probs, combine_weights.view(5, 20, 4, 3).sum(-1))
    torch.testing.assert_close(metrics.probs, metrics.logits.softmax(-1))
    torch.testing.assert_close(metrics.load, dispatch_weights.view(5, 20, 4, 3).sum((0, 1, 3)))
    assert metrics.dropped_fraction.item() == 0 and metrics.aux_losses == {}
    assert not metrics.probs.requires_grad and not metrics.logits.requires_grad


def test_router_logits_are_scaled_cosine_similarities(device):
    D, E, P = 8, 2, 3
    router = SoftRouter(D, E, slots_per_expert=P).to(device)
    with torch.no_grad():
        router.scale.fill_(2.5)
    x = torch.randn(2, 6, D, device=device)
    plan, _ = router(x)
    cosine = torch.nn.functional.cosine_similarity(x.unsqueeze(-1), router.phi.view(1, 1, D, E * P), dim=2)
    torch.testing.assert_close(plan.logits, 2.5 * cosine, atol=1e-5, rtol=1e-5)


def test_router_input_dtype(device):
    router = SoftRouter(8, 2, slots_per_expert=2).to(device)
    x = torch.randn(3, 5, 8, device=device, dtype=torch.bfloat16)
    plan, _ = router(x)
    assert plan.logits.dtype == torch.bfloat16
    slots = plan.dispatch(x)
    assert slots.dtype == torch.bfloat16
    # Experts may compute in float32: the plan casts its logits to their dtype.
    assert plan.combine(slots.float()).dtype == torch.float32


def test_slots_per_expert_from_num_tokens():
    assert SoftRouter(8, 16, num_tokens=196).slots_per_expert == 12  # round(12.25)
    assert SoftRouter(8, 16, num_tokens=196, capacity_factor=2.0).slots_per_expert == 24  # round(24.5), to even
    assert SoftRouter(8, 4, num_tokens=3).slots_per_expert == 1  # round(0.75)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "needs slots_per_expert, or num_tokens"),
        (dict(slots_per_expert=2, num_tokens=10), "not both"),
        (dict(slots_per_expert=2, capacity_factor=2.0), "capacity_factor only applies with num_tokens"),
        (dict(slots_per_expert=0), "slots_per_expert must be >= 1"),
        (dict(num_tokens=1), r"= 0 slots per expert"),
        (dict(num_tokens=10, capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(slots_per_expert=1, noise_std=-1.0), "noise_std must be >= 0"),
    ],
)
def test_router_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftRouter(8, 4, **kwargs)


def test_router_bad_inputs():
    router = SoftRouter(8, 2, slots_per_expert=2)
    with pytest.raises(ValueError, match=r"x must have width D = 8, got shape \(2, 5, 7\)"):
        router(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x must have shape \[T, D\] or \[G, T, D\]"):
        router(torch.randn(2, 2, 5, 8))
    plan, _ = router(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"expert_out must have shape \[G, E, P, D\] = \[2, 2, 2, D\], got \(2, 4"):
        plan.combine(torch.randn(2, 4, 8))


def test_router_rejects_non_finite_logits():
    # CPU only: on CUDA the check is a device-side assertion, which would end the test process's CUDA context.
    router = SoftRouter(8, 2, slots_per_expert=2)
    x = torch.randn(2, 5, 8)
    x[1, 3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="router logits contain NaN or infinite values"):
        router(x)


def test_router_noise_only_in_training(device):
    router = SoftRouter(8, 2, slots_per_expert=2, noise_std=1.0).to(device)
    x = torch.randn(2, 5, 8, device=device)
    assert not torch.equal(router(x)[0].logits, router(x)[0].logits)
    router.eval()
    assert torch.equal(router(x)[0].logits, router(x)[0].logits)
    noiseless = SoftRouter(8, 2, slots_per_expert=2).to(device)
    noiseless.load_state_dict(router.state_dict())
    assert torch.equal(router(x)[0].logits, noiseless(x)[0].logits)


def test_router_gradients_match_reference_pipeline(device):
    # The same layer with the plan's operators replaced by the reference: identical router gradients.
    torch.manual_seed(0)
    router = SoftRouter(8, 3, slots_per_expert=2).to(device)
    expert_weight = torch.randn(3, 8, 8, device=device)
    x = torch.randn(4, 10, 8, device=device, requires_grad=True)
    out, _ = soft_moe_layer(router, expert_weight, x)
    out.square().sum().backward()
    grads = (x.grad, router.phi.grad, router.scale.grad)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    x_ref = x.detach().clone().requires_grad_()
    router.zero_grad()
    plan, _ = router(x_ref)
    slots = ref.soft_dispatch(x_ref, plan.logits).unflatten(1, (3, 2))
    expert_out = torch.tanh(torch.einsum("gepd,edf->gepf", slots, expert_weight))
    ref.soft_combine(expert_out.flatten(1, 2), plan.logits).square().sum().backward()
    for got, expected in zip(grads, (x_ref.grad, router.phi.grad, router.scale.grad)):
        torch.testing.assert_close(got, expected)


def test_training_the_router_decreases_a_toy_loss(device):
    # Experts are fixed; only the router (phi and scale) learns, through the logits' gradients of both
    # operators.
    torch.manual_seed(0)
    G, T, D, E, P = 4, 10, 8, 4, 2
    router = SoftRouter(D, E, slots_per_expert=P).to(device)
    expert_weight = 0.5 * torch.randn(E, D, D, device=device)
    x = torch.randn(G, T, D, device=device)
    target = torch.tanh(x @ torch.randn(D, D, device=device))
    optimizer = torch.optim.Adam(router.parameters(), lr=5e-2)

    def loss():
        return (soft_moe_layer(router, expert_weight, x)[0] - target).square().mean()

    initial = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.85 * initial
    assert router.scale.item() != 1.0
