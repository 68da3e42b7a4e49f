"""The training tool: config parsing and validation, training on a synthetic rule, exact resumption, Ctrl-C
checkpoints, loading a checkpoint in a fresh process, logs."""

import csv
import math
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from visionmoe.train import TrainConfig, Trainer, config_from_dict, load_config, warmup_cosine
from visionmoe.train.cli import build_parser, config_from_args, main

NUM_CLASSES = 4
# A tiny V-MoE (2 blocks, the second an MoE block with 4 noisy top-2 experts, 16 patches of 8 px) keeps runs fast.
TINY_MODEL = dict(
    embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, num_classes=NUM_CLASSES, moe=dict(num_experts=4)
)


def colour_rule_dataset(num_images: int, seed: int) -> TensorDataset:
    """Noise images [3, 32, 32]; label c < 3 brightens colour channel c, label 3 darkens all channels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=generator)
    for index, label in enumerate(labels.tolist()):
        if label < 3:
            images[index, label] += 0.5
        else:
            images[index] -= 0.5
    return TensorDataset(images, labels)


@pytest.fixture(scope="module")
def datasets():
    return colour_rule_dataset(96, seed=1), colour_rule_dataset(64, seed=2)


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        model="vmoe_tiny_32",
        model_options=TINY_MODEL,
        epochs=2,
        batch_size=32,
        lr=3e-3,
        warmup_epochs=0.5,
        seed=7,
        output_dir=str(tmp_path),
        device="cpu",
        progress=False,
        tensorboard=False,
        log_steps=True,
        aux_loss_weights={"importance": 0.01, "load": 0.01},
    )
    values.update(overrides)
    return config_from_dict(values)


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def without_timing(rows):
    return [{key: value for key, value in row.items() if key != "epoch_seconds"} for row in rows]


# --- configuration -----------------------------------------------------------------------------------------------


def test_config_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: vit_tiny_32\nepochs: 3\nmodel_options:\n  depth: 4\naux_loss_weights:\n  load: 0.1\n")
    config = load_config(
        path,
        [
            "lr=1e-2",
            "model_options.embed_dim=64",
            "aux_loss_weights.importance=0",
            "grad_clip=null",
            "dataset_options.seed=5",
        ],
    )
    assert config.model == "vit_tiny_32" and config.epochs == 3 and config.lr == 1e-2
    assert config.model_options == {"depth": 4, "embed_dim": 64}
    assert config.aux_loss_weights == {"load": 0.1, "importance": 0}
    assert config.grad_clip is None and config.dataset_options == {"seed": 5}


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        ({"epoch": 3}, [], "unknown config key(s) ['epoch']"),
        ({}, ["batchsize=3"], "unknown config key 'batchsize'"),
        ({"epochs": "ten"}, [], "config key 'epochs' must be int, got str 'ten'"),
        ({"epochs": 2.5}, [], "config key 'epochs' must be int"),
        ({"amp": 1}, [], "config key 'amp' must be bool"),
        ({"seed": True}, [], "config key 'seed' must be int"),
        ({}, ["epochs=0"], "config key 'epochs' must be >= 1, got 0"),
        ({"lr": 0}, [], "config key 'lr' must be > 0"),
        ({"epochs": 2, "warmup_epochs": 3}, [], "config key 'warmup_epochs' must be in [0, epochs]"),
        ({"aux_loss_weights": {"load": -1}}, [], "config key 'aux_loss_weights.load' must be a finite number >= 0"),
        # Non-finite numbers pass "> 0" (inf) or would make every loss nan.
        ({}, ["lr=.inf"], "config key 'lr' must be a finite number, got inf"),
        ({}, ["weight_decay=.nan"], "config key 'weight_decay' must be a finite number, got nan"),
        ({}, ["tgr_weight=.inf"], "config key 'tgr_weight' must be a finite number"),
        ({}, ["aux_loss_weights.load=.inf"], "config key 'aux_loss_weights.load' must be a finite number >= 0"),
        ({}, ["aux_loss_weights=null"], "config key 'aux_loss_weights' must be dict, got NoneType None"),
        ({}, ["aux_loss_weights=0.1"], "config key 'aux_loss_weights' must be dict"),
        ({}, ["seed=99999999999"], "config key 'seed' must be in [0, 2**32)"),
        ({}, ["batch_size=1e3"], "config key 'batch_size' must be int, got float 1000.0"),
        ({}, ["output_dir="], "config key 'output_dir' must be a directory, got an empty string"),
        ({}, ["output_dir=  "], "config key 'output_dir' must be a directory"),
        ({}, ["lr=[1,"], "the value of override 'lr=[1,' is not valid YAML: expected the node content"),
        ({}, ["epochs.x=1"], "config key 'epochs' is not a mapping"),
        ({}, ["lr"], "override must look like key=value"),
        ({"device": "tpu"}, [], "config key 'device' must be"),
    ],
)
def test_config_errors_name_the_key(values, overrides, message):
    with pytest.raises(ValueError) as error:
        config_from_dict(values, overrides)
    assert message in str(error.value)


def test_exponent_notation_is_a_float_at_any_depth(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e30 and 1.5e3 as strings; a nested option would reach the model as text.
    config = config_from_dict(
        {}, ["model_options.moe.capacity_factor=1e30", "lr=2e-3", "min_lr=1.5e-4", "dataset_options.scale=-1E2"]
    )
    assert config.model_options == {"moe": {"capacity_factor": 1e30}}
    assert (config.lr, config.min_lr, config.dataset_options["scale"]) == (2e-3, 1.5e-4, -100.0)
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nmodel_options:\n  moe:\n    capacity_factor: 2e0\nmodel: 1e3x\n")
    config = load_config(path)
    assert config.lr == 1e-3 and config.model_options["moe"]["capacity_factor"] == 2.0 and config.model == "1e3x"


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(bad)
    bad.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(bad)


def test_cli_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.1\nbatch_size: 8\n")
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--epochs",
            "5",
            "--batch-size",
            "16",
            "--amp",
            "--set",
            "batch_size=4",
            "--set",
            "model_options.depth=2",
        ]
    )
    config = config_from_args(args)
    assert (config.epochs, config.lr, config.batch_size, config.amp) == (5, 0.1, 4, True)
    assert config.model_options == {"depth": 2}


def test_cli_rejects_bad_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert "config key 'epochs' must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--set", "colour=red"])
    assert "unknown config key 'colour'" in capsys.readouterr().err


def test_cli_trains_and_resumes_with_the_checkpoint_config(tmp_path, datasets, monkeypatch, capsys):
    monkeypatch.setattr("visionmoe.train.trainer.build_datasets", lambda config: datasets)
    path = tmp_path / "run.yaml"
    path.write_text(f"model_options: {TINY_MODEL!r}\nprogress: false\ntensorboard: false\ndevice: cpu\n")
    output_dir = tmp_path / "out"
    assert main(["--config", str(path), "--epochs", "1", "--batch-size", "32", "--output-dir", str(output_dir)]) == 0
    assert "done: val accuracy" in capsys.readouterr().out
    # Without --config, --resume takes the checkpoint's config (the tiny model), here extended by one epoch.
    assert main(["--resume", str(output_dir), "--epochs", "2"]) == 0
    assert [row["epoch"] for row in read_csv(output_dir / "metrics.csv")] == ["1", "2"]


def cli_error(capsys, argv, code=2) -> str:
    """The one line that ``visionmoe-train argv`` prints on stderr as it exits with ``code``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("visionmoe-train: error: ")
    return error


