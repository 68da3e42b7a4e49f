"""Log-domain Sinkhorn normalisation: reference agreement, marginals, gradcheck, opcheck, torch.compile, bad input."""

import math

import pytest
import torch
from op_contract import OpTester

from visionmoe import ops
from visionmoe import reference as ref

# float16 and bfloat16 logits are computed in float32 by both the operator and the reference, so they differ by
# the final rounding to the logits' dtype (and, for gradients, by float32 summation order) only.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}

SHAPES = [
    # (G, T, E)
    (1, 37, 5),
    (3, 64, 8),
    (2, 5, 33),  # more experts than tokens; E not a multiple of the vector width
    (1, 1, 4),  # one token
    (2, 7, 1),  # one expert
    (2, 600, 16),  # several chunks of rows per group on the CPU
    (1, 200, 128),
]


def random_logits(shape, dtype, device, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


class TestSinkhorn(OpTester):
    op = staticmethod(ops.sinkhorn)
    reference = staticmethod(ref.sinkhorn)
    dtypes = list(TOLERANCES)
    tolerances = TOLERANCES
    cases = [
        (shape, num_iterations) for shape in SHAPES for num_iterations in (0, 1, 3, ops.DEFAULT_SINKHORN_ITERATIONS)
    ]
    gradcheck_cases = [
        (shape, num_iterations) for shape in ((2, 5, 3), (1, 4, 6), (3, 1, 2)) for num_iterations in (0, 1, 3)
    ] + [((6, 3), 2)]  # and one group given as [T, E]
    opcheck_cases = [
        (name, dtype, num_iterations)
        for name in ("sinkhorn", "sinkhorn_backward")
        for dtype in (torch.float32, torch.float64, torch.bfloat16)
        for num_iterations in (0, 2)
    ]

    def sample_inputs(self, device, dtype, case):
        shape, num_iterations = case
        return random_logits(shape, dtype, device).requires_grad_(), num_iterations

    def opcheck_sample(self, device, case):
        name, dtype, num_iterations = case
        logits = random_logits((2, 9, 5), dtype, device)
        if name == "sinkhorn":
            return torch.ops.visionmoe.sinkhorn.default, (logits.requires_grad_(), num_iterations, True)
        _, row_potentials, column_potentials = torch.ops.visionmoe.sinkhorn(logits, num_iterations)
        grad_log_plan = random_logits((2, 9, 5), dtype, device, seed=1)
        return torch.ops.visionmoe.sinkhorn_backward.default, (grad_log_plan, logits, row_potentials, column_potentials)

    def compile_fn(self, logits):
        # Sinkhorn inside the code of a balanced top-1 router, as a model compiles it.
        plan = ops.sinkhorn(logits, 5)
        return plan.softmax(dim=-1) * logits.sigmoid()

    def compile_inputs(self, device):
        return [(random_logits(shape, torch.float32, device).requires_grad_(),) for shape in ((2, 24, 4), (3, 41, 8))]

    def determinism_inputs(self, device):
        return random_logits((2, 3000, 24), torch.float32, device).requires_grad_(), 10


def test_default_iterations_match_the_routers_paper():
    assert ops.DEFAULT_SINKHORN_ITERATIONS == 20
    logits = random_logits((2, 30, 6), torch.float64, "cpu")
    torch.testing.assert_close(ops.sinkhorn(logits), ops.sinkhorn(logits, 20), rtol=0, atol=0)


@pytest.mark.parametrize("num_iterations", [1, 5, 200])
def test_marginals(device, num_iterations):
    G, T, E = 3, 48, 6
    plan = ops.sinkhorn(random_logits((G, T, E), torch.float64, device), num_iterations).exp()
    # The last step is a column step: each expert receives T / E tokens' worth of mass, in every group.
    torch.testing.assert_close(plan.sum(dim=1), torch.full((G, E), T / E, dtype=torch.float64, device=device))
    # Rows approach 1 as the iterations converge.
    row_error = (plan.sum(dim=2) - 1).abs().max().item()
    if num_iterations == 200:
        assert row_error < 1e-9
    else:
        assert row_error > 1e-6  # not converged yet: the check above is not vacuous


def test_marginals_of_the_first_iterations_by_hand():
    # One token row of logits [0, log 3] with E = 2, T = 1: rows first give u = -log 4, then columns
    # v_e = log(1 / 2) - (L_e + u): each entry of the plan becomes exactly T / E = 1 / 2.
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    log_plan = ops.sinkhorn(logits, 1)
    torch.testing.assert_close(log_plan, torch.full((1, 1, 2), math.log(0.5), dtype=torch.float64))
    # The operator's potentials are those of the logits less their row maximum (log 3): u' = u + log 3.
    _, row_potentials, column_potentials = torch.ops.visionmoe.sinkhorn(logits, 1)
    torch.testing.assert_close(row_potentials, torch.tensor([[[math.log(3.0) - math.log(4.0)]]], dtype=torch.float64))
    expected_v = math.log(0.5) + math.log(4.0) - logits[0]
    torch.testing.assert_close(column_potentials, expected_v.unsqueeze(0))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("offset", [1e6, 1e7, 1e8])
def test_large_common_offset(device, offset, per_row):
    # Sinkhorn's plan does not change when a constant is added to the logits (or to one row), but float32 logits
    # near 1e8 (a spacing of 8) met potentials near -1e8 in logits + u + v, and the rows summed to 4 instead of 1.
    generator = torch.Generator().manual_seed(0)
    shift = offset * torch.linspace(1, 3, 16, dtype=torch.float64).view(1, 16, 1) if per_row else offset
    logits64 = torch.randn(2, 16, 4, generator=generator, dtype=torch.float64) * 2 + shift
    logits = logits64.float().to(device).requires_grad_()
    log_plan = ops.sinkhorn(logits)
    plan = log_plan.double().exp()
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 16, dtype=torch.float64, device=device), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        plan.sum(-2), torch.full((2, 4), 4.0, dtype=torch.float64, device=device), atol=1e-5, rtol=0
    )
    # Against the reference in float64 on the same (float32-rounded) logits, values and gradients.
    exact = logits.detach().double().requires_grad_()
    expected = ref.sinkhorn(exact)
    torch.testing.assert_close(plan, expected.exp(), atol=1e-6, rtol=0)
    weights = torch.linspace(-1, 1, plan.numel(), dtype=torch.float64, device=device).view(plan.shape)
    (grad,) = torch.autograd.grad((log_plan.double().exp() * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected.exp() * weights).sum(), exact)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=0)


