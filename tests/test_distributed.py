"""Expert parallelism (EP) and data parallelism on real gloo process groups: an MoE layer parallelized over
(dp, ep) = (1, 2), (1, 4) and (2, 2) gives, on each rank's slice of a global batch, the one-process layer's outputs,
input gradients, router (dense) gradients and expert-gradient shard, the same gradient-clipping norm, and the same
parameters after an optimiser step; expert_parallel=1 (plain DDP) too; the capacity path compiles with
fullgraph=True; ranks that disagree raise under the debug check; E not divisible by EP and ConvMoE are refused.

Every rank builds the one-process reference itself from the same seed on the full global batch and compares its
slice. Cases are batched per spawned group (spawning dominates the time on a small machine); float64, tiny shapes.
Routers draw noise as in training (Gaussian logit noise, hindsight's Gumbel noise): every rank draws the global
batch's noise and keeps its slice, so with the generator seeded alike before both forwards, noisy routing matches.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from visionmoe.distributed import clip_grad_norm_, mesh_from_process_groups, parallelize, run_processes
from visionmoe.layers import ConvMoE, MoEMLP, SoftMoEMLP, aux_losses
from visionmoe.layers.expert_parallel import DEBUG_ENV

TIMEOUT = 150
D, F, E, N, LOCAL_BATCH = 4, 6, 4, 3, 2

# (name, layer factory options); every router of the issue, dropless top-k and Soft MoE.
CASES = [
    ("topk", dict(router="topk", k=2, capacity_factor=1.0, noise_std=1.0)),
    ("topk_bpr", dict(router="topk", k=1, capacity_factor=1.0, batch_priority=True, noise_std=1.0)),
    ("sinkhorn_topk", dict(router="sinkhorn_topk", k=1, capacity_factor=1.25, noise_std=1.0)),
    ("expert_choice", dict(router="expert_choice", capacity_factor=1.0, noise_std=1.0)),
    ("sinkhorn_expert_choice", dict(router="sinkhorn_expert_choice", capacity_factor=1.0)),
    ("sparse_expert_choice", dict(router="sparse_expert_choice", capacity_factor=1.0)),
    ("hindsight", dict(router="hindsight")),
    ("dropless_topk", dict(router="topk", k=1, capacity_factor=None, noise_std=0.0)),
    ("soft", dict(soft=True, slots_per_expert=2, noise_std=0.5)),
]


class Net(nn.Module):
    """A dense projection (a parameter DDP averages) before the MoE layer."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.moe = moe

    def forward(self, x):
        return self.moe(self.proj(x))


def _build(options, num_experts=E):
    torch.manual_seed(0)
    options = dict(options)
    if options.pop("soft", False):
        moe = SoftMoEMLP(D, F, num_experts, **options)
    else:
        moe = MoEMLP(D, F, num_experts, group_size=1, **options)
    return Net(moe).double()


def _loss(model, out, target):
    # The mean over the batch: the per-rank loss is the local mean, the reference's the global mean.
    return (out * target).mean() + 0.1 * sum(aux_losses(model).values(), torch.zeros((), dtype=out.dtype))


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


def _check_case(name, options, mesh, rank, world_size, seed):
    reference = _build(options)
    model = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(seed)
    x_global = torch.randn(world_size * LOCAL_BATCH, N, D, generator=generator, dtype=torch.float64)
    target = torch.randn(world_size * LOCAL_BATCH, N, D, generator=generator, dtype=torch.float64)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    x_ref = x_global.clone().requires_grad_()
    torch.manual_seed(seed)  # the routers' noise: the same generator state for both forwards
    out_ref = reference(x_ref)
    _loss(reference, out_ref, target).backward()

    ddp = parallelize(model, mesh)
    assert ddp.module is model
    x = x_global[local].clone().requires_grad_()
    torch.manual_seed(seed)
    out = ddp(x)
    _loss(model, out, target[local]).backward()

    _close(out, out_ref[local], f"{name}: output")
    # d(global mean)/dx = d(local mean)/dx / W
    _close(x.grad, world_size * x_ref.grad[local], f"{name}: input gradient")
    experts = model.moe.experts
    first, count = experts.first_expert, experts.num_local_experts
    assert count == E // mesh["ep"].size()
    reference_parameters = dict(reference.named_parameters())
    for parameter_name, parameter in model.named_parameters():
        expected = reference_parameters[parameter_name].grad
        if parameter_name.startswith("moe.experts."):
            expected = expected[first : first + count]
        _close(parameter.grad, expected, f"{name}: gradient of {parameter_name}")

    norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    norm = clip_grad_norm_(ddp, 0.05, mesh)
    _close(norm, norm_ref, f"{name}: gradient norm")
    assert norm_ref > 0.05, "the clipping should act in this test"
    for parameters in (reference.parameters(), ddp.parameters()):
        optimizer = torch.optim.SGD(parameters, lr=0.5) if name != "soft" else torch.optim.AdamW(parameters, lr=0.1)
        optimizer.step()
    for parameter_name, parameter in model.named_parameters():
        expected = reference_parameters[parameter_name]
        if parameter_name.startswith("moe.experts."):
            expected = expected[first : first + count]
        _close(parameter, expected, f"{name}: parameter {parameter_name} after a step")

    if name == "dropless_topk":
        # Some (rank, expert) pair must get no rows, or the case would not test an empty exchange.
        counts = model.moe.last_plan.expert_counts()
        everyone = [torch.empty_like(counts) for _ in range(world_size)]
        dist.all_gather(everyone, counts)
        return bool((torch.stack(everyone) == 0).any())
    return True


