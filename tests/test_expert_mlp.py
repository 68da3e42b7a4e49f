"""Grouped expert MLP operator: reference agreement per dtype, layout and activation (with empty experts and no
rows), gradcheck, opcheck, torch.compile, and bad input."""

import pytest
import torch
from op_contract import OpTester

from visionmoe import ops
from visionmoe import reference as ref

ACTIVATIONS = ["gelu", "silu_gated"]
# ops against the float64 reference. float16/bfloat16 results are sums of rounded products (GEMMs accumulate in
# float32, but their inputs, e.g. the hidden activation, are rounded to the dtype), so their error scales with
# each result's magnitude: they are allowed two machine epsilons of its largest entry, about what eager PyTorch
# in that dtype reaches.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: None,
    torch.bfloat16: None,
}


def tolerance(dtype, truth):
    if TOLERANCES[dtype] is not None:
        return TOLERANCES[dtype]
    eps = torch.finfo(dtype).eps
    largest = truth.abs().max().item() if truth.numel() else 0.0
    return dict(atol=2 * eps * max(largest, 1.0), rtol=eps)


QUANTITIES = ("y", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2")


def make_weights(E, D, F, activation, device, dtype, generator):
    pre_width = 2 * F if activation == "silu_gated" else F
    scale1, scale2 = D**-0.5, F**-0.5
    weights = (
        scale1 * torch.randn(E, D, pre_width, generator=generator, dtype=torch.float64),
        0.1 * torch.randn(E, pre_width, generator=generator, dtype=torch.float64),
        scale2 * torch.randn(E, F, D, generator=generator, dtype=torch.float64),
        0.1 * torch.randn(E, D, generator=generator, dtype=torch.float64),
    )
    return tuple(t.to(device=device, dtype=dtype) for t in weights)


def make_packed(counts, D, F, activation, device, dtype, seed=0):
    """x [M, D], weights, offsets [E + 1] from per-expert row counts, and an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    M = sum(counts)
    x = torch.randn(M, D, generator=generator, dtype=torch.float64).to(device, dtype)
    weights = make_weights(len(counts), D, F, activation, device, dtype, generator)
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0).to(device)
    grad = torch.randn(M, D, generator=generator, dtype=torch.float64).to(device, dtype)
    return x, weights, offsets, grad


def make_padded(E, C, D, F, activation, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(E, C, D, generator=generator, dtype=torch.float64).to(device, dtype)
    weights = make_weights(E, D, F, activation, device, dtype, generator)
    grad = torch.randn(E, C, D, generator=generator, dtype=torch.float64).to(device, dtype)
    return x, weights, None, grad


def run_with_grads(fn, x, weights, offsets, grad, activation):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    y = fn(*leaves, activation=activation, expert_offsets=offsets)
    y.backward(grad)
    return (y.detach(), *(t.grad for t in leaves))


PACKED_COUNTS = [
    [5, 3, 8, 1],
    [0, 7, 0, 4, 0],  # experts without rows: zero weight gradients
    [9],  # one expert
    [0, 0, 0],  # no rows at all (M = 0)
    [40, 33, 27],
]


def expert_mlp_of(module):
    """``module.expert_mlp`` with its keyword arguments taken by position, as the contract calls ``op(*args)``."""

    def mlp(x, w1, b1, w2, b2, offsets, activation):
        return module.expert_mlp(x, w1, b1, w2, b2, activation=activation, expert_offsets=offsets)

    return mlp


def mlp_then_tanh(x, w1, b1, w2, b2, offsets):
    return torch.tanh(ops.expert_mlp(x, w1, b1, w2, b2, activation="silu_gated", expert_offsets=offsets)) * 2


class ExpertMLPTester(OpTester):
    """One layout: ``make(size, D, F, activation, device, dtype)`` draws x, weights, offsets and an output
    gradient, ``size`` being per-expert row counts (packed) or (E, C) (padded). Cases are (size, activation)."""

    op = staticmethod(expert_mlp_of(ops))
    reference = staticmethod(expert_mlp_of(ref))
    dtypes = list(TOLERANCES)
    # Every dtype against the float64 reference, with tolerances that scale with the result (see TOLERANCES).
    accuracy = {dtype: (lambda truth, dtype=dtype: tolerance(dtype, truth)) for dtype in TOLERANCES}
    gradcheck_cases = ACTIVATIONS
    opcheck_cases = [(name, activation) for name in ("expert_mlp", "expert_mlp_backward") for activation in ACTIVATIONS]
    make = None
    # The sizes of the contract's other tests, one per layout.
    gradcheck_size = opcheck_size = determinism_size = compile_sizes = None

    def inputs(self, size, D, F, activation, device, dtype):
        x, weights, offsets, _ = self.make(size, D, F, activation, device, dtype)
        return (*(t.requires_grad_() for t in (x, *weights)), offsets, activation)

    def sample_inputs(self, device, dtype, case):
        size, activation = case
        return self.inputs(size, 16, 24, activation, device, dtype)

    def gradcheck_inputs(self, device, activation):
        return self.inputs(self.gradcheck_size, 3, 4, activation, device, torch.float64)

    def opcheck_sample(self, device, case):
        name, activation = case
        x, (w1, b1, w2, b2), offsets, grad = self.make(self.opcheck_size, 4, 6, activation, device, torch.float32)
        if name == "expert_mlp":
            leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
            return torch.ops.visionmoe.expert_mlp.default, (*leaves, offsets, activation)
        _, pre = torch.ops.visionmoe.expert_mlp(x, w1, b1, w2, b2, offsets, activation)
        return torch.ops.visionmoe.expert_mlp_backward.default, (grad, x, w1, w2, pre, offsets, activation)

    compile_fn = staticmethod(mlp_then_tanh)

    def compile_inputs(self, device):
        # mlp_then_tanh's arguments (no activation) at two sizes: the second must reuse the dynamic graph.
        return [self.inputs(size, 8, 6, "silu_gated", device, torch.float32)[:-1] for size in self.compile_sizes]

    def determinism_inputs(self, device):
        return self.inputs(self.determinism_size, 32, 48, "gelu", device, torch.float32)


class TestPackedExpertMLP(ExpertMLPTester):
    make = staticmethod(make_packed)
    cases = [(counts, activation) for counts in PACKED_COUNTS for activation in ACTIVATIONS]
    gradcheck_size, opcheck_size, determinism_size = [2, 0, 3], [3, 0, 2], [70, 0, 130, 56]
    compile_sizes = ([3, 5, 0], [7, 2, 6, 1])


class TestPaddedExpertMLP(ExpertMLPTester):
    @staticmethod
    def make(size, D, F, activation, device, dtype):
        return make_padded(*size, D, F, activation, device, dtype)

    cases = [(size, activation) for size in ((3, 5), (1, 7), (4, 0), (2, 33)) for activation in ACTIVATIONS]
    gradcheck_size, opcheck_size, determinism_size = (2, 3), (2, 3), (4, 64)
    compile_sizes = ((3, 5), (4, 7))  # (E, C) as the packed sizes' E and largest count


def empty_size_case(E, rows, D, F, activation, layout, device):
    """x, w1, b1, w2, b2, offsets in float64 with E experts of `rows` rows each; any size may be 0."""
    pre_width = 2 * F if activation == "silu_gated" else F
    weights = (torch.randn(E, D, pre_width), torch.randn(E, pre_width), torch.randn(E, F, D), torch.randn(E, D))
    if layout == "padded":
        x, offsets = torch.randn(E, rows, D), None
    else:
        x, offsets = torch.randn(E * rows, D), (torch.arange(E + 1) * rows).to(device)
    return tuple(t.to(device, torch.float64) for t in (x, *weights)) + (offsets,)


def grads_of(fn, tensors, offsets, activation):
    """fn's output and the gradients of all five inputs, zeros for inputs the output does not depend on."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves, activation=activation, expert_offsets=offsets)
    grad_y = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True) if y.requires_grad else [None] * 5
    return y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


