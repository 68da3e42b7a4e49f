"""Routing consistency: the metric on hand-made assignments, the tracker's curves, recording from a real V-MoE,
the trainer's routing_consistency files and visionmoe-eval's plot."""

import csv
import json

import pytest
import torch
from test_evaluate import MODEL_OPTIONS
from test_train import colour_rule_dataset, tiny_config

from visionmoe.evaluate.cli import main as evaluate_main
from visionmoe.evaluate.plots import write_routing_consistency_plot
from visionmoe.metrics import routing_consistency
from visionmoe.models import create_model
from visionmoe.train import RoutingConsistencyTracker, RoutingSnapshot, Trainer, load_model_weights
from visionmoe.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def datasets():
    return colour_rule_dataset(96, seed=1), colour_rule_dataset(64, seed=2)


@pytest.fixture
def checkpoint(tmp_path):
    """An untrained digits V-MoE saved as a training run's checkpoint."""
    config = tiny_config(tmp_path, model_options=MODEL_OPTIONS, dataset="digits")
    save_checkpoint(tmp_path / "checkpoint", create_model("vmoe_tiny_32", **MODEL_OPTIONS), config, {})
    return tmp_path


def test_routing_consistency_counts_equal_top1_assignments():
    assert routing_consistency(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 3])) == 0.75
    assert routing_consistency(torch.tensor([[5, 5], [1, 2]]), torch.tensor([[5, 5], [1, 2]])) == 1.0
    assert routing_consistency(torch.tensor([0, 0]), torch.tensor([1, 1], dtype=torch.int32)) == 0.0


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1]), "same tokens, got shapes (3,) and (2,)"),
        (torch.tensor([[0, 1]]), torch.tensor([0, 1]), "same tokens, got shapes (1, 2) and (2,)"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "assign_a must be an integer tensor"),
        (torch.tensor([0, 1]), torch.tensor([True, False]), "assign_b must be an integer tensor"),
        (torch.tensor([0, 1]), [0, 1], "assign_b must be an integer tensor"),
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), "no tokens to compare"),
    ],
)
def test_routing_consistency_errors(a, b, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        routing_consistency(a, b)


def tracker_with(snapshots):
    """A tracker holding hand-made snapshots: (epoch, phase, {layer: assignments})."""
    tracker = RoutingConsistencyTracker(torch.zeros(1, 3, 8, 8))
    tracker.load_state_dict(
        {
            "snapshots": [
                {
                    "epoch": epoch,
                    "phase": phase,
                    "assignments": {name: torch.tensor(values) for name, values in layers.items()},
                }
                for epoch, phase, layers in snapshots
            ]
        }
    )
    return tracker


HAND_MADE = [
    (0, "init", {"a": [3, 3, 3, 3], "b": [0, 0, 0, 0]}),
    (1, "train", {"a": [0, 1, 2, 3], "b": [0, 0, 1, 1]}),
    (2, "train", {"a": [0, 1, 2, 0], "b": [0, 0, 1, 1]}),
    (3, "train", {"a": [0, 1, 0, 0], "b": [1, 1, 1, 1]}),
]


def test_tracker_curves_on_hand_made_snapshots():
    tracker = tracker_with(HAND_MADE)
    adjacent = tracker.adjacent()
    assert adjacent[0] is None
    assert adjacent[1] == {"a": 0.25, "b": 0.5, "mean": 0.375}
    assert adjacent[2] == {"a": 0.75, "b": 1.0, "mean": 0.875}
    assert adjacent[3] == {"a": 0.75, "b": 0.5, "mean": 0.625}
    final = tracker.against_final()
    assert [row["a"] for row in final] == [0.0, 0.5, 0.75, 1.0]
    assert [row["b"] for row in final] == [0.0, 0.5, 0.5, 1.0]
    # The untrained snapshot is left out of the summary: pairs (1, 2) and (2, 3); epochs 1 and 2 against 3.
    summary = tracker.summary()
    assert summary["adjacent"] == pytest.approx((0.875 + 0.625) / 2)
    assert summary["last_adjacent"] == pytest.approx(0.625)
    assert summary["final"] == pytest.approx(((0.5 + 0.5) / 2 + (0.75 + 0.5) / 2) / 2)
    assert tracker.summary(skip_phases=())["adjacent"] == pytest.approx((0.375 + 0.875 + 0.625) / 3)


def test_phase_agreement_compares_the_end_of_pretraining_with_each_finetuning_epoch():
    tracker = tracker_with(
        [
            (1, "pretrain", {"a": [0, 0, 0, 0]}),
            (2, "pretrain", {"a": [0, 1, 2, 3]}),
            (1, "finetune", {"a": [0, 1, 0, 0]}),
            (2, "finetune", {"a": [0, 1, 2, 0]}),
        ]
    )
    assert [row["a"] for row in tracker.phase_agreement("pretrain", "finetune")] == [0.5, 0.75]
    with pytest.raises(ValueError, match="phases 'pretrain' and 'other'"):
        tracker.phase_agreement("pretrain", "other")


def test_fine_tuning_reports_agreement_with_the_pretrained_routing(tmp_path):
    tracker = tracker_with(
        [
            (0, "pretrain", {"a": [0, 1, 2, 3]}),
            (1, "finetune", {"a": [0, 1, 0, 0]}),  # 2 of 4 tokens as pre-trained
            (2, "finetune", {"a": [0, 1, 2, 0]}),  # 3 of 4
        ]
    )
    data = tracker.to_dict()
    assert data["pretrain"] == [None, {"a": 0.5, "mean": 0.5}, {"a": 0.75, "mean": 0.75}]
    # The summary covers the fine-tuning epochs only: one adjacent pair agreeing on 3 of 4 tokens.
    assert data["summary"] == {"adjacent": 0.75, "last_adjacent": 0.75, "final": 0.75}
    _, csv_path = tracker.write(tmp_path)
    with csv_path.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["pretrain"] for row in rows if row["layer"] == "a"] == ["", "0.5", "0.75"]
    assert write_routing_consistency_plot(data, tmp_path / "curves.png").stat().st_size > 0