def _layer_cases(rank, world_size, expert_parallel, names):
    torch.set_num_threads(1)
    mesh = mesh_from_process_groups(expert_parallel)
    results = {}
    for index, (name, options) in enumerate(CASES):
        if name in names:
            results[name] = _check_case(name, options, mesh, rank, world_size, seed=100 + index)
    return results


ALL = tuple(name for name, _ in CASES)


@pytest.mark.parametrize("world_size, expert_parallel", [(2, 2), (4, 4), (4, 2)], ids=["ep2-dp1", "ep4-dp1", "ep2-dp2"])
def test_expert_parallel_layers_match_one_process(world_size, expert_parallel):
    results = run_processes(_layer_cases, world_size, expert_parallel, ALL, timeout=TIMEOUT)
    assert all(set(result) == set(ALL) for result in results)
    assert results[0]["dropless_topk"], "no expert went without rows from some rank: pick another seed"


def _compile_and_errors(rank, world_size):
    torch.set_num_threads(1)
    mesh = mesh_from_process_groups(world_size)
    outcome = {}

    # The capacity path compiles with no graph break, and the compiled layer agrees with the eager one.
    torch.manual_seed(0)
    layer = MoEMLP(D, F, E, "topk", k=2, capacity_factor=1.0, group_size=1, noise_std=0.0).double()
    layer.expert_parallel_(mesh.get_group("ep"))
    x = torch.randn(LOCAL_BATCH, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    x_eager = x.clone().requires_grad_()
    eager = layer(x_eager)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x_compiled = x.clone().requires_grad_()
    out = compiled(x_compiled)
    out.square().sum().backward()
    _close(out, eager, "compiled output")
    _close(x_compiled.grad, x_eager.grad, "compiled input gradient")
    for parameter, expected in zip(layer.parameters(), eager_grads):
        _close(parameter.grad, expected, "compiled parameter gradient")
    outcome["compiled"] = True

    # Ranks that disagree on the number of images raise a clear error under the debug check (on every rank).
    torch.manual_seed(0)
    layer = MoEMLP(D, F, E, "topk", capacity_factor=1.0, group_size=1).double()
    layer.expert_parallel_(mesh.get_group("ep"), name="blocks.3.mlp", debug=True)
    try:
        layer(torch.randn(LOCAL_BATCH + rank, N, D, dtype=torch.float64))
    except ValueError as error:
        outcome["mismatch"] = str(error)

    # ... and so do they with the check switched on by the environment variable.
    torch.manual_seed(0)
    layer = MoEMLP(D, F, E, "topk", capacity_factor=1.0, group_size=1).double()
    layer.expert_parallel_(mesh.get_group("ep"))
    os.environ[DEBUG_ENV] = "1"
    try:
        layer(torch.randn(LOCAL_BATCH, N + rank, D, dtype=torch.float64))
    except ValueError as error:
        outcome["mismatch_env"] = str(error)
    finally:
        del os.environ[DEBUG_ENV]

    # ConvMoE under EP is refused.
    try:
        parallelize(nn.Sequential(ConvMoE(4, 4, E)), mesh)
    except ValueError as error:
        outcome["conv"] = str(error)

    # expert_parallel=1 is plain DDP, and matches one process too.
    outcome["ep1"] = _check_case("topk", dict(CASES)["topk"], mesh_from_process_groups(1), rank, world_size, seed=7)

    # E not divisible by the EP size.
    try:
        parallelize(Net(MoEMLP(D, F, 3, "topk", group_size=1)).double(), mesh)
    except ValueError as error:
        outcome["indivisible"] = str(error)
    return outcome


def test_compiles_and_rejects_disagreeing_ranks():
    for outcome in run_processes(_compile_and_errors, 2, timeout=TIMEOUT):
        assert outcome["compiled"]
        assert "disagree" in outcome["mismatch"] and "blocks.3.mlp" in outcome["mismatch"], outcome["mismatch"]
        assert "groups=2" in outcome["mismatch"] and "groups=3" in outcome["mismatch"], outcome["mismatch"]
        assert "divisible" in outcome["indivisible"], outcome["indivisible"]
        assert "tokens_per_group=3" in outcome["mismatch_env"] and "tokens_per_group=4" in outcome["mismatch_env"]
        assert "ConvMoE" in outcome["conv"] and "expert_parallel=1" in outcome["conv"], outcome["conv"]
        assert outcome["ep1"]