# E, rows per expert, D, F: every size that may be zero has a meaning: F = 0 experts output their bias b2, D = 0
# gives empty rows, E = 0 (with no rows) an empty output.
EMPTY_SIZES = [(2, 3, 4, 0), (2, 3, 0, 5), (0, 0, 4, 5), (2, 0, 4, 0), (3, 2, 0, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("E,rows,D,F", EMPTY_SIZES)
def test_empty_sizes_match_reference(device, E, rows, D, F, activation, layout):
    *tensors, offsets = empty_size_case(E, rows, D, F, activation, layout, device)
    y, grads = grads_of(ops.expert_mlp, tensors, offsets, activation)
    y_ref, grads_ref = grads_of(ref.expert_mlp, tensors, offsets, activation)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for name, grad, grad_ref in zip(("x", "w1", "b1", "w2", "b2"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12, msg=name)
    if F == 0:  # no hidden units: every row is its expert's bias
        b2 = tensors[4]
        expected = b2[:, None].expand(E, rows, D)
        torch.testing.assert_close(y, expected if layout == "padded" else expected.reshape(E * rows, D))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("E,rows,D,F", [(2, 3, 4, 0), (2, 3, 0, 5), (0, 0, 4, 5)])
def test_empty_sizes_under_compile(device, layout, E, rows, D, F):
    torch._dynamo.reset()
    *tensors, offsets = empty_size_case(E, rows, D, F, "silu_gated", layout, device)
    compiled = torch.compile(mlp_then_tanh, backend="aot_eager", fullgraph=True)
    leaves = [t.requires_grad_() for t in tensors]
    out = compiled(*leaves, offsets)
    grads = torch.autograd.grad(out.sum(), leaves)
    eager_grads = torch.autograd.grad(mlp_then_tanh(*leaves, offsets).sum(), leaves)
    torch.testing.assert_close(out, mlp_then_tanh(*tensors, offsets))
    for grad, eager_grad, leaf in zip(grads, eager_grads, leaves):
        assert grad.shape == leaf.shape
        torch.testing.assert_close(grad, eager_grad)


def test_empty_experts_get_zero_weight_gradients(device):
    x, weights, offsets, grad = make_packed([0, 6, 0], 8, 12, "gelu", device, torch.float32)
    _, _, grad_w1, grad_b1, grad_w2, grad_b2 = run_with_grads(ops.expert_mlp, x, weights, offsets, grad, "gelu")
    for g in (grad_w1, grad_b1, grad_w2, grad_b2):
        assert not g[0].any() and not g[2].any() and g[1].abs().sum() > 0


def test_padded_equals_packed_with_uniform_offsets(device):
    E, C, D, F = 3, 6, 8, 12
    x, weights, _, _ = make_padded(E, C, D, F, "silu_gated", device, torch.float32)
    offsets = torch.arange(E + 1, device=device) * C
    padded = ops.expert_mlp(x, *weights, activation="silu_gated")
    packed = ops.expert_mlp(x.reshape(E * C, D), *weights, activation="silu_gated", expert_offsets=offsets)
    torch.testing.assert_close(padded.reshape(E * C, D), packed, atol=0, rtol=0)


def test_gelu_is_exact_erf_gelu(device):
    # One expert with identity-like weights exposes the activation itself: y = gelu(x) for w1 = w2 = I.
    D = 6
    x = torch.linspace(-4, 4, 30, device=device).view(5, D)
    eye = torch.eye(D, device=device).unsqueeze(0)
    zeros = torch.zeros(1, D, device=device)
    y = ops.expert_mlp(x, eye, zeros, eye, zeros, expert_offsets=torch.tensor([0, 5], device=device))
    torch.testing.assert_close(y, torch.nn.GELU()(x))


def test_silu_gated_takes_the_gate_first(device):
    # w1 = [I | 2 I], w2 = I: the gate is x and the value 2 x, so y = silu(x) * 2 x.
    D = 6
    x = torch.linspace(-4, 4, 30, device=device).view(5, D)
    eye = torch.eye(D, device=device)
    w1 = torch.cat([eye, 2 * eye], dim=1).unsqueeze(0)
    y = ops.expert_mlp(
        x,
        w1,
        torch.zeros(1, 2 * D, device=device),
        eye.unsqueeze(0),
        torch.zeros(1, D, device=device),
        activation="silu_gated",
        expert_offsets=torch.tensor([0, 5], device=device),
    )
    torch.testing.assert_close(y, torch.nn.functional.silu(x) * 2 * x)


def test_non_contiguous_inputs(device):
    x, (w1, b1, w2, b2), offsets, grad = make_packed([4, 0, 6], 8, 10, "gelu", device, torch.float32)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, w1, w2)]
    assert not any(t.is_contiguous() for t in strided)
    got = run_with_grads(ops.expert_mlp, strided[0], (strided[1], b1, strided[2], b2), offsets, grad, "gelu")
    expected = run_with_grads(ref.expert_mlp, x, (w1, b1, w2, b2), offsets, grad, "gelu")
    for quantity, actual, truth in zip(QUANTITIES, got, expected):
        torch.testing.assert_close(actual, truth, msg=quantity)


def test_autograd_saves_the_pre_activation_not_the_hidden_activation(device):
    x, weights, offsets, _ = make_packed([3, 4], 8, 10, "gelu", device, torch.float32)
    leaves = [t.requires_grad_() for t in (x, *weights)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.expert_mlp(*leaves, expert_offsets=offsets)
    # x, w1, w2, the pre-activation [M, F] and the offsets: one [M, F] tensor where eager autograd keeps two.
    assert [tuple(t.shape) for t in saved] == [(7, 8), (2, 8, 10), (2, 10, 8), (7, 10), (3,)]


# ---- bad input: clear errors naming the argument ----


def good_packed():
    x, weights, offsets, _ = make_packed([2, 3], 4, 6, "gelu", "cpu", torch.float32)
    return x, *weights, offsets


def call(x, w1, b1, w2, b2, offsets, activation="gelu"):
    return ops.expert_mlp(x, w1, b1, w2, b2, activation=activation, expert_offsets=offsets)


def test_wrong_rank_is_rejected():
    x, w1, b1, w2, b2, offsets = good_packed()
    with pytest.raises(
        ValueError,
        match=r"x must have shape \[E, C, D\] \(padded\) or \[M, D\] \(packed\), got "
        r"\[5\]",
    ):
        call(x[:, 0], w1, b1, w2, b2, offsets)
    with pytest.raises(ValueError, match=r"w1 must have shape \[E, D, F'\], got \[4, 6\]"):
        call(x, w1[0], b1, w2, b2, offsets)
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, F, D\], got \[6, 4\]"):
        call(x, w1, b1, w2[0], b2, offsets)


def test_mismatched_sizes_name_the_argument():
    x, w1, b1, w2, b2, offsets = good_packed()
    with pytest.raises(ValueError, match=r"w1 must have shape \[E, D, F'\] with D = 3 \(the width of x\)"):
        call(x[:, :3], w1, b1, w2, b2, offsets)
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, F, D\] = \[2, 6, 4\], got \[2, 5, 4\]"):
        call(x, w1, b1, w2[:, :5], b2, offsets)
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, F, D\] = \[2, 6, 4\], got \[1, 6, 4\]"):
        call(x, w1, b1, w2[:1], b2, offsets)
    with pytest.raises(ValueError, match=r"b1 must have shape \[E, F'\] = \[2, 6\], got \[2, 5\]"):
        call(x, w1, b1[:, :5], w2, b2, offsets)
    with pytest.raises(ValueError, match=r"b2 must have shape \[E, D\] = \[2, 4\], got \[2, 3\]"):
        call(x, w1, b1, w2, b2[:, :3], offsets)
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, F, D\] = \[2, 3, 4\]"):
        call(x, w1, b1, w2, b2, offsets, activation="silu_gated")  # silu_gated halves F' = 6 into F = 3
    with pytest.raises(ValueError, match=r"w1 must have an even number of columns 2F"):
        call(x, w1[..., :5], b1[:, :5], w2[:, :2], b2, offsets, activation="silu_gated")
    with pytest.raises(ValueError, match=r"x must have shape \[E, C, D\] with E = 2"):
        call(x.view(1, 5, 4), w1, b1, w2, b2, None)


