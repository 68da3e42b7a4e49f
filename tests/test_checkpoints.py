"""Checkpoints: saves that leave a whole checkpoint wherever a second Ctrl-C, a crash or a full disk stops them;
manifests that tie the weights and the trainer state to one step; clear errors naming the file for partial,
corrupt, mixed and mistyped checkpoints; and resumption after any interruption that ends in the uninterrupted
run's weights, bit for bit."""

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_train import TINY_MODEL, datasets, read_csv, tiny_config, without_timing  # noqa: F401 (a fixture)
from torch import nn

from visionmoe.models import create_model
from visionmoe.train import Trainer, checkpoint, load_model, load_model_weights
from visionmoe.train.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    load_matching_weights,
    load_trainer_state,
    save_checkpoint,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def reference(datasets, tmp_path_factory):
    """The uninterrupted run (2 epochs of 3 steps) that every interrupted and resumed run must reproduce."""
    directory = tmp_path_factory.mktemp("reference")
    trainer = Trainer(tiny_config(directory), *datasets)
    trainer.fit()
    return directory, trainer.model.state_dict()


def assert_same_run(directory: Path, reference, model: nn.Module) -> None:
    """The run in ``directory`` logged the same epochs and steps as the reference and ended with its weights."""
    reference_dir, reference_weights = reference
    metrics, reference_metrics = (read_csv(path / "metrics.csv") for path in (directory, reference_dir))
    assert without_timing(metrics) == without_timing(reference_metrics)
    assert read_csv(directory / "steps.csv") == read_csv(reference_dir / "steps.csv")
    weights = model.state_dict()
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(value, weights[name]), name


def tiny_model(seed: int) -> nn.Module:
    """The tests' tiny V-MoE, initialised from ``seed``."""
    torch.manual_seed(seed)
    return create_model("vmoe_tiny_32", **TINY_MODEL)


def save_step(directory: Path, step: int) -> nn.Module:
    """Saves a checkpoint of step ``step`` whose weights are a model initialised with seed ``step``."""
    model = tiny_model(step)
    save_checkpoint(directory, model, tiny_config(directory.parent), {"model": "vmoe_tiny_32", "global_step": step})
    return model


def loaded_step(directory: Path) -> tuple[int, nn.Module]:
    """The step and weights of the checkpoint ``directory`` names, as a resumed run would load them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading a copy that an interrupted save left says so
        step = load_trainer_state(directory)["global_step"]
        return step, load_model_weights(tiny_model(0), directory)


def assert_same_weights(model: nn.Module, expected: nn.Module) -> None:
    """Every tensor of ``model`` equals ``expected``'s exactly."""
    for (name, value), other in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(value, other), name


class Interrupter:
    """Counts the points of a save, just before and just after each of its file-system operations (writing,
    hashing, flushing, renaming, deleting), as labels such as "after rename", and raises KeyboardInterrupt, as a
    second Ctrl-C would, at point number ``at`` (or at the first point with the label ``at``)."""

    OPERATIONS = [
        (checkpoint, "save_safetensors_model"),
        (checkpoint, "save_config"),
        (checkpoint.torch, "save"),
        (checkpoint, "_sha256"),
        (checkpoint, "_fsync"),
        (checkpoint.os, "rename"),
        (checkpoint.shutil, "rmtree"),
        (Path, "write_text"),
        (Path, "mkdir"),
    ]

    def __init__(self, monkeypatch):
        self.at = None
        self.points = []
        for owner, name in self.OPERATIONS:
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name, function):
        def wrapped(*args, **kwargs):
            self._point(f"before {name}")
            result = function(*args, **kwargs)
            self._point(f"after {name}")
            return result

        return wrapped

    def _point(self, label: str) -> None:
        self.points.append(label)
        if self.at == len(self.points) - 1 or self.at == label:
            self.at = None
            raise KeyboardInterrupt


