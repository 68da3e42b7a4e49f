"""A fair test of the What-Where Transformer's emergent object discovery (issue 17, PAPERS.md section 5): do WWT's
maps, as the model itself uses them, separate the instances of multi-digit scenes better than a ViT's class-token
attention, fixed tiles and the image's own ink, and how close do they come to a slot-attention model?

Data (visionmoe digit_scenes, 32 px canvas, 1-3 digits of 10-14 px, instance masks for every digit):
  (A) same-class scenes: one class per scene, 1-3 instances; single label, cross-entropy; scored by accuracy.
  (B) mixed scenes: multi-hot labels, binary cross-entropy; scored by mAP (macro average precision).
Models (width 64, depth 4, 2 heads, patch 4, so an 8 x 8 grid; 8 slots), trained from scratch with image-level
labels only: vit_tiny_32 (class token); slot_attention_32 (3 ViT blocks + Slot Attention, 8 slots, 3 iterations,
sampled slots, GRU; WWT w1's head); wwt_tiny_32 with the variants w0 (PAPERS.md as written), w1 (the head consumes
the maps), w2 (a full last block, maps = last where-state), w3 (slots sampled per image), w12 (w1 + w2).
Maps and their masks, per method:
  slot models   the model's own assignment (softmax over the slots, head mean); masks = argmax slot per patch.
                "wwt w0 (token softmax)" scores the earlier readout (softmax over the patches, rescaled, >= 0.5).
  ViT           class-token attention, last block: head mean rescaled >= 0.5; the best head (chosen by CorLoc on
                validation scenes) rescaled >= 0.5; head mean with DINO's 60 %-mass threshold.
  ink           the image's ink (intensity) pooled to the 8 x 8 grid, rescaled >= 0.5.
  tiles         8 fixed tiles of 4 x 2 patches (a slot per tile, whatever the image).
  untrained     the same models at initialisation.
Single-map methods (ViT, ink) get up to 8 segments as the 8 largest connected components of their mask (the rest
is background). Every map is upsampled to the image (slot masks: nearest; single maps: bilinear, then thresholded).
Metrics (visionmoe.metrics), on the test scenes, each for all scenes, 1-digit and >= 2-digit scenes:
  CorLoc     one box per image (as LOST): the box of the largest connected component of one mask: the slot with
             the largest logit for the predicted class (slot models) or the single map; hit when IoU >= 0.5 with
             any digit. Tiles have no single box.
  recall, precision   boxes of all non-empty slot masks (or components, at most 8) against the digits' boxes.
  FG-ARI, mBO   the argmax-slot (or component) segmentation against the instance masks: ARI on digit pixels;
             mean over digits of the best IoU of any segment (background segment included).
  mIoU (B)   background + 10 classes: a pixel is labelled where the image has ink (intensity > 0.25, read from the
             image, not the annotation) and its segment is not background, with its segment's class: the image's
             true classes' best by the segment's slot logits (the class of the ViT's best present logit for all
             its components).
  collapse   slot models and tiles: the share of patches whose argmax slot is that position's most common slot.
Runs below 90 % accuracy (A) / mAP (B) are flagged: their maps are scored but do not test the claim.

Usage:
    PYTHONPATH=python python experiments/whatwhere_discovery.py                  # the study, results/whatwhere
    PYTHONPATH=python python experiments/whatwhere_discovery.py --setting tiny --output-dir /tmp/wwt  # CI, seconds
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from visionmoe.data import create_dataset, digit_count_groups
from visionmoe.metrics import (
    best_overlaps,
    component_boxes,
    connected_components,
    corloc,
    foreground_ari,
    masks_to_boxes,
    mass_masks,
    mean_iou,
    normalise_maps,
    object_precision,
    object_recall,
    positional_collapse,
    segmentation_confusion,
    semantic_target,
)
from visionmoe.models import create_model

NUM_CLASSES = 10
ACCURACY_BAR = 0.9
INK_THRESHOLD = 0.25  # digit_scenes' mask threshold on intensities in [0, 1]
GROUPS = ("all", "1", ">=2")
WWT_VARIANT_NAMES = ("w0", "w1", "w2", "w3", "w12")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One experiment scale."""

    train_scenes: int
    val_scenes: int
    test_scenes: int
    steps: int
    batch_size: int
    lr: float
    model: Dict


