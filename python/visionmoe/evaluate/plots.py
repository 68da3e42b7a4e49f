"""PNG plots of an evaluation report: per-layer expert load, and which classes each expert serves."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from .report import EvalReport


def write_plots(report: EvalReport, directory: str | Path, class_names: Sequence[str]) -> List[Path]:
    """Writes ``load.png`` (one bar chart per MoE layer) and ``class_usage.png`` (one heat map per layer with a
    hard assignment: rows experts, columns classes, each class's column normalised to sum to 1); returns the
    paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or assumed
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if not report.layers:
        return written
    figure, axes = plt.subplots(1, len(report.layers), figsize=(4 * len(report.layers), 3), squeeze=False)
    for axis, layer in zip(axes[0], report.layers):
        share = layer.load / layer.load.sum().clamp(min=1e-12)
        axis.bar(range(len(share)), share.tolist())
        axis.axhline(1 / len(share), color="black", linewidth=0.8, linestyle="--")
        axis.set_title(f"{layer.name}\ndropped {layer.dropped_fraction:.1%}", fontsize=8)
        axis.set_xlabel("expert")
        axis.set_ylabel("share of load")
    figure.tight_layout()
    written.append(directory / "load.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    usage_layers = [layer for layer in report.layers if layer.class_usage is not None]
    if usage_layers:
        figure, axes = plt.subplots(1, len(usage_layers), figsize=(4 * len(usage_layers), 3.5), squeeze=False)
        for axis, layer in zip(axes[0], usage_layers):
            per_class = layer.class_usage / layer.class_usage.sum(0, keepdim=True).clamp(min=1e-12)
            image = axis.imshow(per_class.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
            axis.set_title(layer.name, fontsize=8)
            axis.set_xlabel("class")
            axis.set_ylabel("expert")
            axis.set_xticks(range(len(class_names)), [str(name) for name in class_names], fontsize=6, rotation=90)
            figure.colorbar(image, ax=axis, fraction=0.046)
        figure.tight_layout()
        written.append(directory / "class_usage.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written
