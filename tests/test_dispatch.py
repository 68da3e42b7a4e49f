"""Routing plans, dispatch and combine: reference agreement, gradcheck, opcheck, torch.compile, bad input."""

import pytest
import torch
from op_contract import OpTester

import visionmoe
from visionmoe import ops
from visionmoe import reference as ref

TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def top_k_assignments(num_tokens, num_experts, k, device, dtype=torch.float32, seed=0):
    """Each token picks k distinct experts; assignments are listed all first choices first (priority order)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    expert_index = scores.topk(k, dim=1).indices.t().reshape(-1)
    token_index = torch.arange(num_tokens).repeat(k)
    weight = torch.rand(num_tokens * k, generator=generator) + 0.1
    return token_index.to(device), expert_index.to(device), weight.to(device=device, dtype=dtype)


def plans(token_index, expert_index, weight, num_experts, capacity, num_tokens):
    kwargs = dict(num_tokens=num_tokens)
    return (
        ops.make_plan(token_index, expert_index, weight, num_experts, capacity, **kwargs),
        ref.make_plan(token_index, expert_index, weight, num_experts, capacity, **kwargs),
    )


PLAN_FIELDS = ("sorted_token", "sorted_expert", "slot", "offsets", "order", "token_offsets", "token_rows")


def route_and_mix_of(module):
    """``module``'s make_plan, dispatch and combine around an expert function, as the contract calls an op: its
    plan, the dispatched rows and the combined output. ``expert_bias`` makes combine's own input differentiable
    and gives the empty slots' rows values that combine must ignore."""

    def route_and_mix(x, weight, expert_bias, token_index, expert_index, num_experts, capacity, layout):
        T = x.shape[0]
        plan = module.make_plan(token_index, expert_index, weight, num_experts, capacity, num_tokens=T)
        hidden = module.dispatch(x, plan, layout)
        return plan, hidden, module.combine((hidden * 2 + 1).tanh() + expert_bias, plan, T)

    return route_and_mix


def route_and_mix(x, token_index, expert_index, weight, num_experts, capacity):
    plan = ops.make_plan(
        token_index, expert_index, weight, num_experts, capacity, num_tokens=x.shape[0], validate=False
    )
    layout = "packed" if capacity is None else "padded"
    hidden = ops.dispatch(x, plan, layout)
    return ops.combine(torch.relu(hidden) * 2, plan, x.shape[0])


def op_samples(device, capacity, padded):
    T, D, E = 7, 4, 3
    token_index, expert_index, weight = top_k_assignments(T, E, 2, device)
    plan = ops.make_plan(token_index, expert_index, weight, E, capacity, num_tokens=T)
    x = torch.randn(T, D, device=device, requires_grad=True)
    plan_tensors = (plan.sorted_token, plan.sorted_expert, plan.slot, plan.offsets)
    token_view = (plan.token_offsets, plan.token_rows)
    rows = ops.dispatch(x.detach(), plan, "padded" if padded else "packed").requires_grad_()
    w = plan.weight.detach().requires_grad_()
    grad_y = torch.randn(T, D, device=device)
    return {
        "make_plan": (token_index, expert_index, E, T, True),
        "token_major": (plan.sorted_token, T),
        "dispatch": (x, *plan_tensors, *token_view, capacity, padded, True),
        "dispatch_backward": (rows.detach(), *plan_tensors, *token_view, capacity),
        "combine": (rows, w, *plan_tensors, *token_view, capacity, True),
        "combine_backward": (grad_y, rows.detach(), w.detach(), *plan_tensors, capacity),
    }


OP_NAMES = ("make_plan", "token_major", "dispatch", "dispatch_backward", "combine", "combine_backward")


