"""experiments/router_study.py --tiny: every router of the study trained once, end to end, in seconds."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "router_study.py"
MODELS = [
    "dense ViT",
    "top-1",
    "top-2",
    "top-1 + BPR",
    "dropless top-1",
    "expert choice",
    "Sinkhorn top-1",
    "Sinkhorn expert choice",
    "sparse expert choice",
    "Soft MoE",
    "hindsight",
]


def test_tiny_run_writes_the_table_and_the_plot(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--output-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    with (tmp_path / "runs.csv").open() as file:
        runs = list(csv.DictReader(file))
    assert [row["model"] for row in runs] == MODELS
    for row in runs:
        assert 0 <= float(row["test_accuracy"]) <= 1 and float(row["step_ms"]) > 0
        sparse = row["model"] not in ("dense ViT", "Soft MoE")
        # Routing statistics exist for MoE models only; consistency and specialisation for sparse routers only.
        assert (row["load_max_over_mean"] != "") == (row["model"] != "dense ViT")
        assert (row["adjacent_consistency"] != "") == sparse
        assert (row["specialisation_bits"] != "") == sparse
        if sparse:
            assert 0 <= float(row["adjacent_consistency"]) <= 1 and float(row["specialisation_bits"]) >= 0
    dropless = next(row for row in runs if row["model"] == "dropless top-1")
    assert float(dropless["dropped_fraction"]) == 0.0
    table = (tmp_path / "table.md").read_text()
    assert f"Command: `python experiments/router_study.py --tiny --output-dir {tmp_path}`" in table
    assert all(f"| {name} |" in table for name in MODELS)
    assert (tmp_path / "accuracy_vs_step_time.png").stat().st_size > 0
