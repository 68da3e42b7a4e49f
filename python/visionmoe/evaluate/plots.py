"""PNG plots of an evaluation report: per-layer expert load, and which classes each expert serves."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch

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


def patch_assignments(layer, batch_size: int, grid: int) -> torch.Tensor:
    """[B, grid, grid] the expert each patch token went to in ``layer``'s last forward pass (its highest-weight
    kept assignment; -1 where every assignment was dropped). Token 0 of each image is the class token."""
    plan = layer.last_plan
    tokens_per_image = (plan.token_offsets.shape[0] - 1) // batch_size
    kept = plan.kept()
    weight = torch.where(kept, plan.weight.detach().float(), torch.full_like(plan.weight.detach().float(), -1.0))
    best_weight = torch.full((batch_size * tokens_per_image,), -1.0).scatter_reduce(
        0, plan.sorted_token, weight, reduce="amax", include_self=True
    )
    is_best = kept & (weight == best_weight[plan.sorted_token])
    expert = torch.full((batch_size * tokens_per_image,), -1, dtype=torch.long)
    expert[plan.sorted_token[is_best]] = torch.div(plan.sorted_expert[is_best], plan.num_groups, rounding_mode="floor")
    patches = expert.view(batch_size, tokens_per_image)[:, tokens_per_image - grid * grid :]
    return patches.reshape(batch_size, grid, grid)


def draw_patch_assignments(axis, image, assignments, num_experts: int) -> None:
    """Draws ``image`` [C, H, W] (channels averaged, grey) on a matplotlib ``axis`` with each patch tinted by the
    expert in ``assignments`` [grid, grid] (as from :func:`patch_assignments`; -1, no expert, stays untinted)."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")
    shown = image.float().mean(0)
    axis.imshow(((shown - shown.min()) / (shown.max() - shown.min()).clamp(min=1e-6)).numpy(), cmap="gray")
    overlay = [[colours(int(e) % colours.N) if e >= 0 else (0, 0, 0, 0) for e in row] for row in assignments.tolist()]
    axis.imshow(
        overlay, alpha=0.45, extent=(-0.5, shown.shape[1] - 0.5, shown.shape[0] - 0.5, -0.5), interpolation="nearest"
    )
    axis.set_axis_off()


def write_patch_assignment_plot(images, assignments, num_experts: int, path: str | Path, title: str) -> Path:
    """One panel per image: the image with each patch tinted by the expert its token went to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = images.shape[0]
    figure, axes = plt.subplots(1, count, figsize=(1.8 * count, 2.0), squeeze=False)
    for axis, image, grid in zip(axes[0], images, assignments):
        draw_patch_assignments(axis, image, grid, num_experts)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_routing_consistency_plot(consistency: dict, path: str | Path) -> Path:
    """Two panels from a ``routing_consistency.json`` (:meth:`visionmoe.train.RoutingConsistencyTracker.to_dict`):
    each MoE layer's (and the mean's) agreement with the previous epoch, and with the final epoch, by epoch (and,
    after fine-tuning, dashed: with the pre-trained routing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = consistency["epochs"]
    figure, (adjacent_axis, final_axis) = plt.subplots(1, 2, figsize=(9, 3.2))
    for layer in consistency["layers"] + ["mean"]:
        style = dict(color="black", linewidth=2) if layer == "mean" else dict(linewidth=1)
        points = [(epoch, values[layer]) for epoch, values in zip(epochs, consistency["adjacent"]) if values]
        adjacent_axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=layer, **style)
        final_axis.plot(epochs, [values[layer] for values in consistency["final"]], marker=".", label=layer, **style)
    for axis, title in (
        (adjacent_axis, "agreement with the previous epoch"),
        (final_axis, "agreement with the final epoch"),
    ):
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_ylabel("fraction of probe tokens, same top-1 expert")
        axis.set_ylim(0, 1.02)
    if any(consistency.get("pretrain") or []):
        for layer in consistency["layers"] + ["mean"]:
            points = [(epoch, values[layer]) for epoch, values in zip(epochs, consistency["pretrain"]) if values]
            final_axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                linestyle="--",
                marker="x",
                color="black" if layer == "mean" else None,
                label=f"{layer} vs pre-trained",
            )
    final_axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
