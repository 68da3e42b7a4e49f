"""The operators' error contract (README.md, "Operators"; visionmoe.ops): a bad argument value, shape, size,
device or index content raises ValueError, a wrong dtype raises TypeError, and the operator's CPU kernel, its fake
kernel (the same inputs on the meta device) and its reference raise the same type for the same bad input."""

import pytest
import torch

from visionmoe import ops, reference


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _expert_mlp(x=None, w1=None, b1=None, w2=None, b2=None, offsets=None, activation="gelu", packed=False):
    E, C, D, F = 3, 4, 5, 6
    x = _randn(E * C, D) if packed and x is None else (_randn(E, C, D) if x is None else x)
    if packed and offsets is None:
        offsets = torch.tensor([0, 4, 8, 12])
    args = (
        x,
        _randn(E, D, F) if w1 is None else w1,
        _randn(E, F) if b1 is None else b1,
        _randn(E, F, D) if w2 is None else w2,
        _randn(E, D) if b2 is None else b2,
    )
    return args, {"activation": activation, "expert_offsets": offsets}


def _teacher(student=None, teacher=None, reduction="mean", teacher_format="probabilities"):
    student = _randn(6, 4) if student is None else student
    teacher = torch.full((6, 4), 0.25) if teacher is None else teacher
    return (student, teacher, reduction, teacher_format), {}


def _whatwhere(**bad):
    args = dict(
        q=_randn(1, 2, 5, 4),
        k=_randn(1, 2, 3, 4),
        v_tokens=_randn(1, 2, 5, 6),
        v_slots=_randn(1, 2, 3, 6),
        where=_randn(1, 2, 5, 3),
    )
    args.update(bad)
    return tuple(args.values()), {}


def _make_plan(token_index=None, expert_index=None, num_experts=3, capacity=None):
    token_index = torch.arange(6) if token_index is None else token_index
    expert_index = torch.tensor([0, 1, 2, 0, 1, 2]) if expert_index is None else expert_index
    return (token_index, expert_index, torch.ones(token_index.shape[0]), num_experts, capacity), {"num_tokens": 6}


META = torch.device("meta")

