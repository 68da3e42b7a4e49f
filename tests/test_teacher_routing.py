"""TGR-MoE's routing-distillation loss: reference agreement, hand-computed values, gradcheck, opcheck,
torch.compile, saved tensors, determinism and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from op_contract import OpTester

from visionmoe import ops
from visionmoe import reference as ref

# float16 and bfloat16 inputs are computed in float32 by both the operator and the reference, so losses agree as
# in float32 and gradients up to their final rounding to the inputs' dtype.
LOSS_TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),
}
GRAD_TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-6, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-6, rtol=1e-2),
}

SHAPES = [
    # (T, E)
    (37, 5),
    (64, 8),
    (5, 33),  # E not a multiple of the vector width, nor of the warp
    (1, 4),  # one token
    (7, 1),  # one expert: every loss is 0
    (600, 16),  # several chunks of rows on the CPU
    (40, 128),
]
REDUCTIONS = ["none", "mean", "sum"]
FORMATS = ["probabilities", "logits"]


def random_tensor(shape, dtype, device, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def random_teacher(shape, dtype, device, teacher_format, seed=1):
    """Teacher logits, or probabilities (the softmax of such logits, in float64 before the cast) with some exact
    zeros, as a sparse or sharpened teacher gives."""
    logits = random_tensor(shape, torch.float64, "cpu", scale=2.0, seed=seed)
    if teacher_format == "logits":
        return logits.to(device=device, dtype=dtype)
    if shape[1] > 1:
        logits[::3, 0] = -math.inf  # every third token gives expert 0 probability 0
    return logits.softmax(dim=-1).to(device=device, dtype=dtype)


def loss_and_grad(function, student_logits, teacher, reduction, teacher_format, grad_loss=None):
    leaf = student_logits.detach().clone().requires_grad_()
    loss = function(leaf, teacher, reduction, teacher_format)
    if grad_loss is None:
        grad_loss = torch.ones_like(loss)
    loss.backward(grad_loss)
    return loss.detach(), leaf.grad


def op_samples(device, dtype, reduction, teacher_format):
    student_logits = random_tensor((9, 5), dtype, device).requires_grad_()
    teacher = random_teacher((9, 5), dtype, device, teacher_format)
    loss, student_lse, teacher_lse = torch.ops.visionmoe.teacher_routing_loss(
        student_logits.detach(), teacher, reduction, teacher_format
    )
    grad_loss = torch.ones_like(loss)
    return {
        "teacher_routing_loss": (student_logits, teacher, reduction, teacher_format),
        "teacher_routing_loss_backward": (
            grad_loss,
            student_logits.detach(),
            teacher,
            student_lse,
            teacher_lse,
            reduction,
            teacher_format,
        ),
    }


def distillation_step(student_logits, teacher_logits):
    # As in TGR-MoE training: the teacher router's probabilities are the target, the student's logits come from
    # some computation whose gradient flows through the loss.
    teacher = teacher_logits.softmax(dim=-1)
    return (
        ops.teacher_routing_loss(student_logits * 1.5, teacher)
        + ops.teacher_routing_loss(student_logits, teacher_logits, "sum", "logits") * 0.01
    )


class TestTeacherRoutingLoss(OpTester):
    op = staticmethod(ops.teacher_routing_loss)
    reference = staticmethod(ref.teacher_routing_loss)
    dtypes = list(LOSS_TOLERANCES)
    tolerances = LOSS_TOLERANCES
    grad_tolerances = GRAD_TOLERANCES
    cases = [
        (shape, reduction, teacher_format) for shape in SHAPES for reduction in REDUCTIONS for teacher_format in FORMATS
    ]
    gradcheck_cases = [
        (shape, reduction, teacher_format)
        for shape in ((5, 3), (1, 6), (4, 1))
        for reduction in REDUCTIONS
        for teacher_format in FORMATS
    ]
    opcheck_cases = [
        (name, dtype, reduction, teacher_format)
        for name in ("teacher_routing_loss", "teacher_routing_loss_backward")
        for dtype in (torch.float32, torch.float64, torch.bfloat16)
        for reduction in REDUCTIONS
        for teacher_format in FORMATS
    ]

    def sample_inputs(self, device, dtype, case):
        shape, reduction, teacher_format = case
        student_logits = random_tensor(shape, dtype, device).requires_grad_()
        return student_logits, random_teacher(shape, dtype, device, teacher_format), reduction, teacher_format

    op_samples = staticmethod(op_samples)

    compile_fn = staticmethod(distillation_step)

    def compile_inputs(self, device):
        # A second size must reuse the dynamic graph, not break it.
        return [
            (
                random_tensor(shape, torch.float32, device).requires_grad_(),
                random_tensor(shape, torch.float32, device, seed=1),
            )
            for shape in ((24, 4), (41, 8))
        ]

    def determinism_inputs(self, device):
        return self.sample_inputs(device, torch.float32, ((5000, 24), "mean", "logits"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", list(LOSS_TOLERANCES))
def test_loss_is_in_the_opmath_dtype(device, dtype, reduction):
    # The loss keeps float32 for float16 and bfloat16 inputs; the gradient has the inputs' dtype.
    shape = (6, 4)
    student_logits = random_tensor(shape, dtype, device).requires_grad_()
    loss = ops.teacher_routing_loss(student_logits, random_teacher(shape, dtype, device, "logits"), reduction, "logits")
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert loss.shape == (shape[:1] if reduction == "none" else ())
    (grad,) = torch.autograd.grad(loss.sum(), student_logits)
    assert grad.dtype == dtype and grad.shape == shape


def test_hand_computed_values():
    # Token 0: student logits [0, log 3] give q = [1/4, 3/4]; teacher p = [1/2, 1/2]:
    #   KL = 1/2 log((1/2) / (1/4)) + 1/2 log((1/2) / (3/4)) = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3).
    # Token 1: student logits [0, 0] give q = [1/2, 1/2]; teacher p = [1, 0] (0 log 0 = 0):
    #   KL = 1 log(1 / (1/2)) + 0 = log 2.
    student_logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    per_token = torch.tensor([0.5 * math.log(4 / 3), math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(ops.teacher_routing_loss(student_logits, teacher, "none"), per_token)
    torch.testing.assert_close(ops.teacher_routing_loss(student_logits, teacher, "sum"), per_token.sum())
    loss = ops.teacher_routing_loss(student_logits, teacher)  # the mean: (1/2 log(4/3) + log 2) / 2
    torch.testing.assert_close(loss, per_token.mean())
    # d(mean)/ds = (q - p) / T: token 0 ([1/4, 3/4] - [1/2, 1/2]) / 2 = [-1/8, 1/8],
    #                           token 1 ([1/2, 1/2] - [1, 0]) / 2 = [-1/4, 1/4].
    loss.backward()
    torch.testing.assert_close(student_logits.grad, torch.tensor([[-0.125, 0.125], [-0.25, 0.25]], dtype=torch.float64))
    # Teacher logits [log 3, 0] give p = [3/4, 1/4]; against q = [1/2, 1/2]:
    #   KL = 3/4 log((3/4) / (1/2)) + 1/4 log((1/4) / (1/2)) = 3/4 log(3/2) - 1/4 log 2.
    teacher_logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    loss = ops.teacher_routing_loss(torch.zeros(1, 2, dtype=torch.float64), teacher_logits, "sum", "logits")
    torch.testing.assert_close(loss, torch.tensor(0.75 * math.log(1.5) - 0.25 * math.log(2.0), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_hot_teacher_gives_the_cross_entropy(device, dtype):
    # With p = one_hot(y), KL(p || q) = -log q_y: exactly cross-entropy, an oracle independent of kl_div. The
    # other entries of p are zeros, whose terms must add 0 (0 log 0 = 0), not NaN.
    student_logits = random_tensor((300, 12), dtype, device).requires_grad_()
    target = torch.randint(0, 12, (300,), device=device)
    teacher = F.one_hot(target, 12).to(dtype)
    for reduction in REDUCTIONS:
        loss = ops.teacher_routing_loss(student_logits, teacher, reduction)
        expected = F.cross_entropy(student_logits, target, reduction=reduction)
        torch.testing.assert_close(loss, expected, **LOSS_TOLERANCES[dtype])
        (grad,) = torch.autograd.grad(loss.sum(), student_logits)
        (expected_grad,) = torch.autograd.grad(expected.sum(), student_logits)
        torch.testing.assert_close(grad, expected_grad, **GRAD_TOLERANCES[dtype])


@pytest.mark.parametrize("teacher_format", FORMATS)
def test_zero_when_the_teacher_agrees(device, teacher_format):
    student_logits = random_tensor((50, 9), torch.float64, device)
    teacher = student_logits + 7.0 if teacher_format == "logits" else student_logits.softmax(dim=-1)
    loss = ops.teacher_routing_loss(student_logits, teacher, "none", teacher_format)
    torch.testing.assert_close(loss, torch.zeros(50, dtype=torch.float64, device=device), atol=1e-12, rtol=0)
    other = random_teacher((50, 9), torch.float64, device, teacher_format)
    assert (ops.teacher_routing_loss(student_logits, other, "none", teacher_format) > 0).all()


def test_unnormalised_probabilities_are_used_as_given(device):
    # Rows are not renormalised: KL = sum p log p - sum p log q, and its exact gradient (sum p) q - p.
    student_logits = random_tensor((20, 6), torch.float64, device).requires_grad_()
    teacher = random_teacher((20, 6), torch.float64, device, "probabilities") * 0.7
    loss, grad = loss_and_grad(ops.teacher_routing_loss, student_logits, teacher, "sum", "probabilities")
    loss_ref, grad_ref = loss_and_grad(ref.teacher_routing_loss, student_logits, teacher, "sum", "probabilities")
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("teacher_format", FORMATS)
def test_the_teacher_gets_no_gradient(device, teacher_format):
    student_logits = random_tensor((10, 4), torch.float64, device).requires_grad_()
    teacher = random_teacher((10, 4), torch.float64, device, teacher_format).requires_grad_()
    for function in (ops.teacher_routing_loss, ref.teacher_routing_loss):
        loss = function(student_logits, teacher, "mean", teacher_format)
        grad_student, grad_teacher = torch.autograd.grad(loss, (student_logits, teacher), allow_unused=True)
        assert grad_student is not None and grad_teacher is None


@pytest.mark.parametrize("teacher_format", FORMATS)
def test_widely_spread_logits(device, teacher_format):
    # Logit differences of thousands overflow every naive exponential; the operator in float32 must still match
    # the float64 reference to float32's relative precision of such values. Gradients: the saved log-sum-exp of
    # logits of about 3000 is rounded to float32 (2^-24 * 3000 = 2e-4), and so is q = exp(s - lse) relatively.
    student_logits = random_tensor((64, 16), torch.float32, device, scale=1000.0)
    teacher = (
        random_tensor((64, 16), torch.float32, device, scale=1000.0, seed=1)
        if teacher_format == "logits"
        else random_teacher((64, 16), torch.float32, device, "probabilities")
    )
    loss, grad = loss_and_grad(ops.teacher_routing_loss, student_logits, teacher, "none", teacher_format)
    loss_ref, grad_ref = loss_and_grad(
        ref.teacher_routing_loss, student_logits.double(), teacher.double(), "none", teacher_format
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=3e-4, rtol=0)


def test_non_contiguous_inputs(device):
    student_logits = random_tensor((8, 30), torch.float64, device).t()  # [30, 8], strided
    teacher = random_teacher((8, 30), torch.float64, device, "logits").t()
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            ops.teacher_routing_loss(student_logits, teacher, reduction, "logits"),
            ref.teacher_routing_loss(student_logits, teacher, reduction, "logits"),
        )


@pytest.mark.parametrize("teacher_format", FORMATS)
def test_no_tokens(device, teacher_format):
    # The mean of no losses is 0 by convention (not NaN), so an empty batch adds nothing to a training loss.
    for function in (ops.teacher_routing_loss, ref.teacher_routing_loss):
        student_logits = torch.empty(0, 5, device=device, requires_grad=True)
        teacher = torch.empty(0, 5, device=device)
        for reduction, shape in (("none", (0,)), ("mean", ()), ("sum", ())):
            loss = function(student_logits, teacher, reduction, teacher_format)
            assert loss.shape == shape and torch.equal(loss, torch.zeros(shape, device=device))
            (grad,) = torch.autograd.grad(loss.sum(), student_logits)
            assert grad.shape == (0, 5)


def test_backward_saves_no_extra_token_by_expert_tensor():
    # Autograd keeps the two inputs and per-token log-sum-exps only: the backward recomputes both softmaxes.
    T, E = 64, 16
    student_logits = random_tensor((T, E), torch.float32, "cpu").requires_grad_()
    for teacher_format, expected_lse_sizes in (("probabilities", [(T,), (0,)]), ("logits", [(T,), (T,)])):
        teacher = random_teacher((T, E), torch.float32, "cpu", teacher_format)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            ops.teacher_routing_loss(student_logits, teacher, "mean", teacher_format)
        assert [tuple(x.shape) for x in saved] == [(T, E), (T, E)] + expected_lse_sizes
        assert saved[0] is student_logits and saved[1] is teacher


@pytest.mark.parametrize("experts", [6, 24])
def test_deterministic_and_independent_of_the_thread_count(experts):
    student_logits = random_tensor((5000, experts), torch.float32, "cpu").requires_grad_()
    teacher = random_teacher((5000, experts), torch.float32, "cpu", "probabilities")
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            loss = ops.teacher_routing_loss(student_logits, teacher)
            results.append((loss, torch.autograd.grad(loss, student_logits)[0]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])


# ---- bad input: clear errors naming the argument ----

# The operator and the reference raise the same type (the error contract, visionmoe.ops), with the same message.
IMPLEMENTATIONS_AND_ERRORS = ((ops.teacher_routing_loss, ValueError), (ref.teacher_routing_loss, ValueError))


def test_wrong_rank_is_rejected():
    for shape in ((5,), (2, 3, 4)):
        for function, error in IMPLEMENTATIONS_AND_ERRORS:
            with pytest.raises(error, match=r"student_logits must have shape \[T, E\]"):
                function(torch.randn(shape), torch.randn(shape))


def test_shape_mismatch_is_rejected():
    for function, error in IMPLEMENTATIONS_AND_ERRORS:
        with pytest.raises(error, match=r"teacher must have the shape of student_logits \((\[4, 3\]|\(4, 3\))\), got"):
            function(torch.randn(4, 3), torch.rand(4, 5))


def test_dtype_mismatch_is_rejected():
    for function, _ in IMPLEMENTATIONS_AND_ERRORS:
        with pytest.raises(TypeError, match="teacher must have the dtype of student_logits"):
            function(torch.randn(4, 3), torch.rand(4, 3, dtype=torch.float64))


def test_non_floating_inputs_are_rejected():
    for function, _ in IMPLEMENTATIONS_AND_ERRORS:
        with pytest.raises(TypeError, match="student_logits must be a floating-point tensor"):
            function(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))


def test_no_experts_is_rejected():
    for function, error in IMPLEMENTATIONS_AND_ERRORS:
        with pytest.raises(error, match="student_logits must have E >= 1 experts"):
            function(torch.randn(4, 0), torch.randn(4, 0))


def test_unknown_options_are_rejected():
    student_logits, teacher = torch.randn(4, 3), torch.rand(4, 3)
    for function, error in IMPLEMENTATIONS_AND_ERRORS:
        with pytest.raises(error, match='reduction must be "none", "mean" or "sum", got "batchmean"'):
            function(student_logits, teacher, "batchmean")
        with pytest.raises(error, match='teacher_format must be "probabilities" or "logits", got "log_probs"'):
            function(student_logits, teacher, "mean", "log_probs")


# The CPU kernel handles rows narrower than a vector (E < 16) and wider ones in different loops: both check.
EXPERT_COUNTS = [3, 20]


@pytest.mark.parametrize("experts", EXPERT_COUNTS)
@pytest.mark.parametrize("teacher_format", FORMATS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_student_logits_are_rejected(bad_value, teacher_format, experts):
    student_logits = torch.randn(1000, experts)  # the bad row is not in the first chunk of rows
    student_logits[700, 2] = bad_value
    teacher = random_teacher((1000, experts), torch.float32, "cpu", teacher_format)
    with pytest.raises(
        ValueError,
        match=rf"student_logits must be finite, got student_logits\[700, 2\] = "
        rf"{bad_value}",
    ):
        ops.teacher_routing_loss(student_logits, teacher, "mean", teacher_format)


@pytest.mark.parametrize("experts", EXPERT_COUNTS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_teacher_logits_are_rejected(bad_value, experts):
    teacher = torch.randn(5, experts)
    teacher[3, 1] = bad_value
    with pytest.raises(
        ValueError,
        match=rf"teacher must be finite logits \(teacher_format=\"logits\"\), got "
        rf"teacher\[3, 1\] = {bad_value}",
    ):
        ops.teacher_routing_loss(torch.randn(5, experts), teacher, "none", "logits")


@pytest.mark.parametrize("experts", EXPERT_COUNTS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -0.25])
def test_invalid_teacher_probabilities_are_rejected(bad_value, experts):
    teacher = torch.full((5, experts), 1 / experts)
    teacher[2, 1] = bad_value
    with pytest.raises(
        ValueError,
        match=rf"teacher must hold probabilities, finite and >= 0 "
        rf"\(teacher_format=\"probabilities\"\), got teacher\[2, 1\] = "
        rf"{bad_value}",
    ):
        ops.teacher_routing_loss(torch.randn(5, experts), teacher)


@pytest.mark.cuda
def test_non_finite_input_is_rejected_on_cuda_as_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    student_logits = torch.randn(5, 4, device="cuda")
    student_logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"student_logits must be finite, got student_logits\[1, 2\] = nan"):
        ops.teacher_routing_loss(student_logits, torch.full((5, 4), 0.25, device="cuda"))


def test_backward_rejects_inconsistent_inputs():
    student_logits, teacher = torch.randn(5, 3), torch.randn(5, 3)
    loss, student_lse, teacher_lse = torch.ops.visionmoe.teacher_routing_loss(student_logits, teacher, "none", "logits")
    backward = torch.ops.visionmoe.teacher_routing_loss_backward
    grad = torch.ones_like(loss)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \[5\], got \[\]"):
        backward(grad.sum(), student_logits, teacher, student_lse, teacher_lse, "none", "logits")
    with pytest.raises(TypeError, match="grad_loss must have dtype Float"):
        backward(grad.double(), student_logits, teacher, student_lse, teacher_lse, "none", "logits")
    with pytest.raises(ValueError, match=r"student_lse must have shape \[5\], got \[4\]"):
        backward(grad, student_logits, teacher, student_lse[:4], teacher_lse, "none", "logits")
    with pytest.raises(ValueError, match=r"teacher_lse must have shape \[0\], got \[5\]"):
        backward(grad, student_logits, teacher, student_lse, teacher_lse, "none", "probabilities")
    with pytest.raises(TypeError, match="teacher must have the dtype of student_logits"):
        backward(grad, student_logits, teacher.double(), student_lse, teacher_lse, "none", "logits")


def test_meta_tensor_beside_a_cpu_one_is_rejected():
    # The fake (Meta) kernel ran for the mix and returned an uninitialised CPU loss, e.g. -3.39e+38.
    with pytest.raises(ValueError, match="teacher_routing_loss: teacher must be on cpu like student_logits, got meta"):
        ops.teacher_routing_loss(torch.randn(4, 3), torch.rand(4, 3, device="meta"))
    student = torch.randn(4, 3)
    _, student_lse, teacher_lse = torch.ops.visionmoe.teacher_routing_loss(student, student, "mean", "logits")
    with pytest.raises(
        ValueError, match="teacher_routing_loss_backward: student_lse must be on cpu like student_logits, got meta"
    ):
        torch.ops.visionmoe.teacher_routing_loss_backward(
            torch.tensor(1.0), student, student, student_lse.to("meta"), teacher_lse, "mean", "logits"
        )
