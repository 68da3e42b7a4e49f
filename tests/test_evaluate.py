"""visionmoe-eval: accuracy, routing statistics, the expert-class table, plots, and clear errors."""

import json

import pytest
import torch

from visionmoe.evaluate import evaluate
from visionmoe.evaluate.cli import main
from visionmoe.evaluate.plots import patch_assignments
from visionmoe.models import create_model
from visionmoe.train import config_from_dict
from visionmoe.train.checkpoint import save_checkpoint

MODEL_OPTIONS = dict(
    depth=2, embed_dim=32, num_heads=2, patch_size=8, moe_blocks=[1], moe=dict(num_experts=4, k=1, capacity_factor=1.0)
)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("vmoe_tiny_32", **MODEL_OPTIONS)
    config = config_from_dict(
        {"model": "vmoe_tiny_32", "model_options": MODEL_OPTIONS, "dataset": "digits", "output_dir": str(tmp_path)}
    )
    save_checkpoint(tmp_path / "checkpoint", model, config, {})
    return tmp_path


def test_cli_writes_report_and_plots(checkpoint, capsys):
    assert main([str(checkpoint), "--dataset", "digits", "--split", "test", "--batch-size", "100"]) == 0
    report = json.loads((checkpoint / "eval" / "report.json").read_text())
    assert report["num_images"] == 359 and 0.0 <= report["accuracy"] <= 1.0
    (layer,) = report["layers"]
    assert layer["name"] == "blocks.1.mlp" and len(layer["load"]) == 4
    usage = torch.tensor(layer["class_usage"])
    assert usage.shape == (4, 10)
    # Every kept assignment is counted once in the load and once in the class table.
    assert usage.sum().item() == pytest.approx(sum(layer["load"]))
    for plot in ("load.png", "class_usage.png", "assignments_blocks_1_mlp.png"):
        assert (checkpoint / "eval" / plot).stat().st_size > 0
    assert "accuracy" in capsys.readouterr().out


def test_eval_of_a_checkpoint_directory_writes_beside_it(checkpoint):
    # Inside, the next save (which replaces the checkpoint directory whole) would refuse or lose the report.
    assert main([str(checkpoint / "checkpoint"), "--dataset", "digits", "--split", "val"]) == 0
    assert (checkpoint / "eval" / "report.json").is_file()
    assert sorted(path.name for path in (checkpoint / "checkpoint").iterdir()) == [
        "config.yaml",
        "manifest.json",
        "model.safetensors",
        "trainer_state.pt",
    ]


def test_class_usage_counts_each_class_tokens():
    # K = 1 and capacity C = T (capacity factor E): nothing is dropped, so each class's column of the table sums
    # to its images times their tokens (4 x 4 patches and the class token).
    torch.manual_seed(0)
    options = dict(MODEL_OPTIONS, moe=dict(num_experts=4, k=1, capacity_factor=4.0))
    model = create_model("vmoe_tiny_32", num_classes=2, **options)
    images = torch.randn(10, 3, 32, 32)
    labels = torch.tensor([0] * 6 + [1] * 4)
    report = evaluate(model, torch.utils.data.TensorDataset(images, labels), 2, batch_size=4)
    (layer,) = report.layers
    assert layer.dropped_fraction == 0.0 and layer.unrouted_fraction == 0.0
    assert layer.class_usage.sum(0).tolist() == [6 * 17, 4 * 17]
    assert layer.load.sum().item() == 10 * 17


def test_patch_assignments_follow_the_plan():
    torch.manual_seed(0)
    options = dict(MODEL_OPTIONS, moe=dict(num_experts=4, k=1, capacity_factor=4.0))
    model = create_model("vmoe_tiny_32", **options).eval()
    model(torch.randn(3, 3, 32, 32))
    layer = model.blocks[1].mlp
    grid = patch_assignments(layer, 3, 4)
    plan = layer.last_plan
    expected = torch.empty(3 * 17, dtype=torch.long)
    expected[plan.sorted_token] = plan.sorted_expert  # K = 1, one group: one assignment per token
    assert torch.equal(grid, expected.view(3, 17)[:, 1:].reshape(3, 4, 4))


def test_errors_are_clear(tmp_path, capsys):
    assert main([str(tmp_path), "--dataset", "digits"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    model = create_model("vmoe_tiny_32", **MODEL_OPTIONS)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(
            model, torch.utils.data.TensorDataset(torch.zeros(1, 3, 32, 32), torch.zeros(1).long()), 10, batch_size=0
        )


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:99", "visionmoe-eval: error: --device is 'cuda:99' but "),  # no CUDA, or not that many devices
        ("gpu", "visionmoe-eval: error: --device is 'gpu', which is not a device name"),
    ],
)
def test_an_unusable_device_is_a_one_line_error(checkpoint, capsys, device, message):
    assert main([str(checkpoint), "--dataset", "digits", "--device", device]) == 2
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1


def test_a_corrupt_checkpoint_is_a_one_line_error_naming_the_file(checkpoint, capsys):
    weights = checkpoint / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main([str(checkpoint), "--dataset", "digits"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"visionmoe-eval: error: checkpoint file {str(weights)!r} does not match")
    assert error.count("\n") == 1
    (checkpoint / "checkpoint" / "manifest.json").unlink()  # as saved before manifests: read, and fail, as is
    assert main([str(checkpoint), "--dataset", "digits"]) == 2
    assert capsys.readouterr().err.startswith(f"visionmoe-eval: error: cannot read model weights {str(weights)!r}")
