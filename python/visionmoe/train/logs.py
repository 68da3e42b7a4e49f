"""What :class:`~visionmoe.train.Trainer` logs: per-epoch rows (``metrics.csv``), per-step rows (``steps.csv``,
with ``log_steps``), TensorBoard scalars and the progress bar.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from tqdm.auto import tqdm

EPOCH_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "aux_loss",
    "expert_load_ratio",
    "distillation_loss",
    "teacher_router_loss",
    "val_loss",
    "val_accuracy",
    "epoch_seconds",
]
STEP_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "loss",
    "accuracy",
    "aux_loss",
    "expert_load_ratio",
    "distillation_loss",
    "teacher_router_loss",
]


class CsvLog:
    """Appends rows to a CSV file, writing the header when the file is new. Existing rows whose integer ``column``
    exceeds ``last`` are dropped first: they were logged after the checkpoint the run resumes from (or by an
    earlier run in the same directory), and the run logs those epochs or steps again."""

    def __init__(self, path: Path, columns: List[str], column: str, last: int):
        self.path, self.columns = path, columns
        if path.exists():
            with path.open(newline="") as file:
                rows = list(csv.DictReader(file))
            kept = [row for row in rows if int(row[column]) <= last]
            if len(kept) == len(rows):
                return
        else:
            kept = []
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("w", newline="") as file:
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(temporary, path)

    def append(self, row: Dict[str, Any]) -> None:
        with self.path.open("a", newline="") as file:
            csv.writer(file).writerow(["" if row.get(column) is None else row[column] for column in self.columns])


def tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "visionmoe-train: the tensorboard package is not installed; skipping TensorBoard logs "
            "(pip install 'visionmoe[tensorboard]')"
        )
        return None
    return SummaryWriter(log_dir=str(log_dir))


def log_step(row: Dict[str, Any], progress: tqdm, step_log: Optional[CsvLog], writer) -> None:
    """One optimiser step's row: to the progress bar, ``steps.csv`` and TensorBoard (when each is on)."""
    progress.update(1)
    postfix = dict(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")
    if row["expert_load_ratio"] is not None:
        postfix["load max/mean"] = f"{row['expert_load_ratio']:.2f}"
    progress.set_postfix(postfix, refresh=False)
    if step_log is not None:
        step_log.append(row)
    if writer is not None:
        for name in (
            "loss",
            "accuracy",
            "aux_loss",
            "lr",
            "expert_load_ratio",
            "distillation_loss",
            "teacher_router_loss",
        ):
            if row[name] is not None:
                writer.add_scalar(f"step/{name}", row[name], row["step"])


def log_epoch(row: Dict[str, Any], progress: tqdm, epoch_log: CsvLog, writer) -> None:
    """One epoch's row: to ``metrics.csv``, TensorBoard (when on) and a line above the progress bar."""
    epoch_log.append(row)
    if writer is not None:
        for name, value in row.items():
            if name not in ("epoch", "step") and value is not None:
                writer.add_scalar(f"epoch/{name}", value, row["epoch"])
    distillation = "" if row["distillation_loss"] is None else f" distillation {row['distillation_loss']:.4f}"
    progress.write(
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.4f}{distillation} | val loss {row['val_loss']:.4f} "
        f"acc {row['val_accuracy']:.4f}"
    )
