"""Training on several processes (gloo on the CPU): the trainer under torchrun gives one process's loss curve on the
same global batch, with data parallelism and with expert parallelism; its checkpoints hold full expert tensors and
resume on other world sizes (W=2 -> W=4 -> W=1) with the same results; evaluation is exact for data sets that W
does not divide; the checkpoint's gather, slice and optimiser resharding; errors. Every multi-process run has a
timeout, so a hang fails the test instead of stalling the suite."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from torch.utils.data import TensorDataset

import visionmoe
from visionmoe.data import create_dataset
from visionmoe.distributed import mesh_from_process_groups, run_processes
from visionmoe.distributed.checkpoint import (
    expert_layout,
    load_sharded_weights,
    reshard_optimizer_state,
    send_expert_optimizer_shards,
    write_full_safetensors,
)
from visionmoe.distributed.data import local_batch_size, rank_evaluation_batches, rank_training_indices
from visionmoe.evaluate import evaluate
from visionmoe.evaluate.cli import main as evaluate_main
from visionmoe.layers.moe_mlp import ExpertMLPs
from visionmoe.models import create_model
from visionmoe.train import Trainer, config_from_dict, load_model
from visionmoe.train.checkpoint import CheckpointError, load_model_weights, save_checkpoint

TIMEOUT = 240  # seconds, for each multi-process run
# The tiny V-MoE of test_train.py, each image its own routing group (so a rank's share of a batch is routed as one
# process routes it), with the default router noise (each rank draws the global batch's and keeps its slice).
MODEL = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, moe=dict(num_experts=4, group_size=1))
# digits has 1258 training images: two global batches of 628 (the last 2 dropped), each split over 1, 2 or 4 ranks.
RUN = dict(
    model="vmoe_tiny_32",
    model_options=MODEL,
    dataset="digits",
    epochs=1,
    batch_size=628,
    lr=3e-3,
    warmup_epochs=0.5,
    seed=7,
    device="cpu",
    progress=False,
    tensorboard=False,
    log_steps=True,
    drop_last=True,
    aux_loss_weights={"importance": 0.01},
)


def _environment():
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    source = str(Path(visionmoe.__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join([source] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return environment


def torchrun(processes: int, *arguments: str) -> None:
    """``torchrun --standalone --nproc_per_node=processes -m visionmoe.train arguments``, under a timeout."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "visionmoe.train",
        *arguments,
    ]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def assert_same_rows(rows, reference, columns, rel=1e-5):
    assert len(rows) == len(reference)
    for row, expected in zip(rows, reference):
        for column in columns:
            assert float(row[column]) == pytest.approx(float(expected[column]), rel=rel, abs=1e-7), column


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference: a config file, epoch 1 (two steps) and, resumed from it, epoch 2."""
    root = tmp_path_factory.mktemp("runs")
    config_file = root / "run.yaml"
    config_file.write_text(yaml.safe_dump(RUN))
    one = root / "one"
    Trainer(config_from_dict(dict(RUN, output_dir=str(one)))).fit()
    resumed = root / "one_resumed"
    shutil.copytree(one, resumed)
    Trainer(config_from_dict(dict(RUN, output_dir=str(resumed), epochs=2)), resume=resumed / "checkpoint").fit()
    return dict(root=root, config=config_file, one=one, one_resumed=resumed)


@pytest.mark.parametrize("expert_parallel", [1, 2])
def test_two_processes_train_as_one_process_on_the_global_batch(runs, expert_parallel):
    output = runs["root"] / f"w2_ep{expert_parallel}"
    # drop_last null: dropped automatically on several processes (the reference drops it explicitly).
    torchrun(
        2,
        "--config",
        str(runs["config"]),
        "--output-dir",
        str(output),
        "--set",
        f"expert_parallel={expert_parallel}",
        "--set",
        "drop_last=null",
    )
    assert_same_rows(
        read_csv(output / "steps.csv"), read_csv(runs["one"] / "steps.csv"), ["loss", "accuracy", "aux_loss", "lr"]
    )
    assert_same_rows(
        read_csv(output / "metrics.csv"),
        read_csv(runs["one"] / "metrics.csv"),
        ["train_loss", "train_accuracy", "val_loss", "val_accuracy"],
    )
    # Rank 0 alone logged: one row per step.
    assert [row["step"] for row in read_csv(output / "steps.csv")] == ["1", "2"]
    # The checkpoint is the one one process saves: same keys, full shapes, (float-close) values.
    with (
        safe_open(str(output / "checkpoint" / "model.safetensors"), "pt") as file,
        safe_open(str(runs["one"] / "checkpoint" / "model.safetensors"), "pt") as reference,
    ):
        assert sorted(file.keys()) == sorted(reference.keys())
        for name in reference.keys():
            torch.testing.assert_close(file.get_tensor(name), reference.get_tensor(name), rtol=1e-4, atol=1e-5)
    shards = sorted(path.name for path in (output / "checkpoint").glob("optimizer_shard*.pt"))
    assert shards == (["optimizer_shard1.pt"] if expert_parallel == 2 else [])
    manifest = json.loads((output / "checkpoint" / "manifest.json").read_text())
    assert set(shards) <= set(manifest["sha256"])


def test_a_checkpoint_of_two_processes_resumes_on_four_and_on_one(runs):
    start = runs["root"] / "w2_ep2"
    if not (start / "checkpoint").is_dir():
        pytest.skip("needs the expert-parallel run of test_two_processes_train_as_one_process_on_the_global_batch")
    reference = runs["one_resumed"]  # one process: epoch 1, then resumed for epoch 2
    # W=2 (EP 2) -> W=4 (EP 4): the second epoch's steps and evaluation are one process's.
    four = runs["root"] / "w4"
    shutil.copytree(start, four)
    torchrun(4, "--resume", str(four / "checkpoint"), "--set", "epochs=2", "--set", "expert_parallel=4")
    assert_same_rows(read_csv(four / "steps.csv"), read_csv(reference / "steps.csv"), ["loss", "accuracy", "lr"])
    assert_same_rows(
        read_csv(four / "metrics.csv"), read_csv(reference / "metrics.csv"), ["train_loss", "val_loss", "val_accuracy"]
    )
    assert len(list((four / "checkpoint").glob("optimizer_shard*.pt"))) == 3
    # W=2 -> W=1: one process resumes the expert-parallel checkpoint (its optimiser shards reassembled), keeping
    # the run's automatic drop_last so that its epochs have the same steps.
    one = runs["root"] / "w2_to_w1"
    shutil.copytree(start, one)
    Trainer(config_from_dict(dict(RUN, output_dir=str(one), epochs=2, drop_last=None)), resume=one / "checkpoint").fit()
    assert_same_rows(read_csv(one / "steps.csv"), read_csv(reference / "steps.csv"), ["loss", "accuracy", "lr"])
    assert_same_rows(
        read_csv(one / "metrics.csv"), read_csv(reference / "metrics.csv"), ["train_loss", "val_loss", "val_accuracy"]
    )
    # W=4 -> W=1: visionmoe-eval, load_model and --init-from read it unchanged, with one process's results.
    assert evaluate_main([str(four), "--dataset", "digits", "--split", "test", "--output-dir", str(four / "eval")]) == 0
    report = json.loads((four / "eval" / "report.json").read_text())
    test_set = create_dataset("digits", "test")
    expected = evaluate(load_model(reference), test_set, test_set.num_classes, batch_size=128)
    assert report["num_images"] == expected.num_images == 359
    assert report["accuracy"] == expected.accuracy
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-5)
    finetune = Trainer(config_from_dict(dict(RUN, output_dir=str(runs["root"] / "init"), init_from=str(four))))
    for name, tensor in load_model(four).state_dict().items():
        assert torch.equal(finetune.model.state_dict()[name], tensor), name


# --- checkpoint gather, slice and resharding, in 4 processes: 2 data-parallel replicas of 2 expert shards ---------

OPTIONS = dict(
    embed_dim=16,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    patch_size=8,
    num_classes=3,
    moe=dict(num_experts=4, group_size=1, noise_std=0.0),
)


def _stepped(model: torch.nn.Module, seed: int) -> torch.optim.AdamW:
    """AdamW after one step with gradients drawn from ``seed`` (each expert parameter's rows from the full draw)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    experts = {}
    for module in model.modules():
        if isinstance(module, ExpertMLPs):
            for name in ("w1", "b1", "w2", "b2"):
                experts[id(getattr(module, name))] = module
    for parameter in model.parameters():
        module = experts.get(id(parameter))
        if module is None:
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        else:
            full = torch.randn((module.num_experts,) + parameter.shape[1:], generator=generator)
            parameter.grad = full[module.first_expert : module.first_expert + module.num_local_experts].clone()
    optimizer.step()
    return optimizer


def _sharded_model(group, options=OPTIONS, seed=0):
    torch.manual_seed(seed)
    model = create_model("vmoe_tiny_32", **options)
    for module in model.modules():
        if isinstance(module, ExpertMLPs):
            module.shard_(group)
    return model


def _checkpoint_pieces(rank, world_size, directory):
    mesh = mesh_from_process_groups(2)
    group = mesh.get_group("ep")
    checks = {}
    # Weights: rank 0 writes the full tensors; every rank reads back its own rows into a differently seeded model.
    model = _sharded_model(group)
    path = os.path.join(directory, "model.safetensors")
    if rank == 0:
        with open(path, "wb") as file:
            write_full_safetensors(model, file, {"step": "3"})
    else:
        write_full_safetensors(model, None, {"step": "3"})
    dist.barrier()
    other = _sharded_model(group, seed=1)
    load_sharded_weights(other, path)
    checks["weights round trip"] = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
    )
    # A model of another E is refused.
    fewer = dict(OPTIONS, moe=dict(OPTIONS["moe"], num_experts=2))
    try:
        load_sharded_weights(_sharded_model(group, fewer), path)
        checks["E mismatch refused"] = False
    except ValueError as error:
        checks["E mismatch refused"] = "holds 4 experts" in str(error) and "E=2" in str(error)
    # Optimiser: the full state of one process, sliced for this rank, equals this rank's own step's state.
    torch.manual_seed(0)
    full_model = create_model("vmoe_tiny_32", **OPTIONS)
    full_state = _stepped(full_model, seed=5).state_dict()
    optimizer = _stepped(model, seed=5)
    local = reshard_optimizer_state(full_state, None, model, torch.optim.AdamW(model.parameters()), lambda j: {})
    own = optimizer.state_dict()["state"]
    checks["full state sliced"] = all(
        torch.allclose(local["state"][i][key], own[i][key], rtol=1e-6, atol=1e-7) for i in own for key in own[i]
    )
    # ... and the shards saved from rank 0's expert group reassemble it for one process.
    shards = {}
    count = send_expert_optimizer_shards(model, optimizer, lambda index, shard: shards.__setitem__(index, shard))
    checks["shard count"] = count == 2 and (sorted(shards) == ([1] if rank == 0 else []))
    if rank == 0:
        layout = expert_layout(model, optimizer)
        torch.manual_seed(0)
        one = create_model("vmoe_tiny_32", **OPTIONS)
        rebuilt = reshard_optimizer_state(
            optimizer.state_dict(), layout, one, torch.optim.AdamW(one.parameters()), shards.__getitem__
        )
        checks["shards reassembled"] = all(
            torch.allclose(rebuilt["state"][i][key], full_state["state"][i][key], rtol=1e-6, atol=1e-7)
            for i in full_state["state"]
            for key in full_state["state"][i]
        )
        smaller = create_model("vmoe_tiny_32", **fewer)
        try:
            reshard_optimizer_state(
                optimizer.state_dict(), layout, smaller, torch.optim.AdamW(smaller.parameters()), shards.__getitem__
            )
            checks["optimiser E mismatch refused"] = False
        except ValueError as error:
            checks["optimiser E mismatch refused"] = "cannot change the number of experts" in str(error)
    # A save that rank 0 cannot make (the directory holds other files) fails on every rank instead of hanging.
    occupied = os.path.join(directory, "occupied")
    if rank == 0:
        os.makedirs(occupied)
        open(os.path.join(occupied, "notes.txt"), "w").close()
    dist.barrier()
    config = config_from_dict(dict(model="vmoe_tiny_32", model_options=OPTIONS, output_dir=directory))
    try:
        save_checkpoint(occupied, model, config, {"global_step": 1}, optimizer)
        checks["failed save raised"] = False
    except CheckpointError as error:
        checks["failed save raised"] = "not part of a checkpoint" in str(error)
    return checks


