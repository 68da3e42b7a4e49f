"""Router assignment operators (top-K token choice with BPR, expert choice): reference agreement, gradients,
opcheck, torch.compile, edge cases and bad input."""

import numpy as np
import pytest
import torch
from op_contract import OpTester

from visionmoe import ops
from visionmoe import reference as ref

PLAN_FIELDS = ("sorted_token", "sorted_expert", "slot", "offsets", "order", "token_offsets", "token_rows")


def random_probs(G, T, E, device, dtype=torch.float32, seed=0, ties=True):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.randn(G, T, E, generator=generator).softmax(-1)
    if ties and T > 3:
        probs[:, 1] = probs[:, 2]  # equal rows: equal best scores between tokens
        probs[:, 3, 1] = probs[:, 3, 0]  # equal scores within a token
    return probs.to(device=device, dtype=dtype)


def assert_same_plan(plan, expected):
    for field in PLAN_FIELDS:
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field
    assert plan.num_experts == expected.num_experts and plan.num_groups == expected.num_groups
    torch.testing.assert_close(plan.weight, expected.weight)


TOPK_CASES = [
    # (G, T, E, K, capacity, batch_priority)
    (1, 64, 4, 2, 20, True),
    (1, 64, 4, 2, 20, False),
    (3, 17, 5, 2, 4, True),  # several groups, drops in each
    (2, 9, 3, 3, None, True),  # K = E, dropless
    (4, 33, 8, 1, 3, False),
    (2, 10, 4, 1, 50, True),  # capacity larger than T
]


def topk_route_of(module):
    """``module.topk_route`` with its keyword arguments taken by position, as the contract calls ``op(*args)``."""

    def route(scores, k, capacity, batch_priority, renormalize, weights=None):
        return module.topk_route(
            scores, k, capacity, batch_priority=batch_priority, renormalize=renormalize, weights=weights
        )

    return route


def expert_choice_route_of(module):
    """``module.expert_choice_route`` with ``weights`` taken by position."""

    def route(scores, capacity, weights=None):
        return module.expert_choice_route(scores, capacity, weights=weights)

    return route


class RoutingPlanTester(OpTester):
    # Plans hold indices, which must agree exactly, and weights that are the scores' own values (or
    # renormalised), compared with assert_close's default tolerance for their dtype.
    tolerances = {dtype: {} for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}

    def outputs(self, result):
        if isinstance(result, torch.Tensor):  # compile_fn's mixed tokens
            return [result]
        sizes = torch.tensor([result.num_experts, result.num_groups])
        return [getattr(result, field) for field in PLAN_FIELDS] + [sizes, result.weight]

    def compile_inputs(self, device):
        return [
            (
                torch.randn(T, 8, device=device, requires_grad=True),
                torch.randn(1, T, 4, device=device, requires_grad=True),
            )
            for T in (16, 23)
        ]

    def determinism_inputs(self, device):
        return (random_probs(4, 3000, 8, device),) + self.determinism_arguments


class TestTopkRoute(RoutingPlanTester):
    op = staticmethod(topk_route_of(ops))
    reference = staticmethod(topk_route_of(ref))
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    cases = [case + (renormalize,) for case in TOPK_CASES for renormalize in (False, True)]
    determinism_arguments = (2, 500, True, False)

    def sample_inputs(self, device, dtype, case):
        G, T, E, K, capacity, batch_priority, renormalize = case
        return random_probs(G, T, E, device, dtype).requires_grad_(), K, capacity, batch_priority, renormalize

    def gradcheck_inputs(self, device, case):
        # The weights are differentiable; the scores only choose who goes where.
        probs = torch.randn(2, 7, 4, device=device, dtype=torch.float64).softmax(-1)
        return probs, 2, 3, False, True, probs.clone().requires_grad_()

    def opcheck_sample(self, device, case):
        return torch.ops.visionmoe.topk_route.default, (random_probs(2, 9, 4, device), 2, True)

    def compile_fn(self, x, logits):
        probs = logits.softmax(-1)
        plan = ops.topk_route(probs, 2, 6, batch_priority=True, weights=probs)
        return ops.combine(ops.dispatch(x, plan, "padded") * 2, plan, x.shape[0])


