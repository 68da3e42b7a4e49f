"""What the experiment scripts share to write their result tables: CSV files and mean +- spread over seeds."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys, in the first row's order) as a CSV file with a header."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation of ``values`` (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