class DispatchTester(OpTester):
    """make_plan, dispatch and combine together, in one layout; cases are (T, D, E, K, capacity)."""

    op = staticmethod(route_and_mix_of(ops))
    reference = staticmethod(route_and_mix_of(ref))
    dtypes = list(TOLERANCES)
    tolerances = TOLERANCES
    # The reference rounds each product to the dtype before summing; the kernels accumulate in float32.
    grad_tolerances = {torch.float16: dict(atol=5e-3, rtol=5e-3)}
    layout = None
    compile_capacity = None

    def outputs(self, result):
        if isinstance(result, torch.Tensor):  # route_and_mix's output, under compile
            return [result]
        plan, hidden, y = result
        # A gather is exact: its bits are compared, as integers, which assert_close compares exactly.
        bits = hidden.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[hidden.element_size()])
        return [getattr(plan, field) for field in PLAN_FIELDS] + [bits, y]

    def inputs(self, T, D, E, K, capacity, device, dtype):
        token_index, expert_index, weight = top_k_assignments(T, E, K, device, dtype)
        x = torch.randn(T, D, device=device, dtype=dtype)
        plan = ref.make_plan(token_index, expert_index, weight, E, capacity, num_tokens=T)
        expert_bias = torch.randn_like(ref.dispatch(x, plan, self.layout))
        return (
            x.requires_grad_(),
            weight.requires_grad_(),
            expert_bias.requires_grad_(),
            token_index,
            expert_index,
            E,
            capacity,
            self.layout,
        )

    def sample_inputs(self, device, dtype, case):
        return self.inputs(*case, device, dtype)

    def gradcheck_inputs(self, device, capacity):
        return self.inputs(6, 3, 3, 2, capacity, device, torch.float64)

    def opcheck_sample(self, device, case):
        name, capacity = case
        return getattr(torch.ops.visionmoe, name).default, op_samples(device, capacity, self.layout == "padded")[name]

    compile_fn = staticmethod(route_and_mix)

    def compile_inputs(self, device):
        samples = []
        for T in (24, 41):  # a second size must reuse the dynamic graph, not break it
            token_index, expert_index, weight = top_k_assignments(T, 4, 2, device)
            x = torch.randn(T, 16, device=device, requires_grad=True)
            samples.append((x, token_index, expert_index, weight.requires_grad_(), 4, self.compile_capacity))
        return samples

    def determinism_inputs(self, device):
        return self.inputs(2000, 64, 8, 4, self.determinism_capacity, device, torch.float32)


class TestPaddedDispatch(DispatchTester):
    layout = "padded"
    cases = [
        (37, 24, 4, 2, 12),  # some assignments dropped
        (37, 24, 4, 2, 40),  # capacity larger than any expert's load: nothing dropped, empty slots
        (37, 24, 4, 2, 0),  # everything dropped
        (64, 33, 8, 1, 9),  # odd width: no vectorised fast path on CUDA
    ]
    gradcheck_cases = [3]
    opcheck_cases = [(name, 3) for name in OP_NAMES]
    compile_capacity = 8
    determinism_capacity = 500


class TestPackedDispatch(DispatchTester):
    layout = "packed"
    cases = [
        (37, 24, 4, 2, 12),
        (37, 24, 4, 2, None),  # dropless
        (5, 8, 3, 3, None),  # K = E
    ]
    gradcheck_cases = [3, None]
    opcheck_cases = [(name, capacity) for name in OP_NAMES for capacity in (3, None)]
    determinism_capacity = None


def test_plan_is_stable_and_keeps_priority(device):
    # expert 1 receives tokens 4, 0, 2 in that priority order; with capacity 2, token 2 is dropped.
    token_index = torch.tensor([4, 1, 0, 3, 2], device=device)
    expert_index = torch.tensor([1, 0, 1, 2, 1], device=device)
    weight = torch.ones(5, device=device)
    plan = ops.make_plan(token_index, expert_index, weight, 3, capacity=2, num_tokens=5)
    assert plan.sorted_token.tolist() == [1, 4, 0, 2, 3]
    assert plan.sorted_expert.tolist() == [0, 1, 1, 1, 2]
    assert plan.slot.tolist() == [0, 0, 1, 2, 0]
    assert plan.offsets.tolist() == [0, 1, 4, 5]
    assert plan.order.tolist() == [1, 0, 2, 4, 3]
    assert plan.kept().tolist() == [True, True, True, False, True]
    assert plan.expert_load().tolist() == [1, 2, 1]
    assert plan.dropped_fraction().item() == pytest.approx(0.2)
    # token 2's only assignment was dropped, so it gets zeros; the others get their single expert row.
    x = torch.arange(10.0, device=device).view(5, 2)
    y = ops.combine(ops.dispatch(x, plan, "padded"), plan, 5)
    assert y.tolist() == [[0, 1], [2, 3], [0, 0], [6, 7], [8, 9]]