def test_bad_offsets_are_rejected():
    x, w1, b1, w2, b2, offsets = good_packed()
    with pytest.raises(ValueError, match=r"expert_offsets must have shape \[E \+ 1\] = \[3\], got \[2\]"):
        call(x, w1, b1, w2, b2, offsets[:2])
    with pytest.raises(TypeError, match="expert_offsets must have dtype int64, got Int"):
        call(x, w1, b1, w2, b2, offsets.int())
    with pytest.raises(ValueError, match="expert_offsets must be on cpu like x, got meta"):
        call(x, w1, b1, w2, b2, offsets.to("meta"))
    with pytest.raises(ValueError, match=r"expert_offsets\[E\] must be M = 5 \(the rows of x\), got 4"):
        call(x, w1, b1, w2, b2, torch.tensor([0, 2, 4]))
    with pytest.raises(
        ValueError,
        match=r"expert_offsets must be non-decreasing, got expert_offsets\[2\] = 1 < "
        r"expert_offsets\[1\] = 3",
    ):
        call(x, w1, b1, w2, b2, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"expert_offsets\[0\] must be 0, got 1"):
        call(x, w1, b1, w2, b2, torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match=r"expert_offsets \[E \+ 1\] is required for packed x"):
        call(x, w1, b1, w2, b2, None)
    with pytest.raises(ValueError, match=r"expert_offsets must be None for padded x"):
        call(x.view(1, 5, 4).expand(2, 5, 4), w1, b1, w2, b2, offsets)


