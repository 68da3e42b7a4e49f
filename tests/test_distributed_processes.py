"""The process-group plumbing under visionmoe.distributed: run_processes (results, errors, crashes, hangs become
errors), the (dp, ep) mesh, and sharding an ExpertMLPs over an expert-parallel group."""

import os

import pytest
import torch
import torch.distributed as dist

from visionmoe.distributed import mesh_from_process_groups, run_processes
from visionmoe.layers.moe_mlp import ExpertMLPs


def _sum_of_ranks(rank, world_size, offset):
    value = torch.tensor([float(rank + offset)])
    dist.all_reduce(value)
    return value.item()


def test_run_processes_returns_results_in_rank_order():
    assert run_processes(_sum_of_ranks, 2, 10, timeout=60) == [21.0, 21.0]


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one's own error")
    return rank


def test_run_processes_names_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*rank one's own error"):
        run_processes(_fails_on_rank_one, 2, timeout=60)


def _crashes_on_rank_zero(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_run_processes_reports_a_crashed_rank():
    with pytest.raises(RuntimeError, match=r"ranks \[0\] of 2 exited without a result"):
        run_processes(_crashes_on_rank_zero, 2, timeout=60)


def _waits_for_a_peer_that_never_sends(rank, world_size):
    if rank == 0:
        dist.recv(torch.empty(1), src=1)
    return rank


def test_run_processes_turns_a_hang_into_a_timeout():
    with pytest.raises((TimeoutError, RuntimeError)):
        run_processes(_waits_for_a_peer_that_never_sends, 2, timeout=5)


def _mesh_groups(rank, world_size, expert_parallel):
    mesh = mesh_from_process_groups(expert_parallel)
    return (dist.get_process_group_ranks(mesh.get_group("ep")), dist.get_process_group_ranks(mesh.get_group("dp")))


def test_mesh_keeps_expert_parallel_ranks_contiguous():
    groups = run_processes(_mesh_groups, 4, 2, timeout=90)
    assert groups == [([0, 1], [0, 2]), ([0, 1], [1, 3]), ([2, 3], [0, 2]), ([2, 3], [1, 3])]


def _mesh_error(rank, world_size):
    with pytest.raises(ValueError, match="expert_parallel=3 must divide the world size 2"):
        mesh_from_process_groups(3)
    return True


def test_mesh_rejects_an_expert_parallel_size_that_does_not_divide_the_world():
    assert run_processes(_mesh_error, 2, timeout=60) == [True, True]


def _sharded_experts(rank, world_size, num_experts):
    torch.manual_seed(0)
    experts = ExpertMLPs(num_experts, 3, 5)
    experts.shard_(dist.group.WORLD)
    sharded = {name: parameter.detach().clone() for name, parameter in experts.named_parameters()}
    torch.manual_seed(0)
    experts.reset_parameters()
    reset = {name: parameter.detach().clone() for name, parameter in experts.named_parameters()}
    return experts.first_expert, experts.num_local_experts, sharded, reset


def test_sharded_experts_hold_the_one_process_slice():
    torch.manual_seed(0)
    whole = ExpertMLPs(4, 3, 5)
    for rank, (first, local, sharded, reset) in enumerate(run_processes(_sharded_experts, 2, 4, timeout=60)):
        assert (first, local) == (2 * rank, 2)
        for name, parameter in whole.named_parameters():
            torch.testing.assert_close(sharded[name], parameter.detach()[first : first + local], rtol=0, atol=0)
            torch.testing.assert_close(reset[name], parameter.detach()[first : first + local], rtol=0, atol=0)


def _shard_error(rank, world_size):
    with pytest.raises(ValueError, match="needs E divisible by 2, got E=3"):
        ExpertMLPs(3, 2, 2).shard_(dist.group.WORLD)
    return True


def test_shard_rejects_experts_not_divisible_by_the_group():
    assert run_processes(_shard_error, 2, timeout=60) == [True, True]