# (family, op name, build(), expected type, whether the fake can see the defect: value-dependent defects are
# invisible to meta tensors).
CASES = [
    # Sinkhorn
    ("sinkhorn", "rank", lambda: ((_randn(2, 3, 4, 5), 3), {}), ValueError, True),
    ("sinkhorn", "dtype", lambda: ((torch.ones(2, 3, 4, dtype=torch.int64), 3), {}), TypeError, True),
    ("sinkhorn", "no experts", lambda: ((_randn(2, 3, 0), 3), {}), ValueError, True),
    ("sinkhorn", "negative iterations", lambda: ((_randn(2, 3, 4), -1), {}), ValueError, True),
    ("sinkhorn", "nan", lambda: ((torch.full((2, 3, 4), float("nan")), 3), {}), ValueError, False),
    # routing
    ("topk_route", "rank", lambda: ((_randn(4), 1), {}), ValueError, True),
    ("topk_route", "dtype", lambda: ((torch.ones(2, 3, 4, dtype=torch.int64), 1), {}), TypeError, True),
    ("topk_route", "k > E", lambda: ((_randn(2, 3, 4), 5), {}), ValueError, True),
    ("topk_route", "k = 0", lambda: ((_randn(2, 3, 4), 0), {}), ValueError, True),
    ("expert_choice_route", "dtype", lambda: ((torch.ones(2, 3, 4, dtype=torch.int32), 2), {}), TypeError, True),
    ("expert_choice_route", "no experts", lambda: ((_randn(2, 3, 0), 2), {}), ValueError, True),
    # dispatch
    ("make_plan", "index dtype", lambda: _make_plan(token_index=torch.arange(6, dtype=torch.int32)), TypeError, True),
    ("make_plan", "index rank", lambda: _make_plan(expert_index=torch.zeros(2, 3, dtype=torch.long)), ValueError, True),
    ("make_plan", "lengths", lambda: _make_plan(expert_index=torch.tensor([0, 1, 2])), ValueError, True),
    ("make_plan", "no experts", lambda: _make_plan(num_experts=0), ValueError, True),
    (
        "make_plan",
        "expert out of range",
        lambda: _make_plan(expert_index=torch.tensor([0, 1, 2, 0, 1, 3])),
        ValueError,
        False,
    ),
    (
        "make_plan",
        "token out of range",
        lambda: _make_plan(token_index=torch.tensor([0, 1, 2, 3, 4, 6])),
        ValueError,
        False,
    ),
    # expert MLP
    ("expert_mlp", "x rank", lambda: _expert_mlp(x=_randn(3, 4, 5, 1)), ValueError, True),
    ("expert_mlp", "x dtype", lambda: _expert_mlp(x=torch.ones(3, 4, 5, dtype=torch.int64)), TypeError, True),
    ("expert_mlp", "w1 dtype", lambda: _expert_mlp(w1=_randn(3, 5, 6, dtype=torch.float64)), TypeError, True),
    ("expert_mlp", "w1 width", lambda: _expert_mlp(w1=_randn(3, 7, 6)), ValueError, True),
    ("expert_mlp", "w2 shape", lambda: _expert_mlp(w2=_randn(3, 6, 4)), ValueError, True),
    ("expert_mlp", "b1 shape", lambda: _expert_mlp(b1=_randn(3, 5)), ValueError, True),
    ("expert_mlp", "activation", lambda: _expert_mlp(activation="relu"), ValueError, True),
    (
        "expert_mlp",
        "odd gated width",
        lambda: _expert_mlp(activation="silu_gated", w1=_randn(3, 5, 5), b1=_randn(3, 5), w2=_randn(3, 2, 5)),
        ValueError,
        True,
    ),
    (
        "expert_mlp",
        "offsets dtype",
        lambda: _expert_mlp(packed=True, offsets=torch.tensor([0, 4, 8, 12], dtype=torch.int32)),
        TypeError,
        True,
    ),
    ("expert_mlp", "offsets shape", lambda: _expert_mlp(packed=True, offsets=torch.tensor([0, 12])), ValueError, True),
    (
        "expert_mlp",
        "offsets values",
        lambda: _expert_mlp(packed=True, offsets=torch.tensor([0, 8, 4, 12])),
        ValueError,
        False,
    ),
    (
        "expert_mlp",
        "offsets end",
        lambda: _expert_mlp(packed=True, offsets=torch.tensor([0, 4, 8, 11])),
        ValueError,
        False,
    ),
    # Soft MoE
    ("soft_dispatch", "x rank", lambda: ((_randn(2, 5), _randn(2, 5, 3)), {}), ValueError, True),
    (
        "soft_dispatch",
        "x dtype",
        lambda: ((torch.ones(2, 5, 4, dtype=torch.int64), _randn(2, 5, 3)), {}),
        TypeError,
        True,
    ),
    (
        "soft_dispatch",
        "logits dtype",
        lambda: ((_randn(2, 5, 4), _randn(2, 5, 3, dtype=torch.float64)), {}),
        TypeError,
        True,
    ),
    ("soft_dispatch", "tokens", lambda: ((_randn(2, 5, 4), _randn(2, 6, 3)), {}), ValueError, True),
    ("soft_combine", "slots", lambda: ((_randn(2, 3, 4), _randn(2, 5, 4)), {}), ValueError, True),
    ("soft_combine", "groups", lambda: ((_randn(2, 3, 4), _randn(1, 5, 3)), {}), ValueError, True),
    # teacher-routing loss
    (
        "teacher_routing_loss",
        "rank",
        lambda: _teacher(student=_randn(6), teacher=torch.full((6,), 0.25)),
        ValueError,
        True,
    ),
    (
        "teacher_routing_loss",
        "dtype",
        lambda: _teacher(student=torch.ones(6, 4, dtype=torch.int64), teacher=torch.ones(6, 4, dtype=torch.int64)),
        TypeError,
        True,
    ),
    (
        "teacher_routing_loss",
        "teacher dtype",
        lambda: _teacher(teacher=torch.full((6, 4), 0.25, dtype=torch.float64)),
        TypeError,
        True,
    ),
    ("teacher_routing_loss", "teacher shape", lambda: _teacher(teacher=torch.full((6, 3), 0.25)), ValueError, True),
    ("teacher_routing_loss", "reduction", lambda: _teacher(reduction="max"), ValueError, True),
    ("teacher_routing_loss", "format", lambda: _teacher(teacher_format="log"), ValueError, True),
    (
        "teacher_routing_loss",
        "nan student",
        lambda: _teacher(student=torch.full((6, 4), float("nan"))),
        ValueError,
        False,
    ),
    (
        "teacher_routing_loss",
        "negative teacher",
        lambda: _teacher(teacher=torch.full((6, 4), -0.25)),
        ValueError,
        False,
    ),
    # what-where attention
    ("whatwhere_attention", "q rank", lambda: _whatwhere(q=_randn(2, 5, 4)), ValueError, True),
    (
        "whatwhere_attention",
        "q dtype",
        lambda: _whatwhere(q=torch.ones(1, 2, 5, 4, dtype=torch.int64)),
        TypeError,
        True,
    ),
    ("whatwhere_attention", "k dtype", lambda: _whatwhere(k=_randn(1, 2, 3, 4, dtype=torch.float64)), TypeError, True),
    ("whatwhere_attention", "k width", lambda: _whatwhere(k=_randn(1, 2, 3, 5)), ValueError, True),
    ("whatwhere_attention", "where shape", lambda: _whatwhere(where=_randn(1, 2, 5, 4)), ValueError, True),
    ("whatwhere_attention", "v_slots slots", lambda: _whatwhere(v_slots=_randn(1, 2, 4, 6)), ValueError, True),
]


