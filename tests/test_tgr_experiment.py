"""experiments/tgr_digits.py --small: the TGR experiment's pipeline end to end in seconds."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "tgr_digits.py"


def test_small_run_writes_the_tables(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--output-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with (tmp_path / "runs.csv").open() as file:
        runs = list(csv.DictReader(file))
    assert [(row["experts"], row["method"], row["seed"]) for row in runs] == [
        ("4", "V-MoE", "0"),
        ("4", "TGR", "0"),
        ("4", "V-MoE", "1"),
        ("4", "TGR", "1"),
    ]
    for row in runs:
        assert 0 <= float(row["test_accuracy"]) <= 1 and 0 <= float(row["adjacent_consistency"]) <= 1
    with (tmp_path / "summary.csv").open() as file:
        summary = list(csv.DictReader(file))
    assert [(row["method"], row["seeds"]) for row in summary] == [("V-MoE", "2"), ("TGR", "2")]
    accuracies = [float(row["test_accuracy"]) for row in runs if row["method"] == "TGR"]
    assert float(summary[1]["test_accuracy_mean"]) == sum(accuracies) / 2
    table = (tmp_path / "table.md").read_text()
    assert f"Command: `python experiments/tgr_digits.py --small --output-dir {tmp_path}`" in table
    assert table.count("| 4 |") == 2
    with (tmp_path / "curves.csv").open() as file:
        curves = list(csv.DictReader(file))
    assert len(curves) == 4 * 3  # four runs, snapshots at epochs 0, 1 and 2
