"""Which router should I pick? Seed 004's comparison of routers in vision MoE at a scale anyone can run.

The same small V-MoE backbone (a 4-block ViT of width 64 on 32 px scenes, MoE MLPs with E=8 experts in blocks 1
and 3) is trained with every router visionmoe ships, plus the dense ViT, 3 seeds each, and every run reports:
test accuracy, training seconds per step, the dropped-assignment fraction and load balance (max / mean expert
load) on the test set, the routing consistency between adjacent epochs (the TGR-MoE metric; sparse routers only),
and expert-by-class specialisation (mutual information between a token's expert and its image's class, bits).

Equal compute: every expert has the dense MLP's hidden width F, and every capacity-based router gets the same
capacity factor (1.25), so the padded expert buffers, and with them the expert FLOPs, are the same for top-1
token choice, expert choice and their Sinkhorn and sparsity-constrained variants; Soft MoE gets as many slots per
image as those routers have capacity rows (1.25 x tokens). Top-2 and dropless top-1 differ, and the table gives
each router's expert FLOPs per token relative to the dense MLP.

Data: ``digit_scenes`` at 32 px with 1-3 handwritten digits of 10-16 px, labelled by the digit with the most ink.
Single digits on a blank canvas (``digits``) are solved near 97 % by every model, which leaves nothing to separate
routers; here the model must find the digits, compare them and read the largest, and the dense ViT stays well
below 100 % within the budget, so the routers have room to differ.

Runs go two at a time in worker processes with one torch thread each (the 2-core machine's fastest setting). The
step time is measured apart from them, after training: every model's training step (one thread, the batch's scene
generation included) timed in interleaved rounds and the median taken, so that a change of load on a shared
machine hits every model alike.

    python experiments/router_study.py                  # full: 3 seeds x 11 models, 40-60 min on 2 shared CPU cores
    python experiments/router_study.py --tiny --output-dir /tmp/routers     # seconds, every model once (CI)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tables import mean_and_spread, write_csv
from torch.utils.data import Subset

# What each model adds to the backbone, and its expert FLOPs per token relative to the dense MLP (capacity-based
# routers: the padded buffer's rows per token).
CAPACITY_FACTOR = 1.25
NUM_EXPERTS = 8
MODELS = {
    "dense ViT": dict(model="vit_tiny_32", moe=None, relative_flops=1.0),
    "top-1": dict(
        moe=dict(router="topk", k=1, capacity_factor=CAPACITY_FACTOR, capacity_multiple=1),
        relative_flops=CAPACITY_FACTOR,
    ),
    "top-2": dict(
        moe=dict(router="topk", k=2, capacity_factor=CAPACITY_FACTOR, capacity_multiple=1),
        relative_flops=2 * CAPACITY_FACTOR,
    ),
    "top-1 + BPR": dict(
        moe=dict(router="topk", k=1, capacity_factor=CAPACITY_FACTOR, capacity_multiple=1, batch_priority=True),
        relative_flops=CAPACITY_FACTOR,
    ),
    "dropless top-1": dict(moe=dict(router="topk", k=1, capacity_factor=None), relative_flops=1.0),
    "expert choice": dict(
        moe=dict(router="expert_choice", capacity_factor=CAPACITY_FACTOR), relative_flops=CAPACITY_FACTOR
    ),
    "Sinkhorn top-1": dict(
        moe=dict(router="sinkhorn_topk", k=1, capacity_factor=CAPACITY_FACTOR), relative_flops=CAPACITY_FACTOR
    ),
    "Sinkhorn expert choice": dict(
        moe=dict(router="sinkhorn_expert_choice", capacity_factor=CAPACITY_FACTOR), relative_flops=CAPACITY_FACTOR
    ),
    "sparse expert choice": dict(
        moe=dict(router="sparse_expert_choice", capacity_factor=CAPACITY_FACTOR), relative_flops=CAPACITY_FACTOR
    ),
    "Soft MoE": dict(
        model="softmoe_vit_tiny_32", moe=dict(capacity_factor=CAPACITY_FACTOR), relative_flops=CAPACITY_FACTOR
    ),
    # Hindsight selection runs every expert on every token and keeps the best: E times the dense FLOPs.
    "hindsight": dict(moe=dict(router="hindsight"), relative_flops=float(NUM_EXPERTS)),
}

ARCHITECTURE = dict(depth=4, embed_dim=64, num_heads=2, mlp_ratio=2.0, patch_size=4, in_chans=1)
MOE_BLOCKS = [1, 3]
DATA = dict(canvas_size=32, min_digits=1, max_digits=3, digit_size=[10, 16], in_chans=1, classes="same")

SETTINGS = {
    "full": dict(
        seeds=(0, 1, 2),
        epochs=8,
        train_images=2000,
        test_images=1000,
        batch_size=64,
        probe=128,
        workers=2,
        timing_rounds=3,
        timing_steps=8,
    ),
    "tiny": dict(
        seeds=(0,),
        epochs=2,
        train_images=32,
        test_images=16,
        batch_size=16,
        probe=8,
        workers=1,
        timing_rounds=1,
        timing_steps=2,
    ),
}


def config(setting: dict, name: str, seed: int, output_dir: Path):
    from visionmoe.train import config_from_dict

    spec = MODELS[name]
    model_options = dict(ARCHITECTURE)
    if spec["moe"] is not None:
        model_options.update(moe_blocks=MOE_BLOCKS, moe=dict(num_experts=NUM_EXPERTS, **spec["moe"]))
    sparse = spec["moe"] is not None and "model" not in spec
    return config_from_dict(
        dict(
            model=spec.get("model", "vmoe_tiny_32"),
            model_options=model_options,
            dataset="digit_scenes",
            dataset_options=dict(DATA, length=None),
            val_split="test",
            epochs=setting["epochs"],
            batch_size=setting["batch_size"],
            lr=3e-3,
            warmup_epochs=1.0,
            seed=seed,
            device="cpu",
            progress=False,
            tensorboard=False,
            output_dir=str(output_dir),
            consistency_probe=setting["probe"] if sparse else 0,
        )
    )


def datasets(setting: dict):
    from visionmoe.data import create_dataset

    train_set = create_dataset("digit_scenes", "train", **DATA, length=setting["train_images"])
    test_set = create_dataset("digit_scenes", "test", **DATA, length=setting["test_images"])
    return train_set, test_set


def run(setting: dict, name: str, seed: int, work_dir: str) -> dict:
    """One training run and its test-set report, in a worker process with one torch thread."""
    torch.set_num_threads(1)
    from visionmoe.evaluate.report import evaluate
    from visionmoe.metrics import expert_class_information
    from visionmoe.train import Trainer

    train_set, test_set = datasets(setting)
    run_dir = Path(work_dir) / f"{name.replace(' ', '_').replace('+', 'plus')}_seed{seed}"
    trainer = Trainer(config(setting, name, seed, run_dir), train_set, test_set)
    result = trainer.fit()
    train_seconds = sum(row["epoch_seconds"] for row in result.history)
    report = evaluate(trainer.model, test_set, train_set.num_classes, batch_size=setting["batch_size"])
    layers = report.layers
    row = dict(
        model=name,
        seed=seed,
        test_accuracy=report.accuracy,
        train_seconds=round(train_seconds, 1),
        relative_expert_flops=MODELS[name]["relative_flops"],
        dropped_fraction=statistics.fmean(layer.dropped_fraction for layer in layers) if layers else "",
        load_max_over_mean=(
            statistics.fmean(float(layer.load.max() / layer.load.mean()) for layer in layers) if layers else ""
        ),
        specialisation_bits=(
            statistics.fmean(
                expert_class_information(layer.class_usage) for layer in layers if layer.class_usage is not None
            )
            if any(layer.class_usage is not None for layer in layers)
            else ""
        ),
        adjacent_consistency="",
    )
    if trainer.consistency is not None:
        row["adjacent_consistency"] = trainer.consistency.summary()["adjacent"]
    return row


TIMING_WARMUP_STEPS = 2


def measure_step_times(names, setting: dict, work_dir: Path) -> dict:
    """Model name -> median training-step milliseconds: the models train in turn, ``timing_rounds`` times, each a
    fresh run of ``timing_steps`` steps after 2 warm-up steps; the median over every timed step of every round."""
    from visionmoe.train import Trainer

    torch.set_num_threads(1)
    train_set, test_set = datasets(setting)
    steps = setting["timing_steps"] + TIMING_WARMUP_STEPS
    # (Repeating scenes where the setting's training set is smaller than the timed steps need: only the time counts.)
    train_subset = Subset(train_set, [index % len(train_set) for index in range(steps * setting["batch_size"])])
    test_subset = Subset(test_set, range(min(len(test_set), setting["batch_size"])))
    times = {name: [] for name in names}
    for round_index in range(setting["timing_rounds"]):
        for name in names:
            stamps = []
            run_config = config(dict(setting, epochs=1, probe=0), name, 0, work_dir / f"timing_{round_index}")
            trainer = Trainer(
                run_config, train_subset, test_subset, step_callback=lambda _, step: stamps.append(time.perf_counter())
            )
            trainer.fit()
            durations = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
            times[name] += durations[TIMING_WARMUP_STEPS - 1 :]
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def summarise(rows):
    summary = []
    for name in MODELS:
        runs = [row for row in rows if row["model"] == name]
        if not runs:
            continue
        entry = dict(model=name, seeds=len(runs), relative_expert_flops=MODELS[name]["relative_flops"])
        for key in (
            "test_accuracy",
            "step_ms",
            "dropped_fraction",
            "load_max_over_mean",
            "specialisation_bits",
            "adjacent_consistency",
        ):
            values = [row[key] for row in runs if row[key] not in ("", None)]
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_and_spread(values) if values else ("", "")
        summary.append(entry)
    return summary


def cell(entry: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    mean, spread = entry[f"{key}_mean"], entry[f"{key}_std"]
    if mean == "":
        return "—"
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}"


def write_table(path: Path, summary, setting_name: str, setting: dict, command: str, minutes: float) -> None:
    lines = [
        f"# Routers on digit scenes ({setting_name} setting)",
        "",
        f"Command: `{command}`",
        "",
        (
            f"A 4-block ViT (width 64, 2 heads, 4 px patches of 32 px scenes with 1-3 digits, 65 tokens), MoE MLPs "
            f"with E={NUM_EXPERTS} in blocks {MOE_BLOCKS}, capacity factor {CAPACITY_FACTOR} where it applies; "
            f"{setting['epochs']} epochs on {setting['train_images']} training scenes, tested on "
            f"{setting['test_images']}; seeds {list(setting['seeds'])}; mean ± sample standard deviation over seeds. "
            f"Total {minutes:.1f} min, {setting['workers']} runs at a time with one thread each."
        ),
        "",
        (
            f"Step: median training step (batch {setting['batch_size']}, one thread) over interleaved timing rounds "
            "after training. "
            "Expert FLOPs: per token, relative to the dense MLP (capacity routers: padded rows). Dropped: fraction of "
            "assignments beyond capacity (test set, mean over MoE layers). Load: max / mean expert load. "
            "Specialisation: mutual information between a token's expert and its image's class (bits; at most "
            f"log2({NUM_EXPERTS}) = {math.log2(NUM_EXPERTS):.0f}). Consistency: fraction of probe tokens whose top-1 "
            "expert is unchanged between adjacent epochs."
        ),
        "",
        (
            "| model | test accuracy (%) | step (ms) | expert FLOPs | dropped (%) | load max/mean | specialisation "
            "(bits) | consistency |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary:
        lines.append(
            f"| {entry['model']} | {cell(entry, 'test_accuracy', 100)} | {cell(entry, 'step_ms', 1, 1)} "
            f"| {entry['relative_expert_flops']:.2f}x | {cell(entry, 'dropped_fraction', 100, 1)} "
            f"| {cell(entry, 'load_max_over_mean')} | {cell(entry, 'specialisation_bits')} "
            f"| {cell(entry, 'adjacent_consistency', 1, 3)} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    for entry in summary:
        axes.errorbar(
            entry["step_ms_mean"],
            100 * entry["test_accuracy_mean"],
            xerr=entry["step_ms_std"],
            yerr=100 * entry["test_accuracy_std"],
            fmt="o",
            capsize=3,
        )
        axes.annotate(
            entry["model"],
            (entry["step_ms_mean"], 100 * entry["test_accuracy_mean"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    axes.set_xlabel("training step (ms, one CPU thread)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Routers on digit scenes: accuracy vs cost (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of every model once (for CI)")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to train (default: all)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: the setting's)")
    parser.add_argument("--output-dir", default="results/routers", help="where the tables and the plot go")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="training runs' directories (default: runs/router_study, or <output-dir>/runs with --tiny)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    setting_name = "tiny" if args.tiny else "full"
    setting = dict(SETTINGS[setting_name])
    if args.seeds is not None:
        setting["seeds"] = tuple(args.seeds)
    output_dir = Path(args.output_dir)
    work_dir = Path(args.work_dir or (output_dir / "runs" if args.tiny else "runs/router_study"))
    output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "experiments/router_study.py", *argv])
    started = time.perf_counter()
    jobs = [(name, seed) for seed in setting["seeds"] for name in args.models]
    rows = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(setting["workers"], mp_context=context) as pool:
        futures = {pool.submit(run, setting, name, seed, str(work_dir)): (name, seed) for name, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows.append(row)
            print(
                f"{row['model']} seed {row['seed']}: accuracy {row['test_accuracy']:.4f} "
                f"({row['train_seconds']} s of training)",
                flush=True,
            )
    order = {(name, seed): index for index, (name, seed) in enumerate(jobs)}
    rows.sort(key=lambda row: order[(row["model"], row["seed"])])
    step_ms = measure_step_times(args.models, setting, work_dir)
    for row in rows:
        row["step_ms"] = step_ms[row["model"]]
    summary = summarise(rows)
    write_csv(output_dir / "runs.csv", rows)
    write_csv(output_dir / "summary.csv", summary)
    minutes = (time.perf_counter() - started) / 60
    write_table(output_dir / "table.md", summary, setting_name, setting, command, minutes)
    write_plot(output_dir / "accuracy_vs_step_time.png", summary)
    print((output_dir / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
