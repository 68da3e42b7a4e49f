"""Auxiliary router losses: hand-computed values, known minima, group averaging, gradcheck, torch.compile,
bad input."""

import math

import pytest
import torch

from visionmoe.losses import (
    entropy_loss,
    gshard_loss,
    importance_loss,
    load_loss,
    router_z_loss,
    switch_load_balancing_loss,
)


def normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def squared_cv(values):
    """Population variance over squared mean, in plain Python."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / mean**2


def tensor(values, device, dtype=torch.float64):
    return torch.tensor(values, device=device, dtype=dtype)


# ---- hand-computed values ----


def test_importance_loss_by_hand(device):
    probs = tensor([[0.5, 0.5, 0.0], [0.7, 0.1, 0.2]], device)
    # Imp = [1.2, 0.6, 0.2], mean 2/3; deviations [8/15, -1/15, -7/15]
    # population var = (64 + 1 + 49) / 225 / 3 = 38/225; mean^2 = 100/225; loss = 38/100
    assert importance_loss(probs).item() == pytest.approx(0.38, abs=1e-12)
    # sample variance would give 3/2 * 0.38 = 0.57: the test pins the population variance


def test_importance_loss_one_expert_takes_all(device):
    # Imp = [2, 0], mean 1, var ((1)^2 + (-1)^2) / 2 = 1: the maximum, E - 1
    assert importance_loss(tensor([[1.0, 0.0], [1.0, 0.0]], device)).item() == pytest.approx(1.0, abs=1e-12)


LOGITS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
NOISY_LOGITS = [[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]]
# Per token, the threshold each expert must beat:
#   k=1, V-MoE: the largest noisy logit, for every expert: token 0 -> 2, token 1 -> 3.
#   k=1, excluding self: the selected expert (0 for token 0, 1 for token 1) must beat the best OTHER expert,
#        the second largest (1 and 1); the others the largest (2 and 3).
#   k=2, V-MoE: the second largest: 1 for token 0 ([2, 1, -1]) and 1 for token 1 ([0, 3, 1]).
#   k=2, excluding self: token 0 selects {0, 1}: they must beat the third largest, -1; expert 2 the second, 1.
#        token 1 selects {1, 2}: they must beat the third largest, 0; expert 0 the second, 1.
THRESHOLDS = {
    (1, False): [[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]],
    (1, True): [[1.0, 2.0, 2.0], [3.0, 1.0, 3.0]],
    (2, False): [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
    (2, True): [[-1.0, -1.0, 1.0], [1.0, 0.0, 0.0]],
}


@pytest.mark.parametrize("k,exclude_self", list(THRESHOLDS))
def test_load_loss_by_hand(device, k, exclude_self):
    noise_std = 0.5
    threshold = THRESHOLDS[(k, exclude_self)]
    # P[t, e] = 1 - Phi((threshold - logit) / noise_std); load[e] = mean over the 2 tokens; loss = CV^2(load)
    prob = [[1.0 - normal_cdf((threshold[t][e] - LOGITS[t][e]) / noise_std) for e in range(3)] for t in range(2)]
    load = [(prob[0][e] + prob[1][e]) / 2 for e in range(3)]
    expected = squared_cv(load)
    loss = load_loss(tensor(LOGITS, device), tensor(NOISY_LOGITS, device), noise_std, k, exclude_self=exclude_self)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_load_loss_k1_numbers(device):
    # The (1, False) case spelled out with noise_std = 1:
    # token 0: Phi(1 - 2) = Phi(-1) = 0.158655, Phi(-2) = 0.022750, Phi(-2) = 0.022750
    # token 1: Phi(-3) = 0.001350, Phi(1 - 3) = 0.022750, Phi(-3) = 0.001350
    # load = [0.080003, 0.022750, 0.012050], mean 0.038268
    # var = (0.041735^2 + 0.015517^2 + 0.026218^2) / 3 = 0.00088999; loss = 0.00088999 / 0.038268^2 = 0.60775
    loss = load_loss(tensor(LOGITS, device), tensor(NOISY_LOGITS, device), 1.0, 1)
    assert loss.item() == pytest.approx(0.60775, abs=5e-5)


def test_load_loss_every_expert_selected_when_excluding_self(device):
    # k = E: every expert is in the top k and has no competitor left, P = 1 everywhere: load uniform, loss 0.
    # Without exclusion, the threshold is the smallest noisy logit and the loads differ.
    logits, noisy = tensor(LOGITS, device), tensor(NOISY_LOGITS, device)
    assert load_loss(logits, noisy, 1.0, 3, exclude_self=True).item() == 0.0
    assert load_loss(logits, noisy, 1.0, 3).item() > 0.0


def test_gshard_and_switch_by_hand(device):
    probs = tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], device)
    # top-1: token 0 -> expert 0, token 1 -> expert 1: f = [1/2, 1/2, 0]; P = mean probs = [0.4, 0.4, 0.2]
    # GShard: E^2 * mean_e f P = 9 * (0.2 + 0.2 + 0) / 3 = 1.2;  Switch: E * sum_e f P = 3 * 0.4 = 1.2
    assert gshard_loss(probs).item() == pytest.approx(1.2, abs=1e-12)
    assert switch_load_balancing_loss(probs).item() == pytest.approx(1.2, abs=1e-12)
    # first choices given: both tokens -> expert 2: f = [0, 0, 1]; 3 * (1 * 0.2) = 0.6
    expert_index = torch.tensor([2, 2], device=device)
    assert switch_load_balancing_loss(probs, expert_index).item() == pytest.approx(0.6, abs=1e-12)


def test_router_z_loss_by_hand(device):
    logits = tensor([[0.0, 0.0], [math.log(3.0), 0.0]], device)
    # logsumexp: log(1 + 1) = ln 2; log(3 + 1) = 2 ln 2; mean of squares = (1 + 4) / 2 (ln 2)^2
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, abs=1e-12)


def test_entropy_loss_by_hand(device):
    probs = tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], device)
    # per token: ln 2 and 0 (0 log 0 = 0); mean ln(2) / 2
    assert entropy_loss(probs).item() == pytest.approx(math.log(2.0) / 2, abs=1e-12)
    # mean distribution [0.75, 0.25, 0]: -(0.75 ln 0.75 + 0.25 ln 0.25)
    expected_batch = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_loss(probs, kind="batch").item() == pytest.approx(expected_batch, abs=1e-12)


def test_entropy_gradient_finite_at_exact_zeros(device):
    probs = tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], device).requires_grad_()
    for kind in ("token", "batch"):
        (grad,) = torch.autograd.grad(entropy_loss(probs, kind), probs)
        assert torch.isfinite(grad).all(), kind


# ---- known minima and maxima on balanced routing ----


def test_balanced_routing_reaches_the_minima(device):
    num_experts = 4
    # each token sends 0.7 to its own expert and 0.1 to the three others: every expert is the first choice of
    # one token and the mean probability is 1/4 for all
    probs = torch.full((num_experts, num_experts), 0.1, device=device, dtype=torch.float64)
    probs.fill_diagonal_(0.7)
    assert importance_loss(probs).item() == pytest.approx(0.0, abs=1e-12)
    assert switch_load_balancing_loss(probs).item() == pytest.approx(1.0, abs=1e-12)
    assert gshard_loss(probs).item() == pytest.approx(1.0, abs=1e-12)
    assert entropy_loss(probs, kind="batch").item() == pytest.approx(math.log(num_experts), abs=1e-12)
    # equal clean logits for every expert: each token's threshold is shared by all experts, the loads are equal
    logits = torch.zeros(6, num_experts, device=device, dtype=torch.float64)
    noisy = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(
        device
    )
    for k in (1, 2):
        assert load_loss(logits, noisy, 1.0, k).item() == pytest.approx(0.0, abs=1e-12)


def test_uniform_probs(device):
    num_experts = 5
    probs = torch.full((7, num_experts), 1.0 / num_experts, device=device, dtype=torch.float64)
    assert importance_loss(probs).item() == pytest.approx(0.0, abs=1e-12)
    # P is uniform, so E * sum_e f_e / E = 1 whatever the first choices
    assert switch_load_balancing_loss(probs).item() == pytest.approx(1.0, abs=1e-12)
    assert entropy_loss(probs).item() == pytest.approx(math.log(num_experts), abs=1e-12)


def test_collapsed_routing_is_penalised(device):
    probs = tensor([[1.0, 0.0, 0.0, 0.0]] * 3, device)
    assert switch_load_balancing_loss(probs).item() == pytest.approx(4.0, abs=1e-12)  # the maximum, E
    assert importance_loss(probs).item() == pytest.approx(3.0, abs=1e-12)  # the maximum, E - 1
    assert entropy_loss(probs).item() == 0.0


# ---- groups ----


def random_inputs(shape, device, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=dtype)
    noisy = logits + 0.3 * torch.randn(shape, generator=generator, dtype=dtype)
    return logits.to(device), noisy.to(device)


LOSSES = {
    "importance": lambda logits, noisy: importance_loss(logits.softmax(-1)),
    "load_k1": lambda logits, noisy: load_loss(logits, noisy, 0.3, 1),
    "load_k2_exclude_self": lambda logits, noisy: load_loss(logits, noisy, 0.3, 2, exclude_self=True),
    "gshard": lambda logits, noisy: gshard_loss(logits.softmax(-1)),
    "switch": lambda logits, noisy: switch_load_balancing_loss(logits.softmax(-1), noisy.argmax(-1)),
    "z": lambda logits, noisy: router_z_loss(logits),
    "entropy_token": lambda logits, noisy: entropy_loss(logits.softmax(-1)),
    "entropy_batch": lambda logits, noisy: entropy_loss(logits.softmax(-1), kind="batch"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_groups_are_averaged(device, name):
    loss = LOSSES[name]
    logits, noisy = random_inputs((2, 6, 4), device)
    per_group = [loss(logits[g], noisy[g]) for g in range(2)]
    assert per_group[0].item() != pytest.approx(per_group[1].item())  # otherwise the test could not fail
    torch.testing.assert_close(loss(logits, noisy), (per_group[0] + per_group[1]) / 2, atol=1e-12, rtol=1e-12)
    assert loss(logits, noisy).dim() == 0


# ---- gradients ----


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(device, name):
    loss = LOSSES[name]
    logits, noisy = random_inputs((2, 5, 3), device, seed=1)
    logits.requires_grad_()
    noisy.requires_grad_()
    assert torch.autograd.gradcheck(loss, (logits, noisy))


def test_load_loss_gradient_reaches_both_inputs(device):
    logits, noisy = random_inputs((5, 3), device, seed=2)
    logits.requires_grad_()
    noisy.requires_grad_()
    load_loss(logits, noisy, 0.3, 1).backward()
    assert logits.grad.abs().sum() > 0 and noisy.grad.abs().sum() > 0


def test_low_precision_is_computed_in_float32(device):
    logits, noisy = random_inputs((2, 8, 4), device, dtype=torch.float32)
    for name, loss in LOSSES.items():
        result = loss(logits.bfloat16(), noisy.bfloat16())
        assert result.dtype == torch.float32, name
        reference = loss(logits.bfloat16().float(), noisy.bfloat16().float())
        torch.testing.assert_close(result, reference, atol=1e-2, rtol=1e-2, msg=name)


# ---- torch.compile ----


@pytest.mark.parametrize("name", list(LOSSES))
def test_compile_fullgraph(device, name):
    loss = LOSSES[name]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (6, 9):  # a second size runs the same dynamic graph
        logits, noisy = random_inputs((2, tokens, 4), device, dtype=torch.float32)
        logits.requires_grad_()
        result = compiled(logits, noisy)
        torch.testing.assert_close(result, loss(logits, noisy))
        result.backward()
        assert torch.isfinite(logits.grad).all()


# ---- bad input ----


def test_bad_rank_and_dtype(device):
    probs = torch.full((4, 2), 0.5, device=device)
    for bad, message in [
        (probs[0], r"probs must have shape \[T, E\] or \[G, T, E\]"),
        (probs[None, None], r"probs must have shape"),
        (torch.ones(4, 2, dtype=torch.int64, device=device), "probs must be a floating-point tensor"),
        (probs[:0], "probs must have at least one group, token and expert"),
        ([[0.5, 0.5]], "probs must be a tensor"),
    ]:
        for loss in (importance_loss, gshard_loss, switch_load_balancing_loss, entropy_loss):
            with pytest.raises(ValueError, match=message):
                loss(bad)
    with pytest.raises(ValueError, match="logits must be a floating-point tensor"):
        router_z_loss(torch.ones(4, 2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="logits must have shape"):
        router_z_loss(torch.ones(2, device=device))


def test_load_loss_bad_input(device):
    logits, noisy = random_inputs((5, 3), device)
    with pytest.raises(ValueError, match=r"noisy_logits must have the shape of logits \(5, 3\), got \(5, 2\)"):
        load_loss(logits, noisy[:, :2], 1.0, 1)
    with pytest.raises(ValueError, match="noisy_logits must be a floating-point tensor"):
        load_loss(logits, noisy.long(), 1.0, 1)
    with pytest.raises(ValueError, match="logits must have shape"):
        load_loss(logits[0], noisy[0], 1.0, 1)
    for noise_std in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="noise_std must be positive and finite"):
            load_loss(logits, noisy, noise_std, 1)
    with pytest.raises(ValueError, match="noise_std must be a positive number"):
        load_loss(logits, noisy, torch.tensor(1.0), 1)
    for k in (0, 4, 1.0, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, E\] = \[1, 3\]"):
            load_loss(logits, noisy, 1.0, k)


def test_switch_bad_expert_index(device):
    probs = torch.full((2, 4, 3), 1.0 / 3, device=device)
    with pytest.raises(
        ValueError,
        match=r"expert_index must have the shape of probs without its last axis, "
        r"\(2, 4\), got \(8,\)",
    ):
        switch_load_balancing_loss(probs, torch.zeros(8, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="expert_index must be an integer tensor"):
        switch_load_balancing_loss(probs, torch.zeros(2, 4, device=device))
    with pytest.raises(ValueError, match="expert_index must be a tensor or None"):
        switch_load_balancing_loss(probs, [[0] * 4] * 2)
    if device.type == "cpu":  # on CUDA the range check is a device-side assertion, fatal to the process
        with pytest.raises(RuntimeError, match="expert_index out of range"):
            switch_load_balancing_loss(probs, torch.full((2, 4), 3, dtype=torch.int64, device=device))


def test_entropy_bad_kind(device):
    with pytest.raises(ValueError, match="kind must be one of 'token', 'batch', got 'mean'"):
        entropy_loss(torch.full((2, 2), 0.5, device=device), kind="mean")
