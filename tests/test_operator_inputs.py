"""Every raw operator in torch.ops.visionmoe, forward and backward, against inputs a demanding user might pass:
tensors on mixed devices (a meta tensor beside CPU ones), all-meta inputs, non-contiguous views, and a sweep of
bad inputs (wrong rank, dtype, size, empty sizes, NaN, out-of-range indices) run in a child process, so that a
crash is reported with the case that caused it rather than taking the test run down."""

import re
import subprocess
import sys

import pytest
import torch

from visionmoe import ops, reference

_ops = torch.ops.visionmoe


def samples():
    """Valid CPU arguments of every operator, small."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    T, D, E, K, C, F = 6, 4, 3, 2, 3, 5
    token_index = torch.arange(T).repeat_interleave(K)
    expert_index = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1).flatten()
    _, sorted_token, sorted_expert, slot, offsets = _ops.make_plan(token_index, expert_index, E, T, True)
    token_offsets, token_rows = _ops.token_major(sorted_token, T)
    plan = (sorted_token, sorted_expert, slot, offsets)
    A = T * K
    weight = torch.rand(A, generator=generator)

    logits = randn(2, 5, 3)
    _, row_potentials, column_potentials = _ops.sinkhorn(logits, 3)

    padded = (randn(E, C, D), randn(E, D, F), randn(E, F), randn(E, F, D), randn(E, D))
    _, pre_activation = _ops.expert_mlp(*padded, None, "gelu")

    student, teacher = randn(T, E), torch.softmax(randn(T, E), -1)
    _, student_lse, teacher_lse = _ops.teacher_routing_loss(student, teacher, "mean", "probabilities")

    G, S = 2, 3
    q, k, v_tokens, v_slots, where = (
        randn(1, 2, 5, 4),
        randn(1, 2, S, 4),
        randn(1, 2, 5, 6),
        randn(1, 2, S, 6),
        randn(1, 2, 5, S),
    )
    _, _, attention_logits, token_lse, slot_lse = _ops.whatwhere_attention(q, k, v_tokens, v_slots, where)

    return {
        "make_plan": (token_index, expert_index, E, T, True),
        "token_major": (sorted_token, T),
        # Without validation, so that the sweep's bad indices reach the kernels.
        "dispatch": (randn(T, D), *plan, token_offsets, token_rows, C, True, False),
        "dispatch_backward": (randn(E, C, D), *plan, token_offsets, token_rows, C),
        "combine": (randn(A, D), weight, *plan, token_offsets, token_rows, C, False),
        "combine_backward": (randn(T, D), randn(E, C, D), weight, *plan, C),
        "topk_route": (torch.rand(2, T, E, generator=generator), K, True),
        "expert_choice_route": (torch.rand(2, T, E, generator=generator), 2),
        "sinkhorn": (logits, 3, True),
        "sinkhorn_backward": (randn(2, 5, 3), logits, row_potentials, column_potentials),
        "expert_mlp": (randn(A, D), *padded[1:], offsets, "gelu"),
        "expert_mlp_backward": (randn(E, C, D), padded[0], padded[1], padded[3], pre_activation, None, "gelu"),
        "soft_dispatch": (randn(G, T, D), randn(G, T, S)),
        "soft_dispatch_backward": (randn(G, S, D), randn(G, T, D), randn(G, T, S)),
        "soft_combine": (randn(G, S, D), randn(G, T, S)),
        "soft_combine_backward": (randn(G, T, D), randn(G, S, D), randn(G, T, S)),
        "teacher_routing_loss": (student, teacher, "mean", "probabilities"),
        "teacher_routing_loss_backward": (
            torch.tensor(1.0),
            student,
            teacher,
            student_lse,
            teacher_lse,
            "mean",
            "probabilities",
        ),
        "whatwhere_attention": (q, k, v_tokens, v_slots, where),
        "whatwhere_attention_backward": (
            randn(1, 2, 5, 6),
            randn(1, 2, S, 6),
            randn(1, 2, 5, S),
            q,
            k,
            v_tokens,
            v_slots,
            attention_logits,
            token_lse,
            slot_lse,
        ),
    }


def schema_names(name):
    return [argument.name for argument in getattr(_ops, name).default._schema.arguments]


def tensor_positions(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


OPERATORS = sorted(samples())


def test_every_operator_has_samples():
    registered = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
        if name.startswith("visionmoe::")
    }
    assert registered == set(OPERATORS)


def tensor_arguments():
    return [(name, i) for name in OPERATORS for i in tensor_positions(samples()[name])]


@pytest.mark.parametrize("name,position", tensor_arguments())
def test_a_meta_tensor_beside_cpu_ones_is_rejected(name, position):
    # The Meta kernel (the fake kernel) runs as soon as one argument is a meta tensor; it returned uninitialised
    # CPU tensors, e.g. a teacher_routing_loss of -3.4e38, instead of rejecting the mix.
    args = list(samples()[name])
    if len(tensor_positions(args)) == 1:
        pytest.skip("a single tensor argument cannot be on another device than the others")
    argument = schema_names(name)[position]
    args[position] = args[position].to("meta")
    with pytest.raises(ValueError, match=f"^{name}: .*must be on") as error:
        getattr(_ops, name)(*args)
    # The message names the argument, either as the one on the wrong device or as the one the others must follow.
    assert re.search(rf"\b{argument}\b", str(error.value)), str(error.value)


@pytest.mark.parametrize("name", OPERATORS)
def test_all_meta_inputs_give_the_shapes_of_the_real_kernels(name):
    args = samples()[name]
    expected = as_tuple(getattr(_ops, name)(*args))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    for out, real in zip(as_tuple(getattr(_ops, name)(*meta)), expected):
        assert out.device.type == "meta" and out.shape == real.shape and out.dtype == real.dtype


def non_contiguous_views(t):
    """Views of t's values with other strides: every second element of a wider tensor, and (2-D and up) the
    transpose of a transposed copy."""
    views = [torch.stack([t, t], -1)[..., 0]]
    if t.dim() >= 2:
        views.append(t.transpose(-1, -2).contiguous().transpose(-1, -2))
    return [v for v in views if not v.is_contiguous()]


@pytest.mark.parametrize("name,position", tensor_arguments())
def test_non_contiguous_inputs_give_the_same_result(name, position):
    args = samples()[name]
    expected = as_tuple(getattr(_ops, name)(*args))
    for view in non_contiguous_views(args[position]):
        changed = list(args)
        changed[position] = view
        for out, real in zip(as_tuple(getattr(_ops, name)(*changed)), expected):
            assert torch.equal(out, real), schema_names(name)[position]


# ---- bad-input sweep: each case either raises a clear error (ValueError or TypeError naming the operator) or
# returns; none may crash ----


def tensor_variants(t):
    """(label, replacement) pairs of bad versions of one tensor argument."""
    variants = [
        ("an extra dimension", t.unsqueeze(0)),
        ("one dimension less", t[0] if t.dim() and t.shape[0] else t.reshape(-1)),
    ]
    if t.is_floating_point():
        variants += [("int32", t.to(torch.int32)), ("float64", t.double()), ("float16", t.half())]
        if t.numel():
            for label, value in (("NaN", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
                bad = t.clone()
                bad.view(-1)[t.numel() // 2] = value
                variants.append((label, bad))
    else:
        variants += [("float32", t.float()), ("int32", t.int())]
        if t.numel():
            variants += [
                ("values + 1000", t + 1000),
                ("values - 1000", t - 1000),
                ("reversed", t.flip(0)),
                ("all 2**62", torch.full_like(t, 2**62)),
                ("doubled", t * 2),
            ]
    if t.dim() and t.numel():
        variants.append(("one value expanded (stride 0)", t.flatten()[:1].view([1] * t.dim()).expand(t.shape)))
    if t.dim():
        variants += [
            ("empty first dimension", t[:0]),
            ("one row more", torch.cat([t, t[:1]])),
            ("one column less", t.narrow(-1, 0, max(t.shape[-1] - 1, 0))),
        ]
        if t.shape[0] > 1:
            variants.append(("one row less", t[:-1]))
    return variants


SCALAR_VARIANTS = {
    int: lambda value: (-1, 0, 2**40),
    bool: lambda value: (not value,),
    str: lambda value: ("", "nonsense"),
}


def sweep_cases():
    """(case id, operator name, arguments) of every bad-input case."""
    cases = []
    for name, args in samples().items():
        names = schema_names(name)
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                replacements = tensor_variants(arg)
            elif type(arg) in SCALAR_VARIANTS:
                replacements = [(repr(value), value) for value in SCALAR_VARIANTS[type(arg)](arg)]
            else:
                continue
            for label, replacement in replacements:
                bad = list(args)
                bad[i] = replacement
                cases.append((f"{name}: {names[i]} {label}", name, tuple(bad)))
    return cases


def run_sweep():
    """Child process: runs every case, printing its id before and its verdict after, flushed, so that the parent
    can name the case of a crash."""
    for case_id, name, args in sweep_cases():
        print(f"CASE {case_id}", flush=True)
        try:
            getattr(_ops, name)(*args)
            verdict = "returned"
        except (RuntimeError, ValueError, TypeError) as error:
            message = str(error).splitlines()[0]
            # Sizes beyond memory fail in the allocator, which says so.
            clear = f"{name}:" in message or "can't allocate memory" in message
            verdict = "clear" if clear else f"UNCLEAR {message}"
        except Exception as error:  # noqa: BLE001  (any other exception type is a finding)
            verdict = f"UNEXPECTED {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"DONE {verdict}", flush=True)


def test_bad_input_sweep_never_crashes():
    result = subprocess.run([sys.executable, __file__, "--sweep"], capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    cases = [line[5:] for line in lines if line.startswith("CASE ")]
    if result.returncode != 0:
        pytest.fail(
            f"the sweep crashed (exit code {result.returncode}) on case {cases[-1] if cases else None!r}:\n"
            f"{result.stderr[-2000:]}"
        )
    verdicts = [line[5:] for line in lines if line.startswith("DONE ")]
    findings = [
        f"{case}: {verdict}" for case, verdict in zip(cases, verdicts) if verdict.startswith(("UNCLEAR", "UNEXPECTED"))
    ]
    assert len(cases) > 500 and not findings, "\n".join(findings)


if __name__ == "__main__" and sys.argv[1:] == ["--sweep"]:
    run_sweep()


@pytest.mark.parametrize(
    "call",
    [
        lambda device: ops.sinkhorn(torch.zeros(2, 0, 3, device=device)),
        lambda device: ops.soft_dispatch(torch.zeros(1, 0, 2, device=device), torch.zeros(1, 0, 3, device=device)),
        lambda device: ops.soft_combine(torch.zeros(1, 0, 2, device=device), torch.zeros(1, 4, 0, device=device)),
        lambda device: ops.teacher_routing_loss(torch.zeros(3, 0, device=device), torch.zeros(3, 0, device=device)),
    ],
    ids=["sinkhorn_no_tokens", "soft_dispatch_no_tokens", "soft_combine_no_slots", "teacher_routing_no_experts"],
)
def test_fake_kernels_reject_the_empty_sizes_the_kernels_reject(call):
    # torch.compile traces with the fake kernels: an input the CPU rejects must not trace into a graph.
    with pytest.raises(ValueError) as on_cpu:
        call("cpu")
    with pytest.raises(ValueError) as on_meta:
        call("meta")
    assert str(on_cpu.value).split(":")[0] == str(on_meta.value).split(":")[0]


def test_routing_rejects_integer_combine_weights():
    scores = torch.rand(4, 3)
    with pytest.raises(TypeError, match="weights must be a floating-point tensor"):
        ops.topk_route(scores, 1, weights=torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="weights must be a floating-point tensor"):
        ops.expert_choice_route(scores, 2, weights=torch.ones(4, 3, dtype=torch.long))


def test_reference_combine_of_zero_width_rows():
    plan = ops.make_plan(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), torch.rand(3), 2, 2, num_tokens=2)
    expert_out = torch.zeros(2, 2, 0)
    assert reference.combine(expert_out, plan, 2).shape == ops.combine(expert_out, plan, 2).shape == (2, 0)