def test_resume_writes_beside_the_checkpoint_or_where_told(tmp_path, datasets, monkeypatch, capsys):
    monkeypatch.setattr("visionmoe.train.trainer.build_datasets", lambda config: datasets)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model_options: {TINY_MODEL!r}\nprogress: false\ntensorboard: false\ndevice: cpu\nbatch_size: 32\nepochs: 1\n"
    )
    original = tmp_path / "original"
    assert main(["--config", str(path), "--output-dir", str(original)]) == 0
    # A copied checkpoint continues beside the copy, not in the run it was copied from (its saved output_dir).
    copy = tmp_path / "copy"
    shutil.copytree(original / "checkpoint", copy / "checkpoint")
    assert main(["--resume", str(copy / "checkpoint"), "--epochs", "2"]) == 0
    assert f"writing logs and checkpoints to {copy}" in capsys.readouterr().out
    assert [row["epoch"] for row in read_csv(copy / "metrics.csv")] == ["2"]
    assert [row["epoch"] for row in read_csv(original / "metrics.csv")] == ["1"]
    # With --config (no output_dir in it) as well; an output directory given anywhere wins.
    assert main(["--resume", str(original), "--config", str(path), "--epochs", "2"]) == 0
    assert [row["epoch"] for row in read_csv(original / "metrics.csv")] == ["1", "2"]
    elsewhere = tmp_path / "elsewhere"
    assert main(["--resume", str(copy), "--epochs", "3", "--set", f"output_dir={elsewhere}"]) == 0
    assert [row["epoch"] for row in read_csv(elsewhere / "metrics.csv")] == ["3"]
    # A checkpoint under another name would write over the checkpoint/ beside it.
    shutil.copytree(original / "checkpoint", original / "epoch2")
    assert "would write its checkpoints over" in cli_error(capsys, ["--resume", str(original / "epoch2")])