_MODEL = dict(embed_dim=64, depth=4, num_heads=2, patch_size=4, num_classes=NUM_CLASSES)
SETTINGS = {
    # 20000 scenes (recombining the 1257 training scans) and 1500 steps: in pilots on 2 cores, a ViT reached 0.89
    # and WWT w1 0.88 accuracy on task A (4000 scenes: 0.85 and 0.82, overfitting the scans). About 4-5 minutes
    # per run on 2 quiet cores, so the whole study takes over an hour, not the 40 minutes aimed at.
    "full": Setting(
        train_scenes=20000, val_scenes=200, test_scenes=500, steps=1500, batch_size=64, lr=2e-3, model=_MODEL
    ),
    "tiny": Setting(
        train_scenes=32,
        val_scenes=8,
        test_scenes=12,
        steps=2,
        batch_size=8,
        lr=2e-3,
        model=dict(_MODEL, embed_dim=16, depth=2),
    ),
}
SCENES = dict(canvas_size=32, digit_size=(10, 14), min_digits=1, max_digits=3)
TASKS = {"A": dict(classes="same", label="primary"), "B": dict(classes="mixed", label="multi_hot")}


def load_scenes(task: str, split: str, length: int):
    scenes = create_dataset("digit_scenes", split, length=length, with_targets=True, **SCENES, **TASKS[task])
    images, targets = zip(*(scenes[i] for i in range(length)))
    key = "multi_hot" if TASKS[task]["label"] == "multi_hot" else "primary_label"
    labels = torch.stack([torch.as_tensor(t[key]) for t in targets])
    return torch.stack(images), labels, list(targets)


# ------------------------------------------------------------------------------------------------- models


def build(method: str, task: str, setting: Setting):
    """A model for a method name: "vit", "slot_attention", or "wwt_<variant>"."""
    pool = dict(head_pool="max") if task == "B" else {}
    if method == "vit":
        return create_model("vit_tiny_32", **setting.model)
    if method == "slot_attention":
        options = dict(setting.model, depth=setting.model["depth"] - 1, **pool)
        return create_model("slot_attention_32", **options)
    variant = method.split("_", 1)[1]
    uses_maps = variant in ("w1", "w12")
    return create_model(
        "wwt_tiny_32", slot_update="mean", variant=variant, **setting.model, **(pool if uses_maps else {})
    )


def train(model, images, labels, task: str, setting: Setting, seed: int) -> float:
    """AdamW (weight decay 0.05), linear warm-up over 10 % of the steps, cosine decay; returns seconds."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setting.lr, weight_decay=0.05)
    warmup = max(1, setting.steps // 10)
    started = time.perf_counter()
    model.train()
    for step in range(setting.steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / setting.steps))
        for group in optimizer.param_groups:
            group["lr"] = setting.lr * scale
        batch = torch.randint(0, len(images), (setting.batch_size,), generator=generator)
        logits = model(images[batch])
        if task == "A":
            loss = F.cross_entropy(logits, labels[batch])
        else:
            loss = F.binary_cross_entropy_with_logits(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return time.perf_counter() - started


def classification_score(logits, labels, task: str) -> float:
    """(A) accuracy; (B) mAP, the mean over classes present in the test set of the average precision."""
    if task == "A":
        return (logits.argmax(dim=-1) == labels).float().mean().item()
    precisions = []
    for c in range(labels.shape[1]):
        positives = labels[:, c] > 0
        if not bool(positives.any()):
            continue
        order = logits[:, c].argsort(descending=True)
        hits = positives[order].float()
        precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        precisions.append(float((precision_at * hits).sum() / hits.sum()))
    return sum(precisions) / len(precisions)


# --------------------------------------------------------------------------------------------------- maps


@dataclasses.dataclass
class Maps:
    """What a method gives for B test images (img px side, an h x h patch grid)."""

    logits: Optional[torch.Tensor]  # [B, C] or None (trivial maps)
    segments: torch.Tensor  # [B, img, img] int64 segment per pixel; single maps: 0 = background
    boxes: List[torch.Tensor]  # per image [J, 4]: non-empty slots' masks or components' boxes
    single: Optional[List[torch.Tensor]]  # per image [1, 4], or None
    grid: Optional[torch.Tensor]  # [B, h, h] argmax slot per patch, for the collapse score, or None
    segment_classes: Optional[List[Dict[int, int]]]  # per image {segment: class}, for mIoU; None: no classifier
    background_segment: Optional[int]  # the segment id that is background (single maps), else None


def present_best(logits_rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """For rows of logits [M, C], the class among the image's true classes (present [C] bool) with the largest."""
    return logits_rows.masked_fill(~present, -torch.inf).argmax(dim=-1)