def test_every_token_prefers_one_expert(device):
    T, E, C = 20, 4, 6
    token_index = torch.arange(T, device=device)
    expert_index = torch.full((T,), 2, device=device)
    weight = torch.rand(T, device=device)
    plan, plan_ref = plans(token_index, expert_index, weight, E, C, T)
    assert plan.expert_load().tolist() == [0, 0, C, 0]
    x = torch.randn(T, 8, device=device)
    out = ops.dispatch(x, plan, "padded")
    assert torch.equal(out, ref.dispatch(x, plan_ref, "padded"))
    assert torch.equal(out[2], x[:C]) and not out[[0, 1, 3]].any()
    torch.testing.assert_close(ops.combine(out, plan, T), ref.combine(out, plan_ref, T))


def test_empty_input(device):
    empty = torch.empty(0, dtype=torch.long, device=device)
    plan = ops.make_plan(empty, empty, torch.empty(0, device=device), 4, capacity=3, num_tokens=0)
    assert plan.offsets.tolist() == [0] * 5
    x = torch.empty(0, 16, device=device)
    out = ops.dispatch(x, plan, "padded")
    assert out.shape == (4, 3, 16) and not out.any()
    assert ops.combine(out, plan, 0).shape == (0, 16)
    assert ops.dispatch(x, plan, "packed").shape == (0, 16)


def test_plan_without_token_view_gives_the_same_result(device):
    T, E = 30, 5
    token_index, expert_index, weight = top_k_assignments(T, E, 2, device)
    with_view = ops.make_plan(token_index, expert_index, weight, E, 10, num_tokens=T)
    without_view = ops.make_plan(token_index, expert_index, weight, E, 10)
    assert without_view.token_offsets is None
    x = torch.randn(T, 12, device=device)
    hidden = ops.dispatch(x, without_view, "padded")
    assert torch.equal(hidden, ops.dispatch(x, with_view, "padded"))
    assert torch.equal(ops.combine(hidden, without_view, T), ops.combine(hidden, with_view, T))


@pytest.mark.parametrize("deterministic_mode", [False, True])
def test_deterministic(device, deterministic_mode):
    # Beyond the contract, which sets the deterministic flag on CUDA only: dispatch and combine are deterministic
    # in either mode, on either device.
    T, D, E = 2000, 64, 8
    token_index, expert_index, weight = top_k_assignments(T, E, 4, device)
    x = torch.randn(T, D, device=device, requires_grad=True)
    w = weight.requires_grad_()
    runs = []
    previous_mode = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        for _ in range(2):
            plan = ops.make_plan(token_index, expert_index, w, E, 500, num_tokens=T)
            y = ops.combine(ops.dispatch(x, plan, "padded") * 3, plan, T)
            grad_x, grad_w = torch.autograd.grad(y.square().sum(), (x, w))
            runs.append((y, grad_x, grad_w))
    finally:
        torch.use_deterministic_algorithms(previous_mode)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_compile_inductor_smoke(device):
    torch._dynamo.reset()
    compiled = torch.compile(route_and_mix, fullgraph=True)
    token_index, expert_index, weight = top_k_assignments(32, 4, 2, device)
    x = torch.randn(32, 16, device=device)
    torch.testing.assert_close(
        compiled(x, token_index, expert_index, weight, 4, 10),
        route_and_mix(x, token_index, expert_index, weight, 4, 10),
    )