def test_cli_errors_are_one_line(tmp_path, datasets, monkeypatch, capsys):
    monkeypatch.setattr("visionmoe.train.trainer.build_datasets", lambda config: datasets)
    assert cli_error(capsys, ["--device", "cuda:99"]).startswith(
        "visionmoe-train: error: config key 'device' is 'cuda:99' but"
    )
    assert "'model_options' do not make a model: " in cli_error(capsys, ["--set", "model_options.depthh=2"])
    assert "config key 'output_dir' must be a directory" in cli_error(capsys, ["--set", "output_dir="])
    Trainer(tiny_config(tmp_path, epochs=1), *datasets).fit()
    state = tmp_path / "checkpoint" / "trainer_state.pt"
    state.write_bytes(b"garbage")
    assert f"checkpoint file {str(state)!r} does not match" in cli_error(capsys, ["--resume", str(tmp_path)])
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "checkpoint" / "manifest.json").unlink()  # as an older version saved it
    error = cli_error(capsys, ["--init-from", str(tmp_path), "--set", f"model_options={TINY_MODEL!r}"])
    assert f"cannot read model weights {str(weights)!r}" in error

    def unreadable(config):
        raise PermissionError(13, "Permission denied", "/data/train")

    monkeypatch.setattr("visionmoe.train.trainer.build_datasets", unreadable)
    assert cli_error(capsys, []) == "visionmoe-train: error: [Errno 13] Permission denied: '/data/train'"


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_stops_training_with_one_line(tmp_path, capsys, workers):
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(2):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(
                    tmp_path / split / name / f"{index}.png"
                )
    broken = tmp_path / "train" / "b" / "broken.png"
    broken.write_bytes(b"not an image")
    argv = [
        "--dataset",
        "image_folder",
        "--data-root",
        str(tmp_path),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        f"model_options={TINY_MODEL!r}",
        "--set",
        "progress=false",
        "--set",
        "tensorboard=false",
        "--set",
        f"num_workers={workers}",
        "--device",
        "cpu",
    ]
    assert cli_error(capsys, argv, code=1) == (
        f"visionmoe-train: error: cannot read image {str(broken)!r}: cannot identify image file {str(broken)!r} "
        f"(the data set option bad_images='check' finds every such image up front, 'skip' leaves them out)"
    )
    assert str(broken) in cli_error(capsys, argv + ["--set", "dataset_options.bad_images=check"])


def test_unreported_aux_loss_weight_warns(tmp_path, datasets):
    with pytest.warns(UserWarning, match=r"names \['importanse'\], which the model's routers do not report"):
        Trainer(tiny_config(tmp_path, epochs=1, aux_loss_weights={"importanse": 0.01}), *datasets).fit()