class TestExpertChoiceRoute(RoutingPlanTester):
    op = staticmethod(expert_choice_route_of(ops))
    reference = staticmethod(expert_choice_route_of(ref))
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    cases = [(1, 40, 4, 12), (3, 11, 5, 3), (2, 6, 3, 10), (2, 8, 4, 0)]  # (G, T, E, capacity)
    determinism_arguments = (700,)

    def sample_inputs(self, device, dtype, case):
        G, T, E, capacity = case
        return random_probs(G, T, E, device, dtype).requires_grad_(), capacity

    def gradcheck_inputs(self, device, case):
        logits = torch.randn(2, 7, 4, device=device, dtype=torch.float64)
        return logits, 3, logits.softmax(-1).requires_grad_()

    def opcheck_sample(self, device, case):
        return torch.ops.visionmoe.expert_choice_route.default, (random_probs(2, 9, 4, device), 3)

    def compile_fn(self, x, logits):
        plan = ops.expert_choice_route(logits.softmax(-1), 4)
        return ops.combine(ops.dispatch(x, plan, "padded"), plan, x.shape[0])


def test_batch_priority_fill_order(device):
    # One group, 4 tokens, 2 experts, K = 1, capacity 1. Every token prefers expert 0.
    probs = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.9, 0.1]]], device=device)
    by_position = ops.topk_route(probs, 1, 1)
    assert by_position.sorted_token[by_position.kept()].tolist() == [0]  # the first token in the image wins
    bpr = ops.topk_route(probs, 1, 1, batch_priority=True)
    # BPR ranks tokens 1 and 3 (0.9, tie -> lower index first), then 2 (0.7), then 0 (0.6).
    assert bpr.sorted_token.tolist() == [1, 3, 2, 0]
    assert bpr.slot.tolist() == [0, 1, 2, 3]
    assert bpr.sorted_token[bpr.kept()].tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_batch_priority_ranks_signed_zeros_alike(device, dtype):
    # Best scores -0.0 and +0.0 are equal, so Batch Priority keeps position order between them, as the reference
    # does; ordering keys made from the bits ranked -0.0 below +0.0 and gave token 1 the only slot.
    scores = torch.tensor([[[-0.0, -1.0], [0.0, -1.0], [-0.0, -2.0], [0.5, -1.0]]], dtype=dtype, device=device)
    plan = ops.topk_route(scores, 1, 2, batch_priority=True)
    assert plan.sorted_token.tolist() == [3, 0, 1, 2]
    assert plan.sorted_token[plan.kept()].tolist() == [3, 0]
    assert_same_plan(plan, ref.topk_route(scores, 1, 2, batch_priority=True))


@pytest.mark.parametrize("T", [7, 5000])  # CUDA sorts long columns by radix, short ones by comparison
def test_expert_choice_ranks_signed_zeros_alike(device, T):
    signs = torch.tensor([1.0, -1.0]).repeat(T)[:T]
    scores = (signs * 0.0).view(1, T, 1).expand(1, T, 2).to(device)  # +0, -0, +0, ... for both experts
    plan = ops.expert_choice_route(scores, 4)
    assert plan.sorted_token.view(2, 4).tolist() == [[0, 1, 2, 3]] * 2
    assert_same_plan(plan, ref.expert_choice_route(scores, 4))


def test_first_choices_fill_before_second_choices(device):
    # K = 2, capacity 2: expert 1 is token 0's second choice and token 1's first; the first choice wins the slot
    # order although token 0 comes first.
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.7, 0.1]]], device=device)
    plan = ops.topk_route(probs, 2, 2)
    expert1 = plan.sorted_token[plan.offsets[1] : plan.offsets[2]].tolist()
    assert expert1 == [1, 2, 0]  # first choices of tokens 1 and 2, then token 0's second choice
    assert plan.kept()[plan.offsets[1] : plan.offsets[2]].tolist() == [True, True, False]
    assert plan.order[plan.offsets[1] : plan.offsets[2]].tolist() == [1, 2, 3 + 0]  # choice * T + token