def test_bad_dtype_device_and_activation_are_rejected():
    x, w1, b1, w2, b2, offsets = good_packed()
    with pytest.raises(ValueError, match=r'activation must be "gelu" or "silu_gated", got "relu"'):
        call(x, w1, b1, w2, b2, offsets, activation="relu")
    with pytest.raises(TypeError, match=r"w2 must have the dtype of x \(Float\), got Double"):
        call(x, w1, b1, w2.double(), b2, offsets)
    with pytest.raises(TypeError, match=r"b1 must have the dtype of x \(Float\), got BFloat16"):
        call(x, w1, b1.bfloat16(), w2, b2, offsets)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got Long"):
        call(x.long(), w1.long(), b1.long(), w2.long(), b2.long(), offsets)
    with pytest.raises(ValueError, match="b2 must be on cpu like x, got meta"):
        call(x, w1, b1, w2, b2.to("meta"), offsets)
    with pytest.raises(ValueError, match=r"expert_mlp_backward: grad_y must have shape x's shape = \[5, 4\]"):
        torch.ops.visionmoe.expert_mlp_backward(torch.randn(5, 3), x, w1, w2, torch.randn(5, 6), offsets, "gelu")
    with pytest.raises(
        ValueError,
        match=r"expert_mlp_backward: pre_activation must have shape \[M, F'\] = "
        r"\[5, 6\]",
    ):
        torch.ops.visionmoe.expert_mlp_backward(torch.randn(5, 4), x, w1, w2, torch.randn(5, 7), offsets, "gelu")
