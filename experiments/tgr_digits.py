"""TGR-MoE at small scale (PAPERS.md section 4): V-MoE with and without teacher-guided routing on digits.

A dense ViT teacher is trained once; then, for each number of experts E and seed, a V-MoE student (top-1
routing, the same architecture, epochs and steps) is trained without and with TGR (the teacher router trained
jointly, distillation weight 5.0 for the whole run). Every student run records the routing consistency of a
fixed probe set (the first test images) after every epoch. The script writes to ``--output-dir``:

- ``runs.csv``: one row per student run (test accuracy, consistency summaries, seconds);
- ``summary.csv`` and ``table.md``: mean and sample standard deviation over seeds per (E, method), with the
  exact command that produced them;
- ``curves.csv``: per run and epoch, the adjacent-epoch and against-final agreement (mean over MoE layers).

Full setting (the committed table): 3 seeds x E in {8, 16, 32} x {V-MoE, TGR}, teacher 30 epochs, students 15
epochs on the 1258 training digits, a 4-block width-64 ViT (16 patches of 8 px + class token), MoE MLPs in
blocks 1 and 3. ``--ablation``: the full setting at E = 16 only, adding the paper's two variants (the
distillation for the first half of the steps only; the teacher router pre-trained for 2 epochs, then frozen).
``--small`` is a seconds-long smoke run (tiny subsets, one E, two seeds) for the tests.

    python experiments/tgr_digits.py                       # full: about 12 minutes on 2 shared CPU cores
    python experiments/tgr_digits.py --ablation --output-dir results/tgr/ablation     # about 8 minutes
    python experiments/tgr_digits.py --small --output-dir /tmp/tgr_small
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from tables import mean_and_spread, write_csv
from torch.utils.data import Subset

from visionmoe.train import Trainer, build_datasets, config_from_dict

# The student's and the teacher's architecture (vit_tiny_32 / vmoe_tiny_32 made smaller for 2 CPU cores).
ARCHITECTURE = dict(depth=4, embed_dim=64, num_heads=2, mlp_ratio=2.0, patch_size=8, num_classes=10)
MOE_BLOCKS = [1, 3]

# Each method's config keys: None trains without a teacher; a mapping trains with the teacher and these keys.
METHODS = {
    "V-MoE": None,
    "TGR": {},
    "TGR, first half": {"tgr_schedule": "first_half"},
    "TGR, pre-trained router": {"tgr_pretrain_epochs": 2},
}

SETTINGS = {
    "full": dict(
        experts=(8, 16, 32),
        seeds=(0, 1, 2),
        teacher_epochs=30,
        student_epochs=15,
        probe=128,
        train_images=None,
        test_images=None,
        batch_size=64,
        methods=("V-MoE", "TGR"),
    ),
    "small": dict(
        experts=(4,),
        seeds=(0, 1),
        teacher_epochs=1,
        student_epochs=2,
        probe=8,
        train_images=64,
        test_images=32,
        batch_size=32,
        methods=("V-MoE", "TGR"),
    ),
}
# The paper's ablations at E = 16 in the full setting: the distillation only for the first half of the steps,
# and the teacher router pre-trained (2 epochs) then frozen.
SETTINGS["ablation"] = dict(SETTINGS["full"], experts=(16,), methods=tuple(METHODS))


def base_config(setting: dict, output_dir: Path, **values):
    return config_from_dict(
        dict(
            dataset="digits",
            val_split="test",
            batch_size=setting["batch_size"],
            lr=3e-3,
            warmup_epochs=1.0,
            device="cpu",
            progress=False,
            tensorboard=False,
            output_dir=str(output_dir),
            **values,
        )
    )


def datasets(setting: dict):
    train_set, test_set = build_datasets(base_config(setting, Path(".")))
    if setting["train_images"] is not None:
        train_set = Subset(train_set, range(setting["train_images"]))
        test_set = Subset(test_set, range(setting["test_images"]))
    return train_set, test_set


def run_student(setting, data, work_dir: Path, num_experts: int, seed: int, method: str, teacher_dir: Path):
    config = base_config(
        setting,
        work_dir / f"E{num_experts}_{method.replace(', ', '_').replace(' ', '-')}_seed{seed}",
        model="vmoe_tiny_32",
        seed=seed,
        epochs=setting["student_epochs"],
        consistency_probe=setting["probe"],
        model_options=dict(ARCHITECTURE, moe_blocks=MOE_BLOCKS, moe=dict(num_experts=num_experts, k=1)),
        **({} if METHODS[method] is None else dict(METHODS[method], teacher=str(teacher_dir))),
    )
    started = time.perf_counter()
    trainer = Trainer(config, *data)
    result = trainer.fit()
    summary = trainer.consistency.summary()
    row = dict(
        experts=num_experts,
        method=method,
        seed=seed,
        test_accuracy=result.history[-1]["val_accuracy"],
        adjacent_consistency=summary["adjacent"],
        last_adjacent_consistency=summary["last_adjacent"],
        final_consistency=summary["final"],
        seconds=round(time.perf_counter() - started, 1),
    )
    curves = [
        dict(
            experts=num_experts,
            method=method,
            seed=seed,
            epoch=snapshot.epoch,
            adjacent="" if adjacent is None else adjacent["mean"],
            final=final["mean"],
        )
        for snapshot, adjacent, final in zip(
            trainer.consistency.snapshots, trainer.consistency.adjacent(), trainer.consistency.against_final()
        )
    ]
    return row, curves


def summarise(rows, methods):
    summary = []
    for num_experts in sorted({row["experts"] for row in rows}):
        for method in methods:
            runs = [row for row in rows if row["experts"] == num_experts and row["method"] == method]
            entry = dict(experts=num_experts, method=method, seeds=len(runs))
            for key in ("test_accuracy", "adjacent_consistency", "last_adjacent_consistency", "final_consistency"):
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_and_spread([row[key] for row in runs])
            summary.append(entry)
    return summary


def write_table(
    path: Path, summary, teacher_accuracy: float, setting_name: str, setting: dict, command: str, seconds: float
) -> None:
    lines = [
        f"# TGR-MoE vs V-MoE on digits ({setting_name} setting)",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Teacher (dense ViT, {setting['teacher_epochs']} epochs): test accuracy {100 * teacher_accuracy:.2f} %. "
            f"Students: {setting['student_epochs']} epochs, top-1 routing, seeds {list(setting['seeds'])}; "
            f"consistency on {setting['probe']} probe test images x 17 tokens, mean over the MoE layers. "
            f"Mean +- sample standard deviation over seeds. Total {seconds / 60:.1f} min."
        ),
        "",
        (
            "Adjacent: the fraction of probe tokens whose top-1 expert is the same after consecutive epochs, averaged "
            "over the pairs (1, 2) ... (T-1, T). Last adjacent: the pair (T-1, T). Vs final: the agreement of epochs "
            "1 ... T-1 with epoch T, averaged."
        ),
        "",
        "| E | method | test accuracy (%) | adjacent consistency | last adjacent | vs final |",
        "|---|---|---|---|---|---|",
    ]
    for entry in summary:
        lines.append(
            f"| {entry['experts']} | {entry['method']} "
            f"| {100 * entry['test_accuracy_mean']:.2f} +- {100 * entry['test_accuracy_std']:.2f} "
            f"| {entry['adjacent_consistency_mean']:.3f} +- {entry['adjacent_consistency_std']:.3f} "
            f"| {entry['last_adjacent_consistency_mean']:.3f} +- {entry['last_adjacent_consistency_std']:.3f} "
            f"| {entry['final_consistency_mean']:.3f} +- {entry['final_consistency_std']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a seconds-long smoke run (for CI)")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="E = 16 only, with the first-half schedule and the pre-trained router as well",
    )
    parser.add_argument("--output-dir", default="results/tgr", help="where the tables go")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="training runs' directories (default: runs/tgr_digits or, with --small, <output-dir>/runs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is fastest on shared cores (oversubscribed threads spin)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.small and args.ablation:
        parser.error("--small and --ablation are separate settings; pass one")
    setting_name = "small" if args.small else "ablation" if args.ablation else "full"
    setting = SETTINGS[setting_name]
    output_dir = Path(args.output_dir)
    work_dir = Path(args.work_dir or (output_dir / "runs" if args.small else f"runs/tgr_digits_{setting_name}"))
    output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "experiments/tgr_digits.py", *argv])
    started = time.perf_counter()
    data = datasets(setting)

    teacher_dir = work_dir / "teacher"
    teacher = Trainer(
        base_config(
            setting, teacher_dir, model="vit_tiny_32", model_options=ARCHITECTURE, epochs=setting["teacher_epochs"]
        ),
        *data,
    )
    teacher_accuracy = teacher.fit().history[-1]["val_accuracy"]
    print(f"teacher: test accuracy {teacher_accuracy:.4f}", flush=True)

    rows, curves = [], []
    for num_experts in setting["experts"]:
        for seed in setting["seeds"]:
            for method in setting["methods"]:
                row, run_curves = run_student(setting, data, work_dir, num_experts, seed, method, teacher_dir)
                rows.append(row)
                curves += run_curves
                print(
                    f"E={num_experts} seed={seed} {method}: accuracy {row['test_accuracy']:.4f}, adjacent "
                    f"consistency {row['adjacent_consistency']:.3f} ({row['seconds']} s)",
                    flush=True,
                )
    summary = summarise(rows, setting["methods"])
    write_csv(output_dir / "runs.csv", rows)
    write_csv(output_dir / "curves.csv", curves)
    write_csv(output_dir / "summary.csv", summary)
    write_table(
        output_dir / "table.md",
        summary,
        teacher_accuracy,
        setting_name,
        setting,
        command,
        time.perf_counter() - started,
    )
    print((output_dir / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