def test_tracker_writes_json_and_csv(tmp_path):
    tracker = tracker_with(HAND_MADE)
    json_path, csv_path = tracker.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["epochs"] == [0, 1, 2, 3] and data["phases"] == ["init", "train", "train", "train"]
    assert data["layers"] == ["a", "b"] and data["adjacent"][2]["mean"] == 0.875
    with csv_path.open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 * 3  # every snapshot: layers a, b and their mean
    assert rows[0] == {"epoch": "0", "phase": "init", "layer": "a", "adjacent": "", "final": "0.0", "pretrain": ""}
    assert rows[-1]["layer"] == "mean" and float(rows[-1]["adjacent"]) == 0.625


def test_tracker_records_the_top1_expert_of_every_probe_token():
    model = create_model(
        "vmoe_tiny_32",
        depth=2,
        embed_dim=32,
        num_heads=2,
        patch_size=8,
        moe_blocks=[0, 1],
        moe=dict(num_experts=4, k=1, capacity_factor=1.0),
    )
    probe = torch.randn(6, 3, 32, 32)
    model.train()
    tracker = RoutingConsistencyTracker(probe, batch_size=4)
    snapshot = tracker.record(model, epoch=0, phase="init")
    assert model.training  # the model's mode is restored
    assert list(snapshot.assignments) == ["blocks.0.mlp", "blocks.1.mlp"]
    model.eval()
    with torch.no_grad():
        model(probe)
    for name, layer in (("blocks.0.mlp", model.blocks[0].mlp), ("blocks.1.mlp", model.blocks[1].mlp)):
        expected = layer.last_metrics.logits.argmax(-1).reshape(-1)  # one batch of all 6 images x 17 tokens
        assert snapshot.assignments[name].shape == (6 * 17,)
        assert torch.equal(snapshot.assignments[name], expected)
    # An unchanged model routes the same way: full agreement.
    tracker.record(model, epoch=1)
    assert tracker.adjacent()[1]["mean"] == 1.0