# ---- bad input: clear errors naming the argument ----


def small_plan(device="cpu", capacity=4, num_tokens=6):
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, device)
    return ops.make_plan(token_index, expert_index, weight, 3, capacity, num_tokens=num_tokens)


def test_negative_capacity_is_rejected():
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, "cpu")
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ops.make_plan(token_index, expert_index, weight, 3, capacity=-1)
    plan = small_plan()
    args = (
        torch.randn(6, 4),
        plan.sorted_token,
        plan.sorted_expert,
        plan.slot,
        plan.offsets,
        plan.token_offsets,
        plan.token_rows,
    )
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        torch.ops.visionmoe.dispatch(*args, -2, True)


def test_token_index_out_of_range(device):
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, device)
    bad_tokens = token_index.clone()
    bad_tokens[3] = 6
    with pytest.raises(ValueError, match=r"token_index out of range: token_index\[3\] = 6"):
        ops.make_plan(bad_tokens, expert_index, weight, 3, 4, num_tokens=6)
    bad_tokens[3] = -1
    with pytest.raises(ValueError, match="token_index out of range"):
        ops.make_plan(bad_tokens, expert_index, weight, 3, 4)


def test_token_index_beyond_x_is_rejected():
    # A plan made without num_tokens is checked when it meets x.
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, "cpu")
    plan = ops.make_plan(token_index, expert_index, weight, 3, 4)
    with pytest.raises(ValueError, match="sorted_token out of range"):
        ops.dispatch(torch.randn(5, 4), plan, "padded")
    with pytest.raises(ValueError, match="sorted_token out of range"):
        ops.combine(torch.randn(3, 4, 4), plan, 5)


def test_expert_index_out_of_range(device):
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, device)
    expert_index[5] = 3
    with pytest.raises(ValueError, match=r"expert_index out of range: expert_index\[5\] = 3"):
        ops.make_plan(token_index, expert_index, weight, 3, 4)


def test_wrong_dtypes_are_rejected():
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, "cpu")
    with pytest.raises(TypeError, match="expert_index must have dtype int64"):
        ops.make_plan(token_index, expert_index.int(), weight, 3, 4)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        ops.make_plan(token_index, expert_index, weight.long(), 3, 4)
    plan = small_plan()
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.dispatch(torch.ones(6, 4, dtype=torch.long), plan, "padded")
    rows = torch.randn(3, 4, 5)
    plan_args = (plan.sorted_token, plan.sorted_expert, plan.slot, plan.offsets)
    with pytest.raises(TypeError, match=r"weight must have the dtype of expert_out \(Float\)"):
        torch.ops.visionmoe.combine(rows, plan.weight.double(), *plan_args, plan.token_offsets, plan.token_rows, 4)


def test_wrong_device_is_rejected():
    plan = small_plan()
    with pytest.raises(ValueError, match="x is on meta but the plan is on cpu"):
        ops.dispatch(torch.randn(6, 4, device="meta"), plan, "padded")
    with pytest.raises(ValueError, match="expert_out is on meta but the plan is on cpu"):
        ops.combine(torch.randn(3, 4, 4, device="meta"), plan, 6)
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, "cpu")
    with pytest.raises(ValueError, match="weight must be on cpu"):
        ops.make_plan(token_index, expert_index, weight.to("meta"), 3, 4)


@pytest.mark.cuda
def test_cpu_plan_with_cuda_tensor_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    plan = small_plan()
    with pytest.raises(ValueError, match="x is on cuda:0 but the plan is on cpu"):
        ops.dispatch(torch.randn(6, 4, device="cuda"), plan, "padded")
    args = (plan.sorted_token, plan.sorted_expert, plan.slot, plan.offsets, plan.token_offsets, plan.token_rows)
    with pytest.raises(ValueError, match="sorted_token must be on cuda:0"):
        torch.ops.visionmoe.dispatch(torch.randn(6, 4, device="cuda"), *args, 4, True)