def _evaluation(rank, world_size, images, labels):
    """Trainer.evaluate on 4 ranks (2 EP shards x 2 replicas) of a validation set of 37 images, batches of 8."""
    config = config_from_dict(
        dict(
            model="vmoe_tiny_32",
            model_options=OPTIONS,
            epochs=1,
            batch_size=8,
            seed=3,
            device="cpu",
            progress=False,
            tensorboard=False,
            expert_parallel=2,
            output_dir=os.devnull,
        )
    )
    dataset = TensorDataset(images, labels)
    trainer = Trainer(config, train_set=dataset, val_set=dataset)
    return trainer.evaluate()


def _interruption_config(output_dir, **overrides):
    return config_from_dict(
        dict(
            model="vmoe_tiny_32",
            model_options=OPTIONS,
            epochs=1,
            batch_size=8,
            lr=1e-2,
            warmup_epochs=0.5,
            seed=3,
            device="cpu",
            progress=False,
            tensorboard=False,
            log_steps=True,
            aux_loss_weights={"importance": 0.01},
            output_dir=str(output_dir),
            **overrides,
        )
    )


def _stop_at_step(step):
    def callback(trainer, global_step):
        if global_step == step:
            raise KeyboardInterrupt

    return callback


def _interrupted_and_resumed(rank, world_size, directory, images, labels):
    """On 4 ranks (EP 2 x DP 2): a run stopped by Ctrl-C in the middle of its first epoch and resumed, and the
    same run uninterrupted; rank 0 returns both step logs' path."""
    dataset = TensorDataset(images, labels)
    whole, stopped = os.path.join(directory, "whole"), os.path.join(directory, "stopped")
    Trainer(_interruption_config(whole, expert_parallel=2), train_set=dataset, val_set=dataset).fit()
    result = Trainer(
        _interruption_config(stopped, expert_parallel=2),
        train_set=dataset,
        val_set=dataset,
        step_callback=_stop_at_step(2),
    ).fit()
    assert result.interrupted
    Trainer(
        _interruption_config(stopped, expert_parallel=2),
        train_set=dataset,
        val_set=dataset,
        resume=os.path.join(stopped, "checkpoint"),
    ).fit()
    return whole, stopped