# --- saving and loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "first save"])
def test_a_save_interrupted_at_any_point_leaves_a_whole_checkpoint(tmp_path, monkeypatch, previous):
    interrupter = Interrupter(monkeypatch)
    for point in itertools.count():
        directory = tmp_path / str(point) / "checkpoint"
        before = save_step(directory, 3) if previous else None
        interrupter.points, interrupter.at = [], point
        try:
            save_step(directory, 4)
        except KeyboardInterrupt:
            pass
        else:
            break  # the save has fewer points than this one: all were tried
        interrupter.at = None
        try:
            step, weights = loaded_step(directory)
        except FileNotFoundError:
            assert not previous, "only a first save may leave no checkpoint at all"
        else:  # never a mix: the whole previous checkpoint, or the whole new one
            assert_same_weights(weights, {3: before, 4: tiny_model(4)}[step])
        # The next save puts the checkpoint back in place and clears what the interrupted one left.
        save_step(directory, 5)
        assert [path.name for path in directory.parent.iterdir()] == ["checkpoint"]
        assert loaded_step(directory)[0] == 5
    assert {"after rename", "before rmtree", "after _fsync"} <= set(interrupter.points) or not previous
    assert point > 20


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoint"
    before = save_step(directory, 3)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_step(directory, 4)
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]
    step, weights = loaded_step(directory)
    assert step == 3
    assert_same_weights(weights, before)


def test_a_save_replaces_only_a_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(
        CheckpointError,
        match=r"'.*run' holds files that are not part of a checkpoint \(notes.txt\); "
        "a save replaces the whole directory",
    ):
        save_step(tmp_path / "run", 1)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    # A checkpoint of an older version (no manifest, perhaps a temporary file of its one-by-one save) is replaced.
    save_step(tmp_path / "old", 1)
    (tmp_path / "old" / MANIFEST_FILE).unlink()
    (tmp_path / "old" / (STATE_FILE + ".tmp")).write_bytes(b"")
    save_step(tmp_path / "old", 2)
    assert loaded_step(tmp_path / "old")[0] == 2


def test_the_manifest_records_the_step_and_each_file_hash(tmp_path):
    save_step(tmp_path / "checkpoint", 7)
    manifest = json.loads((tmp_path / "checkpoint" / MANIFEST_FILE).read_text())
    assert manifest["global_step"] == 7
    assert set(manifest["sha256"]) == {MODEL_FILE, STATE_FILE, "config.yaml"}
    assert loaded_step(tmp_path)[0] == 7


def test_mixed_partial_and_corrupt_checkpoints_are_refused(tmp_path):
    directory, other = tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint"
    save_step(directory, 3)
    save_step(other, 4)
    # New weights beside old trainer state, as a save that wrote its files one by one left them.
    original = (directory / MODEL_FILE).read_bytes()
    (directory / MODEL_FILE).write_bytes((other / MODEL_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=r"model.safetensors' does not match .*manifest.json'.*step 3"):
        load_trainer_state(directory)
    with pytest.raises(CheckpointError, match="model.safetensors' does not match"):
        load_model(directory)
    (directory / MODEL_FILE).write_bytes(original)
    # Trainer state of another step under a manifest rewritten to match the files.
    (directory / STATE_FILE).write_bytes((other / STATE_FILE).read_bytes())
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["sha256"][STATE_FILE] = checkpoint._sha256(directory / STATE_FILE)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="mixes steps: manifest 3, trainer state 4, weights 3"):
        load_trainer_state(directory)
    # A damaged trainer state that the manifest vouches for still fails with its name, not a traceback.
    (directory / STATE_FILE).write_bytes(b"not a torch file")
    manifest["sha256"][STATE_FILE] = checkpoint._sha256(directory / STATE_FILE)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot read trainer state .*trainer_state.pt"):
        load_trainer_state(directory)
    (directory / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="trainer_state.pt' is missing: .* is a partial checkpoint"):
        load_trainer_state(directory)
    (directory / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json' is corrupt"):
        load_model(directory)


def test_a_checkpoint_without_manifest_loads_weights_but_does_not_resume(tmp_path, datasets):
    directory = tmp_path / "checkpoint"
    saved = save_step(directory, 3)
    (directory / MANIFEST_FILE).unlink()
    assert_same_weights(load_model(directory), saved)
    with pytest.raises(
        CheckpointError,
        match="has no manifest.json .* cannot be resumed; start a new run from its weights with --init-from",
    ):
        Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path)
    (directory / MODEL_FILE).write_bytes((directory / MODEL_FILE).read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="cannot read model weights .*model.safetensors'"):
        load_model(directory)


def test_a_checkpoint_not_saved_by_the_trainer_does_not_resume(tmp_path, datasets):
    save_step(tmp_path / "checkpoint", 3)  # a trainer state of only the model name and the step
    with pytest.raises(CheckpointError, match=r"lacks \['epoch', 'epoch_totals', .*not saved by Trainer.save"):
        Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path)


