"""Reports on what a trained model does: which classes an MoE model's experts serve, how often two routings
agree, and how well attention maps find objects (zero-shot object discovery as CorLoc, weakly supervised
segmentation as mIoU).

Shape letters: N images, E experts, M maps, K objects, P predicted boxes (object discovery).

Boxes are (x0, y0, x1, y1) in pixels with x1 and y1 exclusive, as digit_scenes' ground truth; a mask's box is the
tightest one around its pixels. Label maps hold 0 for the background and c + 1 for class c.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

__all__ = [
    "box_iou",
    "corloc",
    "expert_class_usage",
    "label_map",
    "masks_to_boxes",
    "mean_iou",
    "normalise_maps",
    "object_recall",
    "routing_consistency",
    "segmentation_confusion",
    "semantic_target",
]


def expert_class_usage(assignments: torch.Tensor, labels: torch.Tensor, num_experts: int,
                       num_classes: int) -> torch.Tensor:
    """Which classes each expert serves: the expert-specialisation table of Pavlitska et al. (PAPERS.md
    section 2; the paper's class-wise expert weight allocation).

    Args:
        assignments: either [N] integer, the expert each image went to (e.g. the argmax of the gate weights),
            giving counts; or [N, E] floating-point per-image expert weights (e.g. ``ConvMoE.last_gate_weights``
            of image gating, or location gating's weights averaged over H' x W'), giving the summed weight each
            class sends to each expert.
        labels: [N] integer class of each image, in [0, num_classes).
        num_experts: E. num_classes: the number of classes.

    Returns:
        [E, num_classes] float: ``usage[e, c]`` = number (or summed weight) of class-c images routed to expert e.
        Normalise rows to read an expert's class mix, columns to read how a class spreads over experts.
    """
    if num_experts < 1 or num_classes < 1:
        raise ValueError(f"num_experts and num_classes must be >= 1, got {num_experts} and {num_classes}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} "
                         f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if not isinstance(assignments, torch.Tensor):
        raise ValueError(f"assignments must be a tensor, got {type(assignments).__name__}")
    if assignments.shape[0] != labels.shape[0]:
        raise ValueError(f"assignments and labels must describe the same N images, got {assignments.shape[0]} "
                         f"and {labels.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes) = [0, {num_classes})")
    if assignments.is_floating_point():
        if assignments.dim() != 2 or assignments.shape[1] != num_experts:
            raise ValueError(f"floating-point assignments must have shape [N, E] with E = {num_experts}, got "
                             f"{tuple(assignments.shape)}")
        weights = assignments
    else:
        if assignments.dim() != 1 or assignments.dtype == torch.bool:
            raise ValueError(f"integer assignments must have shape [N], got {tuple(assignments.shape)} "
                             f"({assignments.dtype})")
        if assignments.numel() and (assignments.min() < 0 or assignments.max() >= num_experts):
            raise ValueError(f"assignments must lie in [0, num_experts) = [0, {num_experts})")
        weights = torch.nn.functional.one_hot(assignments, num_experts).to(torch.float32)
    class_one_hot = torch.nn.functional.one_hot(labels.to(weights.device), num_classes).to(weights.dtype)
    return weights.transpose(0, 1) @ class_one_hot


def routing_consistency(assign_a: torch.Tensor, assign_b: torch.Tensor) -> float:
    """The fraction of tokens whose top-1 expert is the same in two routings (TGR-MoE's routing consistency,
    PAPERS.md section 4): e.g. the same probe tokens at two epochs, or before and after fine-tuning.

    Args:
        assign_a, assign_b: integer tensors of the same shape (e.g. [T]), the top-1 expert of each token.

    Returns:
        a float in [0, 1].
    """
    for name, value in (("assign_a", assign_a), ("assign_b", assign_b)):
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of expert indices, got "
                             f"{getattr(value, 'dtype', type(value).__name__)}")
    if assign_a.shape != assign_b.shape:
        raise ValueError(f"assign_a and assign_b must describe the same tokens, got shapes {tuple(assign_a.shape)} "
                         f"and {tuple(assign_b.shape)}")
    if assign_a.numel() == 0:
        raise ValueError("assign_a and assign_b are empty: there are no tokens to compare")
    return (assign_a == assign_b.to(assign_a.device)).float().mean().item()


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., H, W] rescaled to [0, 1] by its own minimum and maximum (a constant map becomes all zeros), so
    that one threshold applies to maps of any scale, e.g. an attention distribution over the patches."""
    if maps.dim() < 2 or not maps.is_floating_point():
        raise ValueError(f"maps must be a floating-point tensor [..., H, W], got {maps.dtype} of shape "
                         f"{tuple(maps.shape)}")
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    return scaled.view_as(maps)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes around masks: [..., H, W] bool -> [..., 4] float32 (x0, y0, x1, y1; x1, y1 exclusive). An empty mask
    gives the empty box (0, 0, 0, 0), whose IoU with any box is 0."""
    if masks.dim() < 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [..., H, W], got {masks.dtype} of shape {tuple(masks.shape)}")
    height, width = masks.shape[-2:]
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)  # [..., H], [..., W]
    # argmax of a 0/1 vector is its first 1; on the flipped vector, the distance of the last 1 from the end.
    y0 = rows.to(torch.uint8).argmax(dim=-1)
    y1 = height - rows.flip(-1).to(torch.uint8).argmax(dim=-1)
    x0 = cols.to(torch.uint8).argmax(dim=-1)
    x1 = width - cols.flip(-1).to(torch.uint8).argmax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.float32)
    return torch.where(rows.any(dim=-1, keepdim=True), boxes, 0.0)


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [*, 4] of (x0, y0, x1, y1), got {boxes.dtype} of "
                         f"shape {tuple(boxes.shape)}")


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: boxes1 [P, 4], boxes2 [K, 4] -> [P, K]. Pairs whose union is empty
    (two empty boxes) have IoU 0."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")

    def area(boxes):
        return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)

    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection = (bottom_right - top_left).clamp_min(0).prod(dim=-1)
    union = area(boxes1)[:, None] + area(boxes2)[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp_min(torch.finfo(union.dtype).tiny), 0.0)


def _hits(predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor],
          iou_threshold: float) -> list[torch.Tensor]:
    """Per image, [P, K] bool: whether predicted box p overlaps true box k with IoU >= iou_threshold."""
    if len(predicted_boxes) != len(true_boxes):
        raise ValueError(f"predicted_boxes and true_boxes must describe the same images, got {len(predicted_boxes)} "
                         f"and {len(true_boxes)}")
    if len(true_boxes) == 0:
        raise ValueError("true_boxes is empty: there are no images to score")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    return [box_iou(predicted, true) >= iou_threshold for predicted, true in zip(predicted_boxes, true_boxes)]


def corloc(predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor],
           iou_threshold: float = 0.5) -> float:
    """Correct localisation: the fraction of images in which a predicted box overlaps some ground-truth box with
    IoU >= ``iou_threshold``.

    Args:
        predicted_boxes: per image, [P, 4] boxes. With one box per image (P = 1) this is the standard single-object
            CorLoc of object discovery; with several, an image counts when any of its boxes hits.
        true_boxes: per image, [K, 4] ground-truth boxes.
    """
    return sum(bool(hits.any()) for hits in _hits(predicted_boxes, true_boxes, iou_threshold)) / len(true_boxes)


def object_recall(predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor],
                  iou_threshold: float = 0.5) -> float:
    """Multi-object discovery: the fraction of all ground-truth boxes overlapped with IoU >= ``iou_threshold`` by
    some predicted box of their image (per image, predicted [P, 4] and true [K, 4] boxes). More predicted boxes can
    only raise it, so compare it between methods together with their number of boxes."""
    hits = _hits(predicted_boxes, true_boxes, iou_threshold)
    objects = sum(int(true.shape[0]) for true in true_boxes)
    if objects == 0:
        raise ValueError("true_boxes holds no boxes")
    return sum(int(image_hits.any(dim=0).sum()) for image_hits in hits) / objects


def label_map(maps: torch.Tensor, classes: torch.Tensor, threshold: float) -> torch.Tensor:
    """A semantic label map from M object maps of one image: each pixel takes the class of the map that is largest
    there, when that value is >= ``threshold``, else the background.

    Args:
        maps: [M, H, W] float maps in [0, 1]. classes: [M] int, the class of each map.
    Returns:
        [H, W] int64: 0 for the background, classes[m] + 1 where map m wins.
    """
    if maps.dim() != 3 or not maps.is_floating_point():
        raise ValueError(f"maps must be a floating-point tensor [M, H, W], got {maps.dtype} of shape "
                         f"{tuple(maps.shape)}")
    if classes.shape != maps.shape[:1] or classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(f"classes must be an integer tensor [M] with M = {maps.shape[0]}, got {classes.dtype} of "
                         f"shape {tuple(classes.shape)}")
    best, winner = maps.max(dim=0)
    return torch.where(best >= threshold, classes.to(torch.int64)[winner] + 1, 0)


def semantic_target(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ground-truth label map of an image from its object masks [K, H, W] bool and classes [K] int: [H, W]
    int64, 0 for the background, labels[k] + 1 on mask k (digit_scenes' masks never overlap)."""
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [K, H, W], got {masks.dtype} of shape {tuple(masks.shape)}")
    if labels.shape != masks.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor [K] with K = {masks.shape[0]}, got {labels.dtype} of "
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