def _four_ranks(rank, world_size, directory, images, labels):
    return (
        _checkpoint_pieces(rank, world_size, directory),
        _evaluation(rank, world_size, images, labels),
        _interrupted_and_resumed(rank, world_size, directory, images, labels),
    )


@pytest.fixture(scope="module")
def validation_set():
    """37 images: not divisible by 4 ranks, nor into whole batches of 8."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(37, 3, 32, 32, generator=generator), torch.randint(0, 3, (37,), generator=generator)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, validation_set):
    """One spawn of 4 processes (2 EP shards x 2 data-parallel replicas) for the checkpoint pieces and evaluation."""
    directory = tmp_path_factory.mktemp("four_ranks")
    return directory, run_processes(_four_ranks, 4, str(directory), *validation_set, timeout=TIMEOUT)


def test_checkpoint_gather_slice_and_optimiser_resharding(four_ranks):
    tmp_path, results = four_ranks
    for rank, (checks, _, _) in enumerate(results):
        assert all(checks.values()), (rank, checks)
    # The file is the one a one-process model writes: same keys and shapes, values from the same seed.
    torch.manual_seed(0)
    reference = create_model("vmoe_tiny_32", **OPTIONS).state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as file:
        assert sorted(file.keys()) == sorted(reference) and file.metadata() == {"step": "3"}
        for name, tensor in reference.items():
            assert torch.equal(file.get_tensor(name), tensor), name


def test_evaluation_on_four_ranks_is_exact_for_a_set_they_do_not_divide(four_ranks, validation_set):
    images, labels = validation_set
    results = [evaluation for _, evaluation, _ in four_ranks[1]]
    config = config_from_dict(
        dict(
            model="vmoe_tiny_32",
            model_options=OPTIONS,
            epochs=1,
            batch_size=8,
            seed=3,
            device="cpu",
            progress=False,
            tensorboard=False,
            output_dir=os.devnull,
        )
    )
    dataset = TensorDataset(images, labels)
    expected = Trainer(config, train_set=dataset, val_set=dataset).evaluate()
    for result in results:
        assert result["accuracy"] == expected["accuracy"]
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_a_run_on_four_ranks_stopped_mid_epoch_resumes_exactly(four_ranks):
    whole, stopped = (Path(path) for path in four_ranks[1][0][2])
    steps = read_csv(whole / "steps.csv")
    assert [row["step"] for row in steps] == ["1", "2", "3", "4"]  # 37 images: 4 whole batches of 8
    # Not bit for bit on 4 ranks: the resumed DistributedDataParallel lays out its gradient bucket afresh, and the
    # ring all-reduce then sums some elements over the 4 ranks in another order (float rounding).
    assert_same_rows(read_csv(stopped / "steps.csv"), steps, ["loss", "accuracy", "aux_loss", "lr"], rel=1e-5)
    assert_same_rows(
        read_csv(stopped / "metrics.csv"),
        read_csv(whole / "metrics.csv"),
        ["train_loss", "train_accuracy", "val_loss", "val_accuracy"],
        rel=1e-5,
    )
    with (
        safe_open(str(whole / "checkpoint" / "model.safetensors"), "pt") as a,
        safe_open(str(stopped / "checkpoint" / "model.safetensors"), "pt") as b,
    ):
        for name in a.keys():
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=1e-4, atol=1e-5)


def test_one_process_refuses_a_checkpoint_of_another_number_of_experts(tmp_path):
    torch.manual_seed(0)
    model = create_model("vmoe_tiny_32", **OPTIONS)
    save_checkpoint(
        tmp_path,
        model,
        config_from_dict(dict(model="vmoe_tiny_32", model_options=OPTIONS, output_dir=str(tmp_path))),
        {"global_step": 0},
    )
    fewer = create_model("vmoe_tiny_32", **dict(OPTIONS, moe=dict(OPTIONS["moe"], num_experts=2)))
    with pytest.raises(CheckpointError, match=r"holds 4 experts in '[\w.]+experts\.\w+'.*E=2"):
        load_model_weights(fewer, tmp_path)


# --- the data split ------------------------------------------------------------------------------------------------


def test_each_rank_takes_its_share_of_every_global_batch():
    order = list(range(100, 111))  # 11 images, global batches of 4: two whole ones, the last 3 dropped
    shares = [rank_training_indices(order, 4, rank, 2, drop_last=True) for rank in range(2)]
    assert shares == [[100, 101, 104, 105], [102, 103, 106, 107]]
    assert rank_training_indices(order, 4, 1, 2, drop_last=True, skip_batches=1) == [106, 107]
    assert rank_training_indices(order, 4, 0, 1, drop_last=False) == order
    with pytest.raises(ValueError, match="cannot share the last one"):
        rank_training_indices(order, 4, 0, 2, drop_last=False)


def test_evaluation_pads_the_last_batch_to_whole_groups_and_masks_the_padding():
    # 11 images, batches of 8 over 2 ranks with routing groups of 2: the last 3 images padded to 4 (2 per rank).
    batches = [rank_evaluation_batches(11, 8, rank, 2, multiple=2) for rank in range(2)]
    assert batches[0] == [([0, 1, 2, 3], [True] * 4), ([8, 9], [True, True])]
    assert batches[1] == [([4, 5, 6, 7], [True] * 4), ([10, 0], [True, False])]
    covered = sorted(i for rank in batches for indices, valid in rank for i, v in zip(indices, valid) if v)
    assert covered == list(range(11))


def test_the_global_batch_must_split_into_whole_groups_per_rank():
    assert local_batch_size(64, 4, [8]) == 16
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        local_batch_size(64, 3)
    with pytest.raises(
        ValueError, match="not a multiple of an MoE layer's group_size=8; choose batch_size divisible by 32"
    ):
        local_batch_size(48, 4, [8])
    with pytest.raises(ValueError, match="config key 'expert_parallel' must be >= 1"):
        config_from_dict({"expert_parallel": 0})