def test_inconsistent_plan_shapes_are_rejected():
    plan = small_plan()
    with pytest.raises(ValueError, match=r"expert_out must have shape \[E, C, D\] = \[3, 4, D\]"):
        ops.combine(torch.randn(3, 5, 4), plan, 6)
    with pytest.raises(ValueError, match=r"expert_out must have shape \[M, D\] = \[12, D\]"):
        ops.combine(torch.randn(11, 4), plan, 6)
    with pytest.raises(ValueError, match="num_tokens=7 but the plan was made for 6 tokens"):
        ops.combine(torch.randn(3, 4, 4), plan, 7)
    with pytest.raises(ValueError, match="token_offsets describes 6 tokens but x has 5"):
        ops.dispatch(torch.randn(5, 4), plan, "padded")
    broken = visionmoe.RoutingPlan(**{**plan.__dict__, "slot": plan.slot[:-1]})
    with pytest.raises(ValueError, match="plan shapes are inconsistent: sorted_token, sorted_expert and slot"):
        ops.dispatch(torch.randn(6, 4), broken, "padded")
    with pytest.raises(ValueError, match="plan shapes are inconsistent: weight must have shape"):
        ops.combine(torch.randn(3, 4, 4), visionmoe.RoutingPlan(**{**plan.__dict__, "weight": plan.weight[:3]}), 6)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.make_plan(plan.order, plan.order, torch.ones(3), 3)


def test_bad_layout_and_dropless_padded_are_rejected():
    plan = small_plan(capacity=None)
    with pytest.raises(ValueError, match="padded layout needs a capacity"):
        ops.dispatch(torch.randn(6, 4), plan, "padded")
    with pytest.raises(ValueError, match="layout must be one of"):
        ops.dispatch(torch.randn(6, 4), plan, "dense")


def test_num_experts_must_be_positive():
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        ops.make_plan(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.ones(1), 0)


def test_build_info():
    info = visionmoe.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and info["num_threads"] >= 1
    if torch.cuda.is_available():
        assert info["cuda"], "a GPU is present but this build has no CUDA kernels"


# ---- index tensors of any stride ----


def strided(t):
    """t's values in a view with stride 2 (a column of a wider tensor), as slicing with a step gives."""
    view = torch.stack([t, torch.full_like(t, 10**12)], 1)[:, 0]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def mix_with_grads(x, plan, layout, num_tokens):
    x = x.detach().clone().requires_grad_()
    weight = plan.weight.detach().clone().requires_grad_()
    plan = visionmoe.RoutingPlan(**{**plan.__dict__, "weight": weight})
    hidden = ops.dispatch(x, plan, layout)
    y = ops.combine(hidden * torch.linspace(0.5, 1.5, hidden.shape[-1], device=x.device), plan, num_tokens)
    y.backward(torch.linspace(-1, 1, y.numel(), device=x.device).view(y.shape))
    return hidden.detach(), y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("capacity,layout", [(5, "padded"), (5, "packed"), (None, "packed")])
def test_strided_plan_tensors_give_the_same_result(device, capacity, layout):
    # Index tensors were read as if contiguous: a strided view gave other rows, or read past its storage.
    T, E = 11, 4
    token_index, expert_index, weight = top_k_assignments(T, E, 2, device)
    plan = ops.make_plan(token_index, expert_index, weight, E, capacity, num_tokens=T)
    fields = ("sorted_token", "sorted_expert", "slot", "offsets", "token_offsets", "token_rows")
    views = visionmoe.RoutingPlan(**{**plan.__dict__, **{f: strided(getattr(plan, f)) for f in fields}})
    x = torch.randn(T, 8, device=device)
    for expected, actual in zip(mix_with_grads(x, plan, layout, T), mix_with_grads(x, views, layout, T)):
        assert torch.equal(actual, expected)
    expert_out = (
        torch.randn(plan.num_assignments, 8, device=device)
        if layout == "packed"
        else torch.randn(E, capacity, 8, device=device)
    )
    args = (plan.sorted_token, plan.sorted_expert, plan.slot, plan.offsets)
    strided_args = tuple(strided(t) for t in args)
    grad_y = torch.randn(T, 8, device=device)
    transposed_grad_y = grad_y.t().contiguous().t()
    for expected, actual in zip(
        torch.ops.visionmoe.combine_backward(grad_y, expert_out, plan.weight, *args, capacity),
        torch.ops.visionmoe.combine_backward(
            transposed_grad_y, expert_out, strided(plan.weight), *strided_args, capacity
        ),
    ):
        assert torch.equal(actual, expected)


