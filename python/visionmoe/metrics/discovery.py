"""Zero-shot object discovery from attention maps: maps to masks to boxes, scored against ground-truth boxes as
CorLoc (one object per image) and object recall (several).

Shape letters (README, "Shape letters"): S maps, O objects, J predicted boxes. Boxes are (x0, y0, x1, y1) in
pixels with x1 and y1 exclusive, as digit_scenes' ground truth; a mask's box is the tightest one around its pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch


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
    """Intersection over union of every pair: boxes1 [J, 4], boxes2 [O, 4] -> [J, O]. Pairs whose union is empty
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
    """Per image, [J, O] bool: whether predicted box j overlaps true box o with IoU >= iou_threshold."""
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
        predicted_boxes: per image, [J, 4] boxes. With one box per image (J = 1) this is the standard single-object
            CorLoc of object discovery; with several, an image counts when any of its boxes hits.
        true_boxes: per image, [O, 4] ground-truth boxes.
    """
    return sum(bool(hits.any()) for hits in _hits(predicted_boxes, true_boxes, iou_threshold)) / len(true_boxes)


def object_recall(predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor],
                  iou_threshold: float = 0.5) -> float:
    """Multi-object discovery: the fraction of all ground-truth boxes overlapped with IoU >= ``iou_threshold`` by
    some predicted box of their image (per image, predicted [J, 4] and true [O, 4] boxes). More predicted boxes can
    only raise it, so compare it between methods together with their number of boxes."""
    hits = _hits(predicted_boxes, true_boxes, iou_threshold)
    objects = sum(int(true.shape[0]) for true in true_boxes)
    if objects == 0:
        raise ValueError("true_boxes holds no boxes")
    return sum(int(image_hits.any(dim=0).sum()) for image_hits in hits) / objects
