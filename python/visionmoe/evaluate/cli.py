"""``visionmoe-eval``: accuracy, routing statistics and plots of a trained checkpoint (and, when the training run
recorded it, the routing-consistency curves of routing_consistency.json).

    visionmoe-eval runs/digits --dataset digits --split test --output-dir runs/digits/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data import create_dataset
from ..layers import MoEMLP
from ..train import load_model
from ..train.checkpoint import check_checkpoint_dir
from ..train.cli import error_line
from ..train.trainer import resolve_device
from .plots import patch_assignments, write_patch_assignment_plot, write_plots, write_routing_consistency_plot
from .report import evaluate


def main(argv=None) -> int:
    """Entry point of ``visionmoe-eval``; returns 0 after writing the report, 2 with a one-line error naming the
    option or file for a bad command line, checkpoint or data set."""
    parser = argparse.ArgumentParser(
        prog="visionmoe-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a training output directory or its checkpoint/ directory")
    parser.add_argument("--dataset", required=True, help="data set name (visionmoe.data.list_datasets())")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-root", default=None, help="local data directory, for data sets that need one")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where report.json and the plots go (default: eval/ "
        "beside the checkpoint directory, in its run directory)",
    )
    args = parser.parse_args(argv)
    try:
        device = str(resolve_device(args.device, "--device"))
        model = load_model(args.checkpoint, map_location=device)
        dataset = create_dataset(args.dataset, args.split, root=args.data_root)
        report = evaluate(model, dataset, dataset.num_classes, batch_size=args.batch_size, device=device)
        # Not inside the checkpoint directory: a save replaces that directory whole.
        output = Path(args.output_dir) if args.output_dir else check_checkpoint_dir(args.checkpoint).parent / "eval"
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        plots = write_plots(report, output, dataset.classes)
        plots += _assignment_plots(model, dataset, output, device)
        plots += _consistency_plots(Path(args.checkpoint), output)
    except (FileNotFoundError, ValueError, OSError) as error:  # ValueError includes CheckpointError, DataFileError
        print(f"{parser.prog}: error: {error_line(error)}", file=sys.stderr)
        return 2
    print(
        f"{args.dataset}/{args.split}: accuracy {report.accuracy:.4f}, loss {report.loss:.4f} "
        f"({report.num_images} images)"
    )
    for layer in report.layers:
        share = layer.load / layer.load.sum().clamp(min=1e-12)
        print(
            f"  {layer.name}: expert load share {', '.join(f'{value:.2f}' for value in share.tolist())}; "
            f"dropped {layer.dropped_fraction:.1%}, unrouted tokens {layer.unrouted_fraction:.1%}"
        )
        if layer.class_usage is not None:
            print(f"    specialisation: {specialisation_summary(layer.class_usage, dataset.classes)}")
    print("wrote", output / "report.json", *plots)
    return 0


def specialisation_summary(class_usage: torch.Tensor, class_names) -> str:
    """One line naming, for each expert, the class that makes up most of its work and that class's share of it,
    e.g. ``e0: 7 (41%)``, from ``class_usage`` [E, C]; ``-`` for an expert that served nothing."""
    totals = class_usage.sum(dim=1)
    shares, classes = (class_usage / totals.clamp(min=1e-12).unsqueeze(1)).max(dim=1)
    return ", ".join(
        f"e{e}: {class_names[c]} ({share:.0%})" if total > 0 else f"e{e}: -"
        for e, (share, c, total) in enumerate(zip(shares.tolist(), classes.tolist(), totals.tolist()))
    )


def _assignment_plots(model, dataset, output: Path, device: str, count: int = 8) -> list:
    """For vision transformers: expert assignments drawn over the patches of the first ``count`` images."""
    config = getattr(model, "config", None)
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, MoEMLP)]
    if config is None or not layers or len(dataset) == 0:
        return []
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    with torch.no_grad():
        model(images.to(device))
    grid = config["img_size"] // config["patch_size"]
    return [
        write_patch_assignment_plot(
            images.cpu(),
            patch_assignments(layer, images.shape[0], grid).cpu(),
            layer.num_experts,
            output / f"assignments_{name.replace('.', '_')}.png",
            f"{name}: expert of each patch",
        )
        for name, layer in layers
    ]


def _consistency_plots(checkpoint: Path, output: Path) -> list:
    """routing_consistency.png when the training run (the output directory holding checkpoint/) recorded
    routing_consistency.json."""
    recorded = check_checkpoint_dir(checkpoint).parent / "routing_consistency.json"
    if not recorded.is_file():
        return []
    return [write_routing_consistency_plot(json.loads(recorded.read_text()), output / "routing_consistency.png")]


if __name__ == "__main__":
    sys.exit(main())