def test_expanded_plan_tensors(device):
    # Every assignment of one token to one expert: stride-0 views of one value are valid index tensors.
    A, capacity = 5, 3
    plan = ops.make_plan(
        torch.zeros(A, dtype=torch.long, device=device),
        torch.zeros(A, dtype=torch.long, device=device),
        torch.rand(A, device=device),
        1,
        capacity,
        num_tokens=1,
    )
    zeros = torch.zeros(1, dtype=torch.long, device=device).expand(A)
    expanded = visionmoe.RoutingPlan(**{**plan.__dict__, "sorted_token": zeros, "sorted_expert": zeros})
    x = torch.randn(1, 6, device=device)
    for layout in ("padded", "packed"):
        for expected, actual in zip(mix_with_grads(x, plan, layout, 1), mix_with_grads(x, expanded, layout, 1)):
            assert torch.equal(actual, expected)


# ---- hand-made plans: checked with validate=True (the default), never out of bounds without ----


def inconsistent_plans(plan, T):
    """(what is wrong, expected message, plan) for variations of a consistent plan over T tokens."""

    def changed(**fields):
        return visionmoe.RoutingPlan(**{**plan.__dict__, **fields})

    def with_value(tensor, index, value):
        tensor = tensor.clone()
        tensor[index] = value
        return tensor

    offsets, slot, token_rows = plan.offsets, plan.slot, plan.token_rows
    M = plan.num_assignments
    swapped_rows = token_rows.clone()
    swapped_rows[[0, 1]] = token_rows[[1, 0]]
    return [
        ("offsets start above 0", r"offsets\[0\] must be 0, got 1", changed(offsets=with_value(offsets, 0, 1))),
        (
            "offsets decrease",
            r"offsets must be non-decreasing, got offsets\[2\] = 0 < offsets\[1\]",
            changed(offsets=with_value(offsets, 2, 0)),
        ),
        (
            "offsets end before M",
            rf"offsets\[E\] must be M = {M} \(the number of assignments\), got {M - 1}",
            changed(offsets=with_value(offsets, -1, M - 1)),
        ),
        (
            "sorted_expert disagrees with offsets",
            r"sorted_expert\[0\] = 2 but offsets place assignment 0 in expert 0",
            changed(sorted_expert=with_value(plan.sorted_expert, 0, 2)),
        ),
        (
            "slots are not ranks",
            r"slot\[1\] = 0 but assignment 1 is number 1 of its expert",
            changed(slot=with_value(slot, 1, 0)),
        ),
        (
            "token out of range",
            rf"sorted_token\[3\] = {T} is not a token index in \[0, {T}\)",
            changed(sorted_token=with_value(plan.sorted_token, 3, T)),
        ),
        (
            "negative token",
            r"sorted_token\[0\] = -1 is not a token index",
            changed(sorted_token=with_value(plan.sorted_token, 0, -1)),
        ),
        (
            "token_offsets start above 0",
            r"token_offsets\[0\] must be 0, got 1",
            changed(token_offsets=with_value(plan.token_offsets, 0, 1)),
        ),
        (
            "token_offsets end before M",
            rf"token_offsets\[T\] must be M = {M}",
            changed(token_offsets=with_value(plan.token_offsets, -1, M - 1)),
        ),
        (
            "token_rows out of order",
            r"token_rows must list each token's assignments in increasing order",
            changed(token_rows=swapped_rows),
        ),
        (
            "token_rows out of range",
            r"token_rows must list .* token_rows\[2\] = 99 is not the next assignment",
            changed(token_rows=with_value(token_rows, 2, 99)),
        ),
        (
            "token_rows of another token",
            r"token_rows must list each token's assignments",
            changed(token_rows=with_value(token_rows, 0, token_rows[-1].item())),
        ),
    ]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_inconsistent_plans_are_rejected_when_validating(device, layout):
    T, E, D = 9, 3, 4
    token_index, expert_index, weight = top_k_assignments(T, E, 2, device)
    plan = ops.make_plan(token_index, expert_index, weight, E, 4, num_tokens=T)
    x = torch.randn(T, D, device=device)
    expert_out = ops.dispatch(x, plan, layout)
    for what, message, bad in inconsistent_plans(plan, T):
        with pytest.raises(ValueError, match="dispatch: plan is inconsistent: " + message):
            ops.dispatch(x, bad, layout)
        with pytest.raises(ValueError, match="combine: plan is inconsistent: " + message):
            ops.combine(expert_out, bad, T)
        # Without validation the result is unspecified, but the kernels stay within the tensors (on CPU they
        # raise on an index that points outside them).
        for call in (
            lambda: ops.dispatch(x, bad, layout, validate=False),
            lambda: ops.combine(expert_out, bad, T, validate=False),
        ):
            try:
                call()
            except ValueError as error:
                assert "plan is inconsistent" in str(error) or "out of range" in str(error), what


