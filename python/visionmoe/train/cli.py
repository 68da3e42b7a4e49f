"""``visionmoe-train`` (also ``python -m visionmoe.train``): train a registry model from a YAML config with
command-line overrides.

Examples::

    visionmoe-train --model vmoe_tiny_32 --dataset digits --epochs 20 --output-dir runs/digits
    visionmoe-train --config run.yaml --set model_options.depth=6 --set aux_loss_weights.load=0.01
    visionmoe-train --resume runs/digits            # continues from runs/digits/checkpoint with its config
    visionmoe-train --config run.yaml --teacher runs/dense_teacher --tgr-weight 5.0 --tgr-schedule first_half
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .checkpoint import check_checkpoint_dir, load_checkpoint_config
from .config import config_from_dict, load_config

# Flags that set the config key of the same name (--batch-size sets batch_size).
_CONFIG_FLAGS = ("model", "dataset", "data_root", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                 "seed", "output_dir", "device", "amp", "teacher", "tgr_weight", "tgr_schedule",
                 "tgr_pretrain_epochs", "consistency_probe", "init_from")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionmoe-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config file (or the checkpoint's config with --resume) < flags < --set.")
    parser.add_argument("--config", help="YAML file of config keys (see visionmoe.train.TrainConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; dotted keys reach into mappings (model_options.depth=6); "
                             "values are YAML scalars (repeatable)")
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
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (bfloat16 autocast; float16 with a gradient scaler on CUDA devices "
                             "without bfloat16)")
    parser.add_argument("--teacher", metavar="DIR",
                        help="teacher-guided routing: checkpoint directory of a dense teacher (TGR-MoE)")
    parser.add_argument("--tgr-weight", type=float, help="weight of the routing distillation loss (default 5.0)")
    parser.add_argument("--tgr-schedule", help="full, first_half or a fraction in (0, 1] of the steps "
                                               "(default full)")
    parser.add_argument("--tgr-pretrain-epochs", type=int,
                        help="pre-train the teacher router alone for this many epochs, then freeze it "
                             "(default 0: joint training)")
    parser.add_argument("--consistency-probe", type=int, metavar="N",
                        help="record routing consistency on the first N validation images every epoch")
    parser.add_argument("--init-from", metavar="DIR",
                        help="fine-tune: start from the model weights of this checkpoint (a head of another shape "
                             "starts fresh); optimiser and schedule start afresh")
    parser.add_argument("--resume", metavar="DIR",
                        help="checkpoint directory (or output directory holding checkpoint/) to continue from")
    return parser


def config_from_args(args: argparse.Namespace):
    """The run's config: the --config file (or, with --resume and no --config, the checkpoint's config), then the
    flags, then the --set overrides."""
    if args.config is None and args.resume is not None:
        base = load_checkpoint_config(args.resume).to_dict()
    else:
        base = load_config(args.config).to_dict()
    for key in _CONFIG_FLAGS:
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    return config_from_dict(base, args.overrides)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``visionmoe-train``; returns 0 when training finished, 130 when Ctrl-C stopped it (after
    saving a checkpoint), 2 for a bad config or command line."""
    from .trainer import Trainer

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        if args.resume is not None:
            check_checkpoint_dir(args.resume)
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.error(str(error))
    result = trainer.fit()
    if result.interrupted:
        return 130
    final = result.history[-1] if result.history else None
    if final is not None:
        print(f"done: val accuracy {final['val_accuracy']:.4f}; checkpoint in {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