def test_weights_of_another_dtype_are_refused(tmp_path):
    model = tiny_model(0)
    model.head.bias = nn.Parameter(torch.arange(4), requires_grad=False)  # int64 where the model has float32
    save_checkpoint(tmp_path / "checkpoint", model, tiny_config(tmp_path), {"global_step": 0})
    message = r"tensor 'head.bias' in .*model.safetensors' is torch.int64, but the model's is torch.float32"
    with pytest.raises(CheckpointError, match=message):
        load_model_weights(tiny_model(0), tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_matching_weights(tiny_model(0), tmp_path)
    save_checkpoint(tmp_path / "checkpoint", tiny_model(0).double(), tiny_config(tmp_path), {"global_step": 0})
    with pytest.raises(CheckpointError, match="is torch.float64, but the model's is torch.float32"):
        load_model(tmp_path)


# --- a second Ctrl-C during the save -------------------------------------------------------------------------------


# Where the second Ctrl-C stops the save, and the step resumed from: the previous checkpoint's (3) until the new
# one is complete; between the renames the new one (4) from beside the missing checkpoint directory.
@pytest.mark.parametrize(
    "point, resumed_step",
    [("before save_safetensors_model", 3), ("after _fsync", 3), ("after rename", 4), ("before rmtree", 4)],
)
def test_a_second_ctrl_c_during_the_save_resumes_into_the_same_run(
    tmp_path, datasets, reference, monkeypatch, point, resumed_step
):
    interrupter = Interrupter(monkeypatch)

    def first_ctrl_c(trainer, step):
        if step == 4:  # mid epoch 2, with the checkpoint of epoch 1 in place
            interrupter.at = point  # the second Ctrl-C comes during the save that the first one starts
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path), *datasets, step_callback=first_ctrl_c).fit()
    assert interrupter.at is None, "the save never reached the point"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path)
    assert resumed.global_step == resumed_step
    resumed.fit()
    assert_same_run(tmp_path, reference, resumed.model)


def test_a_second_ctrl_c_inside_a_step_resumes_from_the_last_checkpoint(tmp_path, datasets, reference, monkeypatch):
    def interrupted(optimizer):
        raise KeyboardInterrupt

    def ctrl_c_in_the_next_step(trainer, step):
        if step == 4:  # step 5 stops inside its optimiser step, as a second Ctrl-C does before the step ends
            monkeypatch.setattr(trainer.scaler, "step", interrupted)

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path), *datasets, step_callback=ctrl_c_in_the_next_step).fit()
    resumed = Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path)
    assert resumed.global_step == 3  # the end of epoch 1: no checkpoint of a half-done step
    resumed.fit()
    assert_same_run(tmp_path, reference, resumed.model)


def test_two_real_ctrl_c_in_a_training_process(tmp_path, datasets, reference):
    # The child waits for the first SIGINT after step 4, then, in the save that SIGINT starts, for the second one
    # between the two renames of the swap: the worst moment, when the checkpoint directory itself is missing.
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(TESTS)!r})
        # As in a terminal, whatever the test runner inherited (a background job ignores SIGINT).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from test_train import colour_rule_dataset, tiny_config
        from visionmoe.train import Trainer

        rename = os.rename

        def wait(condition):
            deadline = time.monotonic() + 60
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.01)

        def rename_then_wait(source, target):
            rename(source, target)
            if str(source).endswith("checkpoint"):  # the first rename of a swap
                print("between the renames", flush=True)
                wait(lambda: False)

        def wait_for_ctrl_c(trainer, step):
            if step == 4:
                os.rename = rename_then_wait
                print("step 4", flush=True)
                wait(lambda: trainer._stop_requested)

        Trainer(tiny_config({str(tmp_path)!r}), colour_rule_dataset(96, seed=1), colour_rule_dataset(64, seed=2),
                step_callback=wait_for_ctrl_c).fit()
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for marker in ("step 4", "between the renames"):
        for line in child.stdout:
            output.append(line)
            if line.strip() == marker:
                break
        child.send_signal(signal.SIGINT)
    output.append(child.stdout.read())
    assert child.wait(timeout=60) != 0
    assert "Interrupted again while saving" in "".join(output), "".join(output)
    assert sorted(path.name for path in tmp_path.glob("checkpoint*")) == ["checkpoint.new", "checkpoint.old"]
    with pytest.warns(UserWarning, match="missing because a save was interrupted"):
        resumed = Trainer(tiny_config(tmp_path), *datasets, resume=tmp_path)
    assert resumed.global_step == 4
    resumed.fit()
    assert_same_run(tmp_path, reference, resumed.model)
    assert sorted(path.name for path in tmp_path.glob("checkpoint*")) == ["checkpoint"]