def test_zero_iterations_returns_a_copy(device):
    logits = random_logits((2, 9, 4), torch.float32, device).requires_grad_()
    log_plan = ops.sinkhorn(logits, 0)
    assert torch.equal(log_plan, logits) and log_plan.data_ptr() != logits.data_ptr()
    grad = torch.randn_like(logits)
    log_plan.backward(grad)
    assert torch.equal(logits.grad, grad)


def test_one_group_may_be_given_as_two_dims(device):
    logits = random_logits((20, 5), torch.float32, device)
    torch.testing.assert_close(ops.sinkhorn(logits), ops.sinkhorn(logits.unsqueeze(0)).squeeze(0), rtol=0, atol=0)
    assert ops.sinkhorn(logits).shape == (20, 5)


def test_groups_are_independent(device):
    logits = random_logits((3, 25, 7), torch.float64, device)
    whole = ops.sinkhorn(logits, 10)
    for g in range(3):
        torch.testing.assert_close(whole[g], ops.sinkhorn(logits[g], 10), rtol=0, atol=0)


def test_non_contiguous_logits(device):
    logits = random_logits((2, 8, 30), torch.float64, device).transpose(1, 2)  # [2, 30, 8], strided
    torch.testing.assert_close(ops.sinkhorn(logits, 7), ref.sinkhorn(logits, 7), **TOLERANCES[torch.float64])


def test_empty_batch(device):
    logits = torch.empty(0, 10, 4, device=device, requires_grad=True)
    log_plan = ops.sinkhorn(logits, 5)
    assert log_plan.shape == (0, 10, 4)
    log_plan.sum().backward()
    assert logits.grad.shape == (0, 10, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_widely_spread_logits(device, dtype):
    # Logit differences of thousands underflow every naive exponential. Expert 2, which every token dislikes by
    # thousands, has row-normalised plan entries that underflow even in float64: its column step and the
    # backward take the max-pass path, the others the fast one.
    logits = random_logits((2, 40, 6), dtype, device, scale=1000.0)
    logits[:, :, 2] -= 5000.0
    logits.requires_grad_()
    grad_log_plan = random_logits((2, 40, 6), dtype, device, scale=1.0, seed=1)
    log_plan = ops.sinkhorn(logits, 50)
    (grad,) = torch.autograd.grad(log_plan, logits, grad_log_plan)
    expected_logits = logits.detach().double().requires_grad_()
    expected = ref.sinkhorn(expected_logits, 50)
    (expected_grad,) = torch.autograd.grad(expected, expected_logits, grad_log_plan.double())
    # Entries of log P are sums of terms of about 5000, which float32 holds to about 5000 * 2^-24 = 3e-4 each.
    tolerance = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-2, rtol=0)
    torch.testing.assert_close(log_plan.double(), expected, **tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance)
    column_sums = log_plan.detach().double().exp().sum(dim=1)
    torch.testing.assert_close(column_sums, torch.full_like(column_sums, 40 / 6), atol=0, rtol=tolerance["atol"])


def test_gradcheck_with_a_column_that_underflows(device):
    logits = random_logits((1, 4, 3), torch.float64, device)
    logits[:, :, 1] -= 1000.0
    assert torch.autograd.gradcheck(lambda x: ops.sinkhorn(x, 3), (logits.requires_grad_(),))


