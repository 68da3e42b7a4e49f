"""``visionmoe-train`` (also ``python -m visionmoe.train``): train a registry model from a YAML config with
command-line overrides.

Examples::

    visionmoe-train --model vmoe_tiny_32 --dataset digits --epochs 20 --output-dir runs/digits
    visionmoe-train --config run.yaml --set model_options.depth=6 --set aux_loss_weights.load=0.01
    visionmoe-train --resume runs/digits            # continues from runs/digits/checkpoint with its config,
                                                    # writing into runs/digits
    visionmoe-train --config run.yaml --teacher runs/dense_teacher --tgr-weight 5.0 --tgr-schedule first_half
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..data import DataFileError
from .checkpoint import CheckpointError, check_checkpoint_dir, load_checkpoint_config
from .config import config_from_dict, parse_override, read_config_file

# Flags that set the config key of the same name (--batch-size sets batch_size).
_CONFIG_FLAGS = (
    "model",
    "dataset",
    "data_root",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "seed",
    "output_dir",
    "device",
    "amp",
    "teacher",
    "tgr_weight",
    "tgr_schedule",
    "tgr_pretrain_epochs",
    "consistency_probe",
    "init_from",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionmoe-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config file (or the checkpoint's config with --resume) < flags < --set.",
    )
    parser.add_argument("--config", help="YAML file of config keys (see visionmoe.train.TrainConfig)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; dotted keys reach into mappings (model_options.depth=6); "
        "values are YAML scalars (repeatable)",
    )
    parser.add_argument("--model", help="model registry name (visionmoe.models.list_models())")
    parser.add_argument("--dataset", help="data set name for visionmoe.data.create_dataset")
    parser.add_argument("--data-root", help="directory of the data set's local files")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (bfloat16 autocast; float16 with a gradient scaler on CUDA devices without bfloat16)",
    )
    parser.add_argument(
        "--teacher", metavar="DIR", help="teacher-guided routing: checkpoint directory of a dense teacher (TGR-MoE)"
    )
    parser.add_argument("--tgr-weight", type=float, help="weight of the routing distillation loss (default 5.0)")
    parser.add_argument("--tgr-schedule", help="full, first_half or a fraction in (0, 1] of the steps (default full)")
    parser.add_argument(
        "--tgr-pretrain-epochs",
        type=int,
        help="pre-train the teacher router alone for this many epochs, then freeze it (default 0: joint training)",
    )
    parser.add_argument(
        "--consistency-probe",
        type=int,
        metavar="N",
        help="record routing consistency on the first N validation images every epoch",
    )
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        help="fine-tune: start from the model weights of this checkpoint (a head of another shape "
        "starts fresh); optimiser and schedule start afresh",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="checkpoint directory (or output directory holding checkpoint/) to continue from; "
        "the run writes into the directory holding the checkpoint unless an output "
        "directory is given",
    )
    return parser


def resume_output_dir(checkpoint: str | Path) -> Path:
    """Where a run resumed from ``checkpoint`` writes when no output directory is given: the directory holding the
    checkpoint, so that a copied checkpoint continues beside the copy rather than in the directory of the run it
    was copied from. Its checkpoints go to ``checkpoint/`` there, so a checkpoint under another name may not
    resume where that would overwrite a ``checkpoint/`` beside it."""
    checkpoint = check_checkpoint_dir(checkpoint)
    run_dir = checkpoint.parent
    target = run_dir / "checkpoint"
    if checkpoint != target and target.exists():
        raise ValueError(
            f"resuming {str(checkpoint)!r} would write its checkpoints over {str(target)!r}; give the "
            f"run an output directory with --output-dir"
        )
    return run_dir


def config_from_args(args: argparse.Namespace):
    """The run's config: the --config file (or, with --resume and no --config, the checkpoint's config), then the
    flags, then the --set overrides; with --resume and no output directory from any of them, the directory of
    :func:`resume_output_dir`."""
    if args.config is None and args.resume is not None:
        base = load_checkpoint_config(args.resume).to_dict()
        output_dir_given = False  # the saved one is where the checkpoint was written, maybe before a copy
    else:
        base = read_config_file(args.config)
        output_dir_given = "output_dir" in base
    for key in _CONFIG_FLAGS:
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    output_dir_given |= args.output_dir is not None
    output_dir_given |= any(parse_override(override)[0] == ["output_dir"] for override in args.overrides)
    if args.resume is not None and not output_dir_given:
        base["output_dir"] = str(resume_output_dir(args.resume))
    return config_from_dict(base, args.overrides)


def error_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error raised in a DataLoader worker process comes back with
    "Caught <Type> in DataLoader worker process N." and the worker's traceback as its message, whose last line is
    the original ``module.Type: message``; other messages have their lines joined."""
    message = str(error).strip()
    lines = message.splitlines()
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in message:
        return lines[-1].removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")
    return " ".join(message.split()) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``visionmoe-train``; returns 0 when training finished, 130 when Ctrl-C stopped it (after
    saving a checkpoint, unless a second Ctrl-C came first), 2 for a bad config, command line or checkpoint, 1 for
    a data file or checkpoint that fails during training. Errors are one line naming the key or file."""
    from .trainer import Trainer

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, TypeError, OSError, RuntimeError) as error:  # OSError: e.g. a data root that cannot be read
        parser.error(error_line(error))
    try:
        return _train(parser, trainer, args)
    finally:
        if trainer.owns_process_group:  # started from torchrun's environment: end it so each rank exits cleanly
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(parser: argparse.ArgumentParser, trainer, args: argparse.Namespace) -> int:
    if args.resume is not None and trainer.is_main:
        print(
            f"resuming step {trainer.global_step} from {args.resume}; writing logs and "
            f"checkpoints to {trainer.output_dir}"
        )
    try:
        result = trainer.fit()
    except (DataFileError, CheckpointError, OSError) as error:  # e.g. an unreadable image, a full disk
        parser.exit(1, f"{parser.prog}: error: {error_line(error)}\n")
    except KeyboardInterrupt:  # a second Ctrl-C; the trainer has said what it kept
        return 130
    if result.interrupted:
        return 130
    final = result.history[-1] if result.history else None
    if final is not None and trainer.is_main:
        print(f"done: val accuracy {final['val_accuracy']:.4f}; checkpoint in {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