def test_router_plans_pass_validation(device):
    probs = torch.softmax(torch.randn(2, 10, 4, device=device), -1)
    x = torch.randn(20, 6, device=device)
    for plan in (
        ops.topk_route(probs, 2, 3, batch_priority=True),
        ops.topk_route(probs, 2),
        ops.expert_choice_route(probs, 4),
    ):
        layout = "packed" if plan.capacity is None else "padded"
        hidden = ops.dispatch(x, plan, layout)
        assert torch.equal(hidden, ops.dispatch(x, plan, layout, validate=False))
        assert torch.equal(ops.combine(hidden, plan, 20), ops.combine(hidden, plan, 20, validate=False))


def test_mixed_devices_in_backward_are_rejected():
    plan = small_plan()
    rows = torch.randn(3, 4, 4)
    args = (plan.sorted_token, plan.sorted_expert, plan.slot, plan.offsets, 4)
    with pytest.raises(ValueError, match="combine_backward: grad_y must be on cpu like expert_out, got meta"):
        torch.ops.visionmoe.combine_backward(torch.randn(6, 4, device="meta"), rows, plan.weight, *args)
    with pytest.raises(ValueError, match="combine_backward: weight must be on cpu like expert_out, got meta"):
        torch.ops.visionmoe.combine_backward(torch.randn(6, 4), rows, plan.weight.to("meta"), *args)


def test_wrapper_arguments_of_the_wrong_type_are_rejected():
    plan = small_plan()
    token_index, expert_index, weight = top_k_assignments(6, 3, 2, "cpu")
    with pytest.raises(ValueError, match="make_plan: capacity must be >= 0 and an integer, or None, got nan"):
        ops.make_plan(token_index, expert_index, weight, 3, float("nan"))
    with pytest.raises(ValueError, match="make_plan: num_tokens must be >= 0 and an integer, or None, got 6.0"):
        ops.make_plan(token_index, expert_index, weight, 3, 4, num_tokens=6.0)
    with pytest.raises(ValueError, match=r"dispatch: x must have shape \[T, D\], got NoneType"):
        ops.dispatch(None, plan)
    with pytest.raises(ValueError, match="combine: expert_out must be a tensor, got list"):
        ops.combine([], plan, 6)
    with pytest.raises(ValueError, match="combine: num_tokens must be >= 0 and an integer, got '6'"):
        ops.combine(torch.randn(3, 4, 4), plan, "6")