def _call(module, name, args, kwargs):
    return getattr(module, name)(*args, **kwargs)


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("name, defect, build, expected, fake_sees", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_operator_fake_and_reference_raise_the_same_type(name, defect, build, expected, fake_sees):
    torch.manual_seed(0)
    args, kwargs = build()
    with pytest.raises(expected) as op_error:
        _call(ops, name, args, kwargs)
    with pytest.raises(expected) as reference_error:
        _call(reference, name, args, kwargs)
    # The message names the operator in both.
    assert str(op_error.value).count(name.split("_route")[0]) >= 1, str(op_error.value)
    assert str(reference_error.value).count(name.split("_route")[0]) >= 1, str(reference_error.value)
    if fake_sees:
        meta_args = tuple(_to(a, META) for a in args)
        meta_kwargs = {key: _to(value, META) for key, value in kwargs.items()}
        with pytest.raises(expected):
            _call(ops, name, meta_args, meta_kwargs)


# Mixed devices: one tensor on meta beside CPU ones is a bad device, a ValueError, whichever kernel runs.
DEVICE_CASES = [
    (
        "sinkhorn_backward",
        lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4, device=META), torch.randn(2, 1, 3), torch.randn(2, 1, 4)),
    ),
    (
        "expert_mlp",
        lambda: (
            torch.randn(3, 4, 5),
            torch.randn(3, 5, 6),
            torch.randn(3, 6, device=META),
            torch.randn(3, 6, 5),
            torch.randn(3, 5),
            None,
            "gelu",
        ),
    ),
    ("soft_dispatch", lambda: (torch.randn(2, 5, 4), torch.randn(2, 5, 3, device=META))),
    (
        "teacher_routing_loss",
        lambda: (torch.randn(6, 4), torch.full((6, 4), 0.25, device=META), "mean", "probabilities"),
    ),
    (
        "whatwhere_attention",
        lambda: (
            torch.randn(1, 2, 5, 4),
            torch.randn(1, 2, 3, 4),
            torch.randn(1, 2, 5, 6),
            torch.randn(1, 2, 3, 6),
            torch.randn(1, 2, 5, 3, device=META),
        ),
    ),
    ("make_plan", lambda: (torch.arange(6), torch.zeros(6, dtype=torch.long, device=META), 3, 6, True)),
]


@pytest.mark.parametrize("name, build", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_mixed_devices_raise_a_value_error(name, build):
    with pytest.raises(ValueError, match="must be on"):
        getattr(torch.ops.visionmoe, name)(*build())


def test_router_options_raise_type_error_for_a_wrong_type_and_value_error_for_a_wrong_value():
    from visionmoe.routers.checks import check_flag, check_int, check_real

    with pytest.raises(TypeError, match="k must be an integer"):
        check_int("k", 2.5, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        check_int("k", 0, 1)
    with pytest.raises(TypeError, match="noise must be a number"):
        check_real("noise", "0.1", at_least=0.0)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        check_real("noise", -1.0, at_least=0.0)
    with pytest.raises(TypeError, match="must be True or False"):
        check_flag("batch_priority", 1)
    assert not issubclass(TypeError, ValueError)


def test_teacher_routing_nan_raises_on_cpu_and_in_the_reference():
    student, teacher = torch.randn(5, 4), torch.full((5, 4), 0.25)
    student[3, 1] = float("nan")
    message = r"student_logits must be finite, got student_logits\[3, 1\] = nan"
    with pytest.raises(ValueError, match=message):
        ops.teacher_routing_loss(student, teacher)
    with pytest.raises(ValueError, match=message):
        reference.teacher_routing_loss(student, teacher)


@pytest.mark.cuda
def test_teacher_routing_nan_raises_on_cuda_as_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    student, teacher = torch.randn(5, 4), torch.full((5, 4), 0.25)
    student[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"student_logits must be finite, got student_logits\[3, 1\] = nan"):
        ops.teacher_routing_loss(student.cuda(), teacher.cuda())
    teacher[2, 0] = -0.25
    with pytest.raises(ValueError, match=r"teacher must hold probabilities.*teacher\[2, 0\] = -0.25"):
        ops.teacher_routing_loss(torch.randn(5, 4, device="cuda"), teacher.cuda())
