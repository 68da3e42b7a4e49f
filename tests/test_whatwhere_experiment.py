"""experiments/whatwhere_discovery.py runs end to end in its tiny setting and writes its tables."""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest


def load_experiment(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "experiments" / "whatwhere_discovery.py"
    spec = importlib.util.spec_from_file_location("whatwhere_discovery", path)
    experiment = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, experiment)  # dataclasses look their module up there
    spec.loader.exec_module(experiment)
    return experiment


def test_discovery_experiment_tiny_setting_writes_its_tables(tmp_path, monkeypatch):
    experiment = load_experiment(monkeypatch)
    arguments = ["--setting", "tiny", "--seeds", "0", "1", "--variants", "w0", "w12", "--output-dir", str(tmp_path)]
    assert experiment.main(arguments) == 0
    table = (tmp_path / "table.md").read_text()
    assert f"Command: `PYTHONPATH=python python experiments/whatwhere_discovery.py {' '.join(arguments)}`" in table
    for heading in ("(A) same-class scenes, single label: >=2 digits", "(B) mixed scenes, multi-hot labels: 1 digits"):
        assert heading in table
    with (tmp_path / "runs.csv").open() as file:
        rows = list(csv.DictReader(file))
    methods = {(row["task"], row["method"]) for row in rows}
    for task in ("A", "B"):
        assert {
            (task, m) for m in ("ink", "tiles", "vit (mean)", "vit (best head)", "vit (mass)", "slot_attention")
        } <= methods
    assert {("A", "wwt_w0"), ("A", "wwt_w0 (token softmax)"), ("A", "wwt_w12")} <= methods
    # Task A: the ViT, the slot-attention model and the best variant at both seeds, trained.
    best = next(line for line in table.splitlines() if line.startswith("Setting:")).split("): ")[-1].rstrip(".")
    for method in ("vit (mean)", "slot_attention", best):
        seeds = {row["seed"] for row in rows if (row["task"], row["method"], row["trained"]) == ("A", method, "True")}
        assert seeds == {"0", "1"}
    assert {row["group"] for row in rows} <= {"all", "1", ">=2"}
    for row in rows:
        for metric in ("score", "corloc", "recall", "precision", "fg_ari", "mbo", "miou", "collapse"):
            value = float(row[metric])
            assert math.isnan(value) or -1.0 <= value <= 1.0
    assert all(math.isnan(float(row["miou"])) for row in rows if row["task"] == "A")
    assert float(next(row for row in rows if row["method"] == "tiles")["collapse"]) == 1.0


def test_discovery_experiment_rejects_bad_arguments(tmp_path, monkeypatch, capsys):
    experiment = load_experiment(monkeypatch)
    for arguments, message in (
        (["--tasks", "B"], "--best-variant"),
        (["--steps", "0"], "--steps"),
        (["--train-scenes", "0"], "--train-scenes"),
        (["--variants", "w9"], "w9"),
    ):
        with pytest.raises(SystemExit):
            experiment.main([*arguments, "--setting", "tiny", "--output-dir", str(tmp_path)])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "table.md").exists()
