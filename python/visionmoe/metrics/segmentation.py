"""Weakly supervised semantic segmentation from object maps: label maps, their confusion against the ground
truth, and mIoU.

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
        raise ValueError(f"maps must be a floating-point tensor [S, H, W], got {maps.dtype} of shape "
                         f"{tuple(maps.shape)}")
    if classes.shape != maps.shape[:1] or classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(f"classes must be an integer tensor [S] with S = {maps.shape[0]}, got {classes.dtype} of "
                         f"shape {tuple(classes.shape)}")
    best, winner = maps.max(dim=0)
    return torch.where(best >= threshold, classes.to(torch.int64)[winner] + 1, 0)


def semantic_target(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ground-truth label map of an image from its object masks [O, H, W] bool and classes [O] int: [H, W]
    int64, 0 for the background, labels[o] + 1 on mask o (digit_scenes' masks never overlap)."""
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [O, H, W], got {masks.dtype} of shape {tuple(masks.shape)}")
    if labels.shape != masks.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor [O] with O = {masks.shape[0]}, got {labels.dtype} of "
                         f"shape {tuple(labels.shape)}")
    if bool((masks.sum(dim=0) > 1).any()):
        raise ValueError("masks overlap, so a pixel would have two classes")
    values = (labels.to(torch.int64) + 1)[:, None, None] * masks
    return values.sum(dim=0)


def segmentation_confusion(predicted: torch.Tensor, target: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Pixel counts [num_labels, num_labels] int64: entry [t, p] counts pixels of true label t predicted as p.
    ``predicted`` and ``target`` are label maps of one shape with values in [0, num_labels); sum the confusions of
    all images before :func:`mean_iou`."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted and target must have one shape, got {tuple(predicted.shape)} and "
                         f"{tuple(target.shape)}")
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