def test_warmup_cosine_schedule():
    multiplier = warmup_cosine(warmup_steps=4, total_steps=12, min_ratio=0.1)
    assert [multiplier(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert multiplier(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert multiplier(12) == pytest.approx(0.1)


# --- training ----------------------------------------------------------------------------------------------------


def test_training_learns_the_rule_and_writes_logs(tmp_path, datasets):
    train_set = colour_rule_dataset(256, seed=3)
    config = tiny_config(tmp_path, epochs=6, batch_size=16, tensorboard=True)
    trainer = Trainer(config, train_set, datasets[1])
    before = trainer.evaluate(train_set)
    result = trainer.fit()
    assert not result.interrupted and len(result.history) == 6
    after = trainer.evaluate(train_set)
    assert after["loss"] < 0.5 * before["loss"]
    assert result.history[-1]["val_accuracy"] >= 0.8
    assert 1.0 <= result.history[-1]["expert_load_ratio"] <= 4.0
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == list(range(1, 7))
    assert float(rows[-1]["val_accuracy"]) == result.history[-1]["val_accuracy"]
    assert len(read_csv(tmp_path / "steps.csv")) == 6 * trainer.steps_per_epoch
    pytest.importorskip("tensorboard")
    assert any((tmp_path / "tensorboard").iterdir())


def test_training_without_tensorboard_installed(tmp_path, datasets, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    result = Trainer(tiny_config(tmp_path, epochs=1, tensorboard=True), *datasets).fit()
    assert not result.interrupted
    assert "tensorboard package is not installed" in capsys.readouterr().out
    assert not (tmp_path / "tensorboard").exists()


def test_aux_loss_weights_are_applied(tmp_path, datasets):
    unweighted = Trainer(tiny_config(tmp_path / "a", epochs=1, aux_loss_weights={}), *datasets).fit()
    weighted = Trainer(tiny_config(tmp_path / "b", epochs=1, aux_loss_weights={"importance": 1.0}), *datasets).fit()
    assert unweighted.history[0]["aux_loss"] == 0.0
    assert weighted.history[0]["aux_loss"] > 0.0


def test_mixed_precision_on_cpu_uses_bfloat16(tmp_path, datasets):
    trainer = Trainer(tiny_config(tmp_path, amp=True, epochs=2), *datasets)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    with trainer._autocast():
        assert trainer.model(datasets[0].tensors[0][:2]).dtype == torch.bfloat16
    history = trainer.fit().history
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("interrupt_at_step", [3, 4])  # end of epoch 1 (3 steps per epoch), mid epoch 2
def test_resume_reproduces_the_uninterrupted_run(tmp_path, datasets, interrupt_at_step, capsys):
    reference = Trainer(tiny_config(tmp_path / "reference"), *datasets)
    reference.fit()

    def interrupt(trainer, step):
        if step == interrupt_at_step:
            raise KeyboardInterrupt

    config = tiny_config(tmp_path / "resumed")
    first = Trainer(config, *datasets, step_callback=interrupt).fit()
    assert first.interrupted
    captured = capsys.readouterr()
    assert f"Interrupted at epoch {(interrupt_at_step - 1) // 3 + 1}, step {interrupt_at_step}" in captured.out
    resumed = Trainer(config, *datasets, resume=tmp_path / "resumed")
    assert resumed.global_step == interrupt_at_step
    resumed.fit()

    assert without_timing(read_csv(tmp_path / "resumed" / "metrics.csv")) == without_timing(
        read_csv(tmp_path / "reference" / "metrics.csv")
    )
    assert read_csv(tmp_path / "resumed" / "steps.csv") == read_csv(tmp_path / "reference" / "steps.csv")
    reference_weights, resumed_weights = reference.model.state_dict(), resumed.model.state_dict()
    assert reference_weights.keys() == resumed_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(value, resumed_weights[name]), name


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="the test runner replaced Python's SIGINT handler",
)
def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, datasets, capsys):
    def press_ctrl_c(trainer, step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    result = Trainer(tiny_config(tmp_path), *datasets, step_callback=press_ctrl_c).fit()
    assert result.interrupted
    assert "checkpoint saved" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path).global_step == 2


def test_resume_rejects_a_different_batch_size(tmp_path, datasets):
    Trainer(tiny_config(tmp_path, epochs=1), *datasets).fit()
    with pytest.raises(ValueError, match="steps per epoch"):
        Trainer(tiny_config(tmp_path, batch_size=16), *datasets, resume=tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path / "nowhere")


def test_checkpoint_loads_in_a_fresh_process(tmp_path, datasets):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1), *datasets)
    trainer.fit()
    expected = trainer.evaluate()["accuracy"]
    torch.save(datasets[1].tensors, tmp_path / "val.pt")
    script = textwrap.dedent(f"""
        import torch, yaml
        from safetensors.torch import load_file
        from visionmoe.models import create_model
        from visionmoe.train import load_model

        checkpoint = {str(tmp_path / "run" / "checkpoint")!r}
        with open(checkpoint + "/config.yaml") as file:
            config = yaml.safe_load(file)
        model = create_model(config["model"], **config["model_options"])
        model.load_state_dict(load_file(checkpoint + "/model.safetensors"), strict=True)
        model.eval()
        images, labels = torch.load({str(tmp_path / "val.pt")!r})
        with torch.no_grad():
            correct = sum((model(images[i:i + 32]).argmax(-1) == labels[i:i + 32]).sum().item()
                          for i in range(0, len(labels), 32))
            same = torch.equal(model(images[:8]), load_model(checkpoint)(images[:8]))
        print(correct / len(labels), same)
    """)
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    accuracy, same = output.split()
    assert float(accuracy) == expected and same == "True"