def slot_maps(model, images, targets, readout: str = "assignment") -> Maps:
    """Maps of a slot model (WWT or slot attention) from its discover()."""
    torch.manual_seed(0)  # sampled slots: one fixed draw
    found = model.discover(images) if readout == "assignment" else model.discover(images, readout=readout)
    B, S, size, _ = found.masks.shape
    scale = size // found.segments.shape[-1]
    segments = found.segments.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    predicted = found.logits.argmax(dim=-1)
    boxes, single, classes = [], [], []
    for b in range(B):
        non_empty = found.masks[b].flatten(1).any(dim=1)
        boxes.append(found.boxes[b][non_empty])
        scores = found.slot_logits[b, :, predicted[b]].masked_fill(~non_empty, -torch.inf)
        single.append(component_boxes(found.masks[b, int(scores.argmax())], 1))
        present = targets[b]["multi_hot"] > 0
        best = present_best(found.slot_logits[b], present)
        classes.append({s: int(best[s]) for s in range(S)})
    return Maps(found.logits, segments, boxes, single, found.segments, classes, None)


def single_maps(grid_maps: torch.Tensor, logits, targets, max_segments: int, threshold: str) -> Maps:
    """Maps of methods with one map per image, grid_maps [B, h, h] >= 0: upsampled (bilinear) to the image,
    thresholded ("rescaled": rescaled to [0, 1], >= 0.5; "mass": DINO's 60 % of the mass), and split into up to
    ``max_segments`` connected components."""
    size = SCENES["canvas_size"]
    maps = F.interpolate(grid_maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    masks = mass_masks(maps.clamp_min(0), 0.6) if threshold == "mass" else normalise_maps(maps) >= 0.5
    segments, boxes, single, classes = [], [], [], []
    for b in range(len(maps)):
        components = connected_components(masks[b])
        components = torch.where(components <= max_segments, components, 0)
        segments.append(components)
        boxes.append(component_boxes(masks[b], max_segments) if masks[b].any() else torch.zeros(0, 4))
        single.append(boxes[-1][:1])
        if logits is not None:
            best = int(present_best(logits[b][None], targets[b]["multi_hot"] > 0)[0])
            classes.append(dict.fromkeys(range(1, max_segments + 1), best))
    return Maps(logits, torch.stack(segments), boxes, single, None, classes if logits is not None else None, 0)


def tile_maps(batch: int, size: int, side: int, slots: int) -> Maps:
    """Fixed tiles: ``slots`` tiles of the side x side patch grid (2 rows x slots / 2 columns of tiles)."""
    rows, cols = 2, slots // 2
    grid = (torch.arange(side)[:, None] * rows // side) * cols + torch.arange(side)[None, :] * cols // side
    grid = grid.expand(batch, -1, -1)
    scale = size // side
    segments = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    masks = segments[0][None] == torch.arange(slots)[:, None, None]
    tile_boxes = masks_to_boxes(masks)
    return Maps(None, segments, [tile_boxes] * batch, None, grid, None, None)


def vit_maps(model, images, targets, val_images, val_targets, which: str, max_segments: int) -> Maps:
    with torch.no_grad():
        logits = model(images)
        if which == "mean":
            return single_maps(model.class_token_attention(images), logits, targets, max_segments, "rescaled")
        if which == "mass":
            return single_maps(model.class_token_attention(images), logits, targets, max_segments, "mass")
        # The best head: the one with the highest CorLoc on the validation scenes.
        val_heads = model.class_token_attention(val_images, heads="all")
        scores = []
        for head in range(val_heads.shape[1]):
            found = single_maps(val_heads[:, head], None, val_targets, max_segments, "rescaled")
            scores.append(corloc(found.single, [t["boxes"] for t in val_targets]))
        head = max(range(len(scores)), key=scores.__getitem__)
        return single_maps(
            model.class_token_attention(images, heads="all")[:, head], logits, targets, max_segments, "rescaled"
        )


def ink_maps(images, targets, side: int, max_segments: int) -> Maps:
    ink = (images[:, 0] + 1) / 2  # intensities in [0, 1]
    pooled = F.adaptive_avg_pool2d(ink[:, None], side)[:, 0]
    return single_maps(pooled, None, targets, max_segments, "rescaled")


# ------------------------------------------------------------------------------------------------ metrics

METRICS = ("score", "corloc", "recall", "precision", "boxes", "fg_ari", "mbo", "miou", "collapse")


def score_maps(maps: Maps, images, labels, targets, task: str) -> Dict[str, Dict[str, float]]:
    """Every metric for each digit-count group."""
    results = {}
    ink = (images[:, 0] + 1) / 2 > INK_THRESHOLD
    for group, index in digit_count_groups(targets).items():
        index = index.tolist()
        if not index:
            continue
        chosen = [targets[i] for i in index]
        true_boxes = [t["boxes"] for t in chosen]
        boxes = [maps.boxes[i] for i in index]
        row = dict.fromkeys(METRICS, math.nan)
        if maps.logits is not None:
            row["score"] = classification_score(maps.logits[index], labels[index], task)
        if maps.single is not None:
            row["corloc"] = corloc([maps.single[i] for i in index], true_boxes)
        row["recall"] = object_recall(boxes, true_boxes)
        row["precision"] = object_precision(boxes, true_boxes)
        row["boxes"] = sum(len(b) for b in boxes) / len(boxes)
        row["fg_ari"] = statistics.mean(foreground_ari(maps.segments[i], targets[i]["masks"]) for i in index)
        row["mbo"] = float(torch.cat([best_overlaps(maps.segments[i], targets[i]["masks"]) for i in index]).mean())
        if task == "B" and maps.segment_classes is not None:
            confusion = 0
            for i in index:
                table = torch.zeros(int(maps.segments[i].max()) + 1, dtype=torch.int64)
                for segment, c in maps.segment_classes[i].items():
                    if segment < len(table):
                        table[segment] = c + 1
                if maps.background_segment is not None:
                    table[maps.background_segment] = 0
                predicted = torch.where(ink[i], table[maps.segments[i]], 0)
                confusion = confusion + segmentation_confusion(
                    predicted, semantic_target(targets[i]["masks"], targets[i]["labels"]), NUM_CLASSES + 1
                )
            row["miou"] = mean_iou(confusion)[0]
        if maps.grid is not None:
            row["collapse"] = positional_collapse(maps.grid[index])
        results[group] = row
    return results


# ------------------------------------------------------------------------------------------------- study


def run_study(args, setting: Setting, save) -> List[Dict]:
    """Trains and scores every run; ``save(rows)`` after each, so that a study cut short keeps its tables."""
    rows: List[Dict] = []
    size, side, slots = SCENES["canvas_size"], SCENES["canvas_size"] // setting.model["patch_size"], 8

    def record(task, method, seed, trained, seconds, maps, images, labels, targets):
        results = score_maps(maps, images, labels, targets, task)
        for group, values in results.items():
            rows.append(
                dict(
                    task=task,
                    method=method,
                    seed=seed,
                    trained=trained,
                    seconds=round(seconds, 1),
                    group=group,
                    **values,
                )
            )
        save(rows)
        shown = results[">=2"] if ">=2" in results else results["all"]
        print(
            f"[{task}] {method} seed {seed} {'trained' if trained else 'untrained'} ({seconds:.0f} s), >=2 digits: "
            + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if not math.isnan(v)),
            flush=True,
        )

    def evaluate(task, method, model, seed, trained, seconds, data):
        images, labels, targets, val_images, val_targets = data
        if method == "vit":
            for which in ("mean", "best head", "mass"):
                maps = vit_maps(
                    model,
                    images,
                    targets,
                    val_images,
                    val_targets,
                    {"mean": "mean", "best head": "best", "mass": "mass"}[which],
                    slots,
                )
                record(task, f"vit ({which})", seed, trained, seconds, maps, images, labels, targets)
            return
        record(task, method, seed, trained, seconds, slot_maps(model, images, targets), images, labels, targets)
        if method == "wwt_w0":
            record(
                task,
                "wwt_w0 (token softmax)",
                seed,
                trained,
                seconds,
                slot_maps(model, images, targets, "token_softmax"),
                images,
                labels,
                targets,
            )

    def val_fg_ari(model, val_images, val_targets, val_labels, task):
        """Selection score of a WWT variant on validation scenes: FG-ARI on >= 2 digits, if the run reaches the
        accuracy bar (else minus one plus its accuracy, so any run that reaches the bar wins)."""
        maps = slot_maps(model, val_images, val_targets)
        scores = score_maps(maps, val_images, val_labels, val_targets, task)
        if scores["all"]["score"] < ACCURACY_BAR:
            return scores["all"]["score"] - 1.0
        return scores.get(">=2", scores["all"])["fg_ari"]

    for task in args.tasks:
        train_images, train_labels, _ = load_scenes(task, "train", setting.train_scenes)
        val_images, val_labels, val_targets = load_scenes(task, "val", setting.val_scenes)
        images, labels, targets = load_scenes(task, "test", setting.test_scenes)
        data = (images, labels, targets, val_images, val_targets)
        record(task, "ink", 0, False, 0.0, ink_maps(images, targets, side, slots), images, labels, targets)
        record(task, "tiles", 0, False, 0.0, tile_maps(len(images), size, side, slots), images, labels, targets)

        def fit(method, seed):
            torch.manual_seed(seed)
            model = build(method, task, setting)
            if seed == args.seeds[0]:
                evaluate(task, method, model.eval(), seed, False, 0.0, data)
            seconds = train(model, train_images, train_labels, task, setting, seed)
            evaluate(task, method, model, seed, True, seconds, data)
            return model

        if task == "A":
            # The variants run at the first seed, so the best one has that seed already.
            selected_here = args.best_variant is None
            if selected_here:
                variants = {}
                for variant in args.variants:
                    method = f"wwt_{variant}"
                    variants[method] = val_fg_ari(fit(method, args.seeds[0]), val_images, val_targets, val_labels, task)
                args.best_variant = max(variants, key=variants.get)
                print(
                    f"best WWT variant on validation scenes (FG-ARI, >= 2 digits): {args.best_variant} {variants}",
                    flush=True,
                )
            for method in ("vit", "slot_attention"):
                for seed in args.seeds:
                    fit(method, seed)
            for seed in args.seeds[1:] if selected_here else args.seeds:
                fit(args.best_variant, seed)
        else:
            for method in ("vit", "slot_attention", args.best_variant):
                fit(method, args.seeds[0])
    return rows


# ------------------------------------------------------------------------------------------------ output


def write_results(
    rows: List[Dict], output_dir: Path, command: str, setting_name: str, setting: Setting, seconds: float, best: str
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "runs.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["task", "method", "seed", "trained", "seconds", "group", *METRICS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) and k in METRICS else v) for k, v in row.items()})
    lines = [
        f"# What-where discovery, a fair test ({setting_name} setting)",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Setting: {dataclasses.asdict(setting)}; scenes {SCENES}; {seconds / 60:.1f} min on "
            f"{torch.get_num_threads()} CPU threads. Best WWT variant (by validation FG-ARI on >= 2 digits among runs "
            f"reaching {ACCURACY_BAR:.0%}, or named by --best-variant): {best or 'not chosen yet'}."
        ),
        "",
        (
            "Mean ± standard deviation over seeds (per-seed rows in runs.csv); score: accuracy (A) or mAP (B); "
            "'below bar': a trained run under 90 %. Slot models' maps are the assignment (argmax slot per patch) "
            "unless marked 'token softmax'. Definitions in experiments/whatwhere_discovery.py."
        ),
    ]
    for task in ("A", "B"):
        task_rows = [row for row in rows if row["task"] == task]
        if not task_rows:
            continue
        title = {"A": "(A) same-class scenes, single label", "B": "(B) mixed scenes, multi-hot labels"}[task]
        for group in GROUPS:
            lines += [
                "",
                f"## {title}: {'all scenes' if group == 'all' else group + ' digits'}",
                "",
                "| method | trained | seeds | " + " | ".join(METRICS) + " |",
                "|---|---|---|" + "---|" * len(METRICS),
            ]
            keys = []
            for row in task_rows:
                key = (row["method"], row["trained"])
                if row["group"] == group and key not in keys:
                    keys.append(key)
            for method, trained in keys:
                chosen = [r for r in task_rows if (r["method"], r["trained"], r["group"]) == (method, trained, group)]
                cells = []
                for metric in METRICS:
                    values = [r[metric] for r in chosen if not math.isnan(r[metric])]
                    if not values:
                        cells.append("-")
                    elif len(values) > 1:
                        cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
                    else:
                        cells.append(f"{values[0]:.3f}")
                low = trained and any(r["score"] < ACCURACY_BAR for r in chosen if not math.isnan(r["score"]))
                state = ("yes" + (" (below bar)" if low else "")) if trained else "no"
                lines.append(f"| {method} | {state} | {len(chosen)} | " + " | ".join(cells) + " |")
    (output_dir / "table.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="full")
    parser.add_argument("--steps", type=int, help="override the setting's training steps")
    parser.add_argument("--train-scenes", type=int, help="override the setting's number of training scenes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=WWT_VARIANT_NAMES,
        default=list(WWT_VARIANT_NAMES),
        help="WWT variants trained at the first seed; the best is trained at every seed",
    )
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument(
        "--best-variant",
        choices=WWT_VARIANT_NAMES,
        help="skip the variant runs and use this WWT variant as the best (e.g. to run task B alone)",
    )
    parser.add_argument("--output-dir", default="results/whatwhere")
    args = parser.parse_args(argv)
    if "B" in args.tasks and "A" not in args.tasks and args.best_variant is None:
        parser.error("task B uses the best WWT variant of task A: run A too, or name it with --best-variant")
    best = None if args.best_variant is None else f"wwt_{args.best_variant}"
    args.best_variant = best
    setting = SETTINGS[args.setting]
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        setting = dataclasses.replace(setting, steps=args.steps)
    if args.train_scenes is not None:
        if args.train_scenes < 1:
            parser.error(f"--train-scenes must be >= 1, got {args.train_scenes}")
        setting = dataclasses.replace(setting, train_scenes=args.train_scenes)
    started = time.perf_counter()
    arguments = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=python python " + " ".join(
        shlex.quote(a) for a in ["experiments/whatwhere_discovery.py", *arguments]
    )

    def save(rows):
        write_results(
            rows,
            Path(args.output_dir),
            command,
            args.setting,
            setting,
            time.perf_counter() - started,
            args.best_variant,
        )

    save(run_study(args, setting, save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