def test_deterministic_and_independent_of_the_thread_count():
    logits = random_logits((2, 3000, 24), torch.float32, "cpu").requires_grad_()
    grad_log_plan = random_logits((2, 3000, 24), torch.float32, "cpu", seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            log_plan = ops.sinkhorn(logits, 10)
            results.append((log_plan, torch.autograd.grad(log_plan, logits, grad_log_plan)[0]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])


# ---- bad input: clear errors naming the argument ----


def test_wrong_rank_is_rejected():
    for shape in ((5,), (1, 2, 3, 4)):
        with pytest.raises(ValueError, match=r"logits must have shape \[T, E\] or \[G, T, E\]"):
            ops.sinkhorn(torch.randn(shape))
        with pytest.raises(ValueError, match=r"logits must have shape \[T, E\] or \[G, T, E\]"):
            ref.sinkhorn(torch.randn(shape))
    with pytest.raises(ValueError, match=r"logits must have shape \[G, T, E\]"):
        torch.ops.visionmoe.sinkhorn(torch.randn(4, 3), 2)


def test_non_floating_logits_are_rejected():
    with pytest.raises(TypeError, match="logits must be a floating-point tensor, got Long"):
        ops.sinkhorn(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        ref.sinkhorn(torch.ones(4, 3, dtype=torch.long))


def test_negative_iterations_are_rejected():
    with pytest.raises(ValueError, match="num_iterations must be >= 0, got -1"):
        ops.sinkhorn(torch.randn(4, 3), -1)
    with pytest.raises(ValueError, match="num_iterations must be >= 0"):
        ref.sinkhorn(torch.randn(4, 3), -1)


def test_empty_groups_are_rejected():
    for shape in ((2, 0, 3), (2, 4, 0)):
        with pytest.raises(ValueError, match="logits must have T >= 1 tokens and E >= 1 experts"):
            ops.sinkhorn(torch.randn(shape))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_rejected(device, bad_value):
    logits = torch.randn(2, 5, 3, device=device)
    logits[1, 2, 0] = bad_value
    with pytest.raises(ValueError, match=rf"logits must be finite, got logits\[1, 2, 0\] = {bad_value}"):
        ops.sinkhorn(logits)
    with pytest.raises(ValueError, match="logits must be finite"):
        ref.sinkhorn(logits)


def test_validate_false_skips_the_finite_check():
    logits = torch.randn(2, 5, 3)
    torch.testing.assert_close(ops.sinkhorn(logits, validate=False), ops.sinkhorn(logits), rtol=0, atol=0)
    logits[0, 1, 1] = float("nan")
    ops.sinkhorn(logits, validate=False)  # no error: the result for non-finite logits is unspecified


def test_backward_rejects_inconsistent_inputs():
    logits = torch.randn(2, 5, 3)
    _, row_potentials, column_potentials = torch.ops.visionmoe.sinkhorn(logits, 4)
    grad = torch.randn_like(logits)
    backward = torch.ops.visionmoe.sinkhorn_backward
    with pytest.raises(ValueError, match=r"grad_log_plan must have the shape of logits"):
        backward(grad[:, :4], logits, row_potentials, column_potentials)
    with pytest.raises(TypeError, match="grad_log_plan must have the dtype of logits"):
        backward(grad.double(), logits, row_potentials, column_potentials)
    with pytest.raises(ValueError, match=r"row_potentials must have shape \[G, K, T\] = \[2, K, 5\]"):
        backward(grad, logits, row_potentials[:, :, :4], column_potentials)
    with pytest.raises(TypeError, match="column_potentials must have dtype Float"):
        backward(grad, logits, row_potentials, column_potentials.double())
    with pytest.raises(ValueError, match="must hold the same number of iterations, got 4 and 3"):
        backward(grad, logits, row_potentials, column_potentials[:, :3])


@pytest.mark.cuda
def test_backward_rejects_potentials_on_another_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits = torch.randn(2, 5, 3, device="cuda")
    _, row_potentials, column_potentials = torch.ops.visionmoe.sinkhorn(logits, 4)
    with pytest.raises(ValueError, match="row_potentials must be on cuda:0 like logits"):
        torch.ops.visionmoe.sinkhorn_backward(torch.ones_like(logits), logits, row_potentials.cpu(), column_potentials)


def test_backward_rejects_a_meta_tensor_beside_cpu_ones():
    logits = torch.randn(1, 5, 3)
    _, row_potentials, column_potentials = torch.ops.visionmoe.sinkhorn(logits, 2)
    with pytest.raises(ValueError, match="sinkhorn_backward: column_potentials must be on cpu like logits, got meta"):
        torch.ops.visionmoe.sinkhorn_backward(
            torch.randn(1, 5, 3), logits, row_potentials, column_potentials.to("meta")
        )