def test_ties_go_to_the_lower_expert(device):
    probs = torch.full((1, 3, 4), 0.25, device=device)
    plan = ops.topk_route(probs, 2, None)
    assert plan.sorted_expert.tolist() == [0, 0, 0, 1, 1, 1]


def test_every_token_prefers_one_expert(device):
    T, E, C = 30, 4, 8
    probs = torch.full((1, T, E), 0.1, device=device)
    probs[..., 2] = 0.7
    plan = ops.topk_route(probs, 1, C)
    assert plan.expert_load().tolist() == [0, 0, C, 0]
    assert plan.dropped_fraction().item() == pytest.approx(1 - C / T)


def test_groups_route_independently(device):
    # Two groups with different content; routing them together equals routing each alone.
    probs = random_probs(2, 12, 4, device)
    probs[1] = probs[1].roll(1, dims=-1)
    joint = ops.topk_route(probs, 2, 5, batch_priority=True)
    for g in range(2):
        alone = ops.topk_route(probs[g], 2, 5, batch_priority=True)
        mine = (joint.sorted_expert % 2) == g
        assert torch.equal(joint.sorted_token[mine] - g * 12, alone.sorted_token)
        assert torch.equal(joint.slot[mine], alone.slot)
        assert torch.equal(joint.sorted_expert[mine] // 2, alone.sorted_expert)


def test_empty_input(device):
    probs = torch.empty(2, 0, 4, device=device)
    plan = ops.topk_route(probs, 2, 3)
    assert plan.num_assignments == 0 and plan.offsets.tolist() == [0] * 9
    assert ops.expert_choice_route(probs, 3).num_assignments == 0


def test_bad_input_is_rejected():
    probs = random_probs(1, 8, 4, "cpu")
    with pytest.raises(ValueError, match=r"k must be in \[1, E\] = \[1, 4\], got 5"):
        ops.topk_route(probs, 5, 3)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ops.topk_route(probs, 1, -1)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ops.expert_choice_route(probs, -2)
    with pytest.raises(ValueError, match=r"scores must have shape \[T, E\] or \[G, T, E\]"):
        ops.topk_route(probs[0, 0], 1, 3)
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        ops.topk_route(probs.long(), 1, 3)
    with pytest.raises(ValueError, match="weights must have the shape of scores"):
        ops.topk_route(probs, 1, 3, weights=probs[:, :4])
    bad = probs.clone()
    bad[0, 5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores must be finite .* at scores\[0, 5, 2\]"):
        ops.topk_route(bad, 2, 3)
    bad[0, 5, 2] = float("inf")
    with pytest.raises(ValueError, match="scores must be finite"):
        ops.expert_choice_route(bad, 3)


def test_weights_on_another_device_are_rejected():
    probs = random_probs(1, 8, 4, "cpu")
    with pytest.raises(ValueError, match="topk_route: weights must be on cpu like scores, got meta"):
        ops.topk_route(probs, 2, 3, weights=probs.to("meta"))
    with pytest.raises(ValueError, match="expert_choice_route: weights must be on cpu like scores, got meta"):
        ops.expert_choice_route(probs, 3, weights=probs.to("meta"))


@pytest.mark.parametrize("capacity", [float("nan"), 2.5, 3.0, True, "3"])
def test_capacity_must_be_an_integer(capacity):
    # A float capacity was accepted by topk_route and stored in the plan (nan, 2.5); None reached a comparison.
    probs = random_probs(1, 8, 4, "cpu")
    with pytest.raises(ValueError, match=r"topk_route: capacity must be >= 0 and an integer, or None, got"):
        ops.topk_route(probs, 2, capacity)
    with pytest.raises(ValueError, match=r"expert_choice_route: capacity must be >= 0 and an integer, got"):
        ops.expert_choice_route(probs, capacity)
    with pytest.raises(ValueError, match=r"expert_choice_route: capacity must be >= 0 and an integer, got None"):
        ops.expert_choice_route(probs, None)
    assert ops.topk_route(probs, 2, np.int64(3)).capacity == 3