def test_tracker_errors():
    with pytest.raises(ValueError, match="probe_images must be a non-empty"):
        RoutingConsistencyTracker(torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        RoutingConsistencyTracker(torch.zeros(2, 3, 8, 8), batch_size=0)
    dense = create_model("vit_tiny_32", depth=1, embed_dim=32, num_heads=2, patch_size=8)
    with pytest.raises(ValueError, match="no sparse MoE layers"):
        RoutingConsistencyTracker(torch.zeros(2, 3, 32, 32)).record(dense, epoch=0)


def test_trainer_records_consistency_and_resumes_it(tmp_path, datasets):
    trainer = Trainer(tiny_config(tmp_path, epochs=2, consistency_probe=8), *datasets)
    trainer.fit()
    data = json.loads((tmp_path / "routing_consistency.json").read_text())
    assert data["epochs"] == [0, 1, 2] and data["phases"] == ["init", "train", "train"]
    assert data["probe_images"] == 8 and data["layers"] == ["blocks.1.mlp"]
    assert (tmp_path / "routing_consistency.csv").is_file()
    # The snapshots travel with the checkpoint, so a resumed run continues the curves.
    resumed = Trainer(tiny_config(tmp_path, epochs=3, consistency_probe=8), *datasets, resume=tmp_path)
    assert [snapshot.epoch for snapshot in resumed.consistency.snapshots] == [0, 1, 2]
    assert isinstance(resumed.consistency.snapshots[0], RoutingSnapshot)


def test_fine_tuning_from_a_checkpoint_records_pretrain_and_finetune(tmp_path, datasets, capsys):
    Trainer(tiny_config(tmp_path / "pretrained", epochs=1), *datasets).fit()
    # Fine-tune on a two-class version of the task: the head changes shape and starts fresh, the rest is loaded.
    two_class = [
        torch.utils.data.TensorDataset(images, labels % 2)
        for images, labels in (dataset.tensors for dataset in datasets)
    ]
    options = dict(tiny_config(tmp_path).model_options, num_classes=2)
    trainer = Trainer(
        tiny_config(
            tmp_path / "finetuned",
            epochs=2,
            consistency_probe=8,
            model_options=options,
            init_from=str(tmp_path / "pretrained"),
        ),
        *two_class,
    )
    assert "fresh weights for head.bias, head.weight (shape differs)" in capsys.readouterr().out
    pretrained = create_model("vmoe_tiny_32", **tiny_config(tmp_path).model_options)
    load_model_weights(pretrained, tmp_path / "pretrained")
    assert torch.equal(trainer.model.blocks[1].mlp.router.proj.weight, pretrained.blocks[1].mlp.router.proj.weight)
    trainer.fit()
    data = json.loads((tmp_path / "finetuned" / "routing_consistency.json").read_text())
    assert data["phases"] == ["pretrain", "finetune", "finetune"]
    assert data["pretrain"][0] is None and 0.0 <= data["pretrain"][2]["mean"] <= 1.0
    assert data["pretrain"][1]["mean"] == pytest.approx(
        trainer.consistency.phase_agreement("pretrain", "finetune")[0]["mean"]
    )


def test_init_from_a_different_model_is_an_error(tmp_path, datasets):
    Trainer(tiny_config(tmp_path / "pretrained", epochs=1), *datasets).fit()
    deeper = dict(tiny_config(tmp_path).model_options, depth=3)
    with pytest.raises(ValueError, match="holds a different model: missing \\['blocks.2"):
        Trainer(
            tiny_config(tmp_path / "other", model_options=deeper, init_from=str(tmp_path / "pretrained")), *datasets
        )


def test_eval_plots_the_recorded_curves(checkpoint):
    plot = checkpoint / "eval" / "routing_consistency.png"
    assert evaluate_main([str(checkpoint), "--dataset", "digits", "--split", "val"]) == 0
    assert not plot.exists()  # nothing recorded, nothing drawn
    tracker_with(HAND_MADE).write(checkpoint)  # the run's output directory, beside checkpoint/
    assert (
        evaluate_main(
            [
                str(checkpoint / "checkpoint"),
                "--dataset",
                "digits",
                "--split",
                "val",
                "--output-dir",
                str(checkpoint / "eval"),
            ]
        )
        == 0
    )
    assert plot.stat().st_size > 0


def test_trainer_consistency_probe_errors(tmp_path, datasets):
    with pytest.raises(ValueError, match="'consistency_probe' asks for 100 probe images but the validation set has 64"):
        Trainer(tiny_config(tmp_path, consistency_probe=100), *datasets)
    with pytest.raises(ValueError, match="'consistency_probe' needs a model with sparse MoE layers"):
        Trainer(
            tiny_config(
                tmp_path,
                model="vit_tiny_32",
                consistency_probe=4,
                model_options=dict(embed_dim=32, depth=1, num_heads=2, patch_size=8, num_classes=4),
            ),
            *datasets,
        )
