"""Weakly supervised semantic segmentation from object maps: label maps, their confusion against the ground
truth, and mIoU; and instance segmentation by slots (each pixel's argmax slot) against instance masks, as FG-ARI
and mean best overlap.

Shape letters (README, "Shape letters"): S maps, O objects, L labels. Label maps hold 0 for the background
and c + 1 for class c.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch


def label_map(maps: torch.Tensor, classes: torch.Tensor, threshold: float) -> torch.Tensor:
    """A semantic label map from S object maps of one image: each pixel takes the class of the map that is largest
    there, when that value is >= ``threshold``, else the background.

    Args:
        maps: [S, H, W] float maps in [0, 1]. classes: [S] int, the class of each map.
    Returns:
        [H, W] int64: 0 for the background, classes[m] + 1 where map m wins.
    """
    if maps.dim() != 3 or not maps.is_floating_point():
        raise ValueError(
            f"maps must be a floating-point tensor [S, H, W], got {maps.dtype} of shape {tuple(maps.shape)}"
        )
    if classes.shape != maps.shape[:1] or classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(
            f"classes must be an integer tensor [S] with S = {maps.shape[0]}, got {classes.dtype} of "
            f"shape {tuple(classes.shape)}"
        )
    best, winner = maps.max(dim=0)
    return torch.where(best >= threshold, classes.to(torch.int64)[winner] + 1, 0)


def semantic_target(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ground-truth label map of an image from its object masks [O, H, W] bool and classes [O] int: [H, W]
    int64, 0 for the background, labels[o] + 1 on mask o (digit_scenes' masks never overlap)."""
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [O, H, W], got {masks.dtype} of shape {tuple(masks.shape)}")
    if labels.shape != masks.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor [O] with O = {masks.shape[0]}, got {labels.dtype} of "
            f"shape {tuple(labels.shape)}"
        )
    if bool((masks.sum(dim=0) > 1).any()):
        raise ValueError("masks overlap, so a pixel would have two classes")
    values = (labels.to(torch.int64) + 1)[:, None, None] * masks
    return values.sum(dim=0)


def segmentation_confusion(predicted: torch.Tensor, target: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Pixel counts [num_labels, num_labels] int64: entry [t, p] counts pixels of true label t predicted as p.
    ``predicted`` and ``target`` are label maps of one shape with values in [0, num_labels); sum the confusions of
    all images before :func:`mean_iou`."""
    if predicted.shape != target.shape:
        raise ValueError(
            f"predicted and target must have one shape, got {tuple(predicted.shape)} and {tuple(target.shape)}"
        )
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    for name, labels in (("predicted", predicted), ("target", target)):
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer label map, got {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(f"{name} must hold labels in [0, num_labels) = [0, {num_labels})")
    pairs = target.flatten().to(torch.int64) * num_labels + predicted.flatten().to(torch.int64)
    return torch.bincount(pairs, minlength=num_labels * num_labels).view(num_labels, num_labels)


def mean_iou(confusion: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """Mean intersection over union from a confusion matrix [L, L] (rows true, columns predicted).

    Returns:
        (mIoU, per-label IoU [L] float64). A label's IoU is TP / (TP + FP + FN) over all pixels; labels that occur
        in neither the target nor the prediction (an empty union) have IoU NaN and are left out of the mean.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square matrix [L, L], got shape {tuple(confusion.shape)}")
    confusion = confusion.to(torch.float64)
    true_positives = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positives
    iou = torch.where(union > 0, true_positives / union.clamp_min(1), math.nan)
    present = ~iou.isnan()
    if not bool(present.any()):
        raise ValueError("confusion counts no pixels")
    return float(iou[present].mean()), iou


def _check_instances(segments: torch.Tensor, masks: torch.Tensor) -> None:
    if segments.dim() != 2 or segments.is_floating_point() or segments.dtype == torch.bool:
        raise ValueError(
            f"segments must be an integer tensor [H, W], got {segments.dtype} of shape {tuple(segments.shape)}"
        )
    if masks.dim() != 3 or masks.dtype != torch.bool or masks.shape[1:] != segments.shape:
        raise ValueError(
            f"masks must be a bool tensor [O, H, W] with [H, W] = {tuple(segments.shape)}, got "
            f"{masks.dtype} of shape {tuple(masks.shape)}"
        )
    if bool((masks.sum(dim=0) > 1).any()):
        raise ValueError("masks overlap, so a pixel would belong to two objects")


def _pairs(counts: torch.Tensor) -> torch.Tensor:
    """n choose 2, elementwise, in float64."""
    counts = counts.to(torch.float64)
    return counts * (counts - 1) / 2


def foreground_ari(segments: torch.Tensor, masks: torch.Tensor) -> float:
    """FG-ARI of one image: the adjusted Rand index between a predicted segmentation and the true instances, over
    the foreground pixels only (those on some instance mask), as in slot-attention object discovery.

    Args:
        segments: [H, W] int, a segment id per pixel (e.g. the argmax slot). masks: [O, H, W] bool, disjoint
            instance masks.
    Returns:
        ARI in [-1, 1]: 1 when the segments split the foreground exactly as the instances (up to renaming),
        about 0 for a chance split. As scikit-learn, 1 when the index equals its maximum (e.g. one instance and
        one segment on it); one instance split among several segments gives 0. NaN for an empty foreground.
    """
    _check_instances(segments, masks)
    foreground = masks.any(dim=0)
    count = int(foreground.sum())
    if count == 0:
        return math.nan
    true = masks.to(torch.int64).argmax(dim=0)[foreground]
    _, predicted = torch.unique(segments[foreground], return_inverse=True)
    contingency = torch.zeros(int(true.max()) + 1, int(predicted.max()) + 1, dtype=torch.int64)
    contingency.index_put_((true, predicted), torch.ones_like(true), accumulate=True)
    index = float(_pairs(contingency).sum())
    true_pairs = float(_pairs(contingency.sum(dim=1)).sum())
    predicted_pairs = float(_pairs(contingency.sum(dim=0)).sum())
    expected = true_pairs * predicted_pairs / float(_pairs(torch.tensor(count)))
    maximum = (true_pairs + predicted_pairs) / 2
    if maximum == expected:
        return 1.0 if index == maximum else 0.0
    return (index - expected) / (maximum - expected)


def best_overlaps(segments: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """For each true instance of one image, the IoU of the predicted segment that overlaps it best: segments [H, W]
    int (a segment id per pixel, background pixels included), masks [O, H, W] bool -> [O] float64. Their mean over
    all instances of a test set is the mean best overlap (mBO)."""
    _check_instances(segments, masks)
    ids = torch.unique(segments)
    predicted = segments[None] == ids[:, None, None]  # [P, H, W]
    intersection = (predicted[:, None] & masks[None]).flatten(2).sum(dim=-1)  # [P, O]
    union = (predicted[:, None] | masks[None]).flatten(2).sum(dim=-1)
    return (intersection.to(torch.float64) / union.clamp_min(1)).amax(dim=0)
