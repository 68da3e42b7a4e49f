"""Zero-shot object discovery from attention maps: maps to masks to boxes, scored against ground-truth boxes as
CorLoc (one object per image) and object recall and precision (several); connected components turn one mask into
several boxes (for a map with no slots, as a ViT's class-token attention).

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
        raise ValueError(
            f"maps must be a floating-point tensor [..., H, W], got {maps.dtype} of shape {tuple(maps.shape)}"
        )
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    return scaled.view_as(maps)


def mass_masks(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """DINO's attention threshold: each map [..., H, W] of non-negative weights keeps its largest values whose sum
    first reaches ``mass`` of the map's total (ties at the cut all kept) -> [..., H, W] bool. A map of zeros keeps
    nothing."""
    if maps.dim() < 2 or not maps.is_floating_point():
        raise ValueError(
            f"maps must be a floating-point tensor [..., H, W], got {maps.dtype} of shape {tuple(maps.shape)}"
        )
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if bool((maps < 0).any()):
        raise ValueError("maps must be non-negative weights (e.g. attention probabilities)")
    flat = maps.flatten(-2)
    ordered = flat.sort(dim=-1, descending=True).values
    before = ordered.cumsum(dim=-1) - ordered  # the mass of the values above each one
    # A value is kept while the mass above it is still short of the target; the last kept value is the cut.
    kept = before < mass * flat.sum(dim=-1, keepdim=True)
    cut = torch.where(kept, ordered, torch.inf).amin(dim=-1, keepdim=True)
    return ((flat >= cut) & (flat > 0)).view_as(maps)


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
        raise ValueError(
            f"{name} must be a floating-point tensor [*, 4] of (x0, y0, x1, y1), got {boxes.dtype} of "
            f"shape {tuple(boxes.shape)}"
        )


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


def _hits(
    predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor], iou_threshold: float
) -> list[torch.Tensor]:
    """Per image, [J, O] bool: whether predicted box j overlaps true box o with IoU >= iou_threshold."""
    if len(predicted_boxes) != len(true_boxes):
        raise ValueError(
            f"predicted_boxes and true_boxes must describe the same images, got {len(predicted_boxes)} "
            f"and {len(true_boxes)}"
        )
    if len(true_boxes) == 0:
        raise ValueError("true_boxes is empty: there are no images to score")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    return [box_iou(predicted, true) >= iou_threshold for predicted, true in zip(predicted_boxes, true_boxes)]


def corloc(
    predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor], iou_threshold: float = 0.5
) -> float:
    """Correct localisation: the fraction of images in which a predicted box overlaps some ground-truth box with
    IoU >= ``iou_threshold``.

    Args:
        predicted_boxes: per image, [J, 4] boxes. With one box per image (J = 1) this is the standard single-object
            CorLoc of object discovery; with several, an image counts when any of its boxes hits.
        true_boxes: per image, [O, 4] ground-truth boxes.
    """
    return sum(bool(hits.any()) for hits in _hits(predicted_boxes, true_boxes, iou_threshold)) / len(true_boxes)


def object_recall(
    predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor], iou_threshold: float = 0.5
) -> float:
    """Multi-object discovery: the fraction of all ground-truth boxes overlapped with IoU >= ``iou_threshold`` by
    some predicted box of their image (per image, predicted [J, 4] and true [O, 4] boxes). More predicted boxes can
    only raise it, so compare it between methods together with their number of boxes."""
    hits = _hits(predicted_boxes, true_boxes, iou_threshold)
    objects = sum(int(true.shape[0]) for true in true_boxes)
    if objects == 0:
        raise ValueError("true_boxes holds no boxes")
    return sum(int(image_hits.any(dim=0).sum()) for image_hits in hits) / objects


def object_precision(
    predicted_boxes: Sequence[torch.Tensor], true_boxes: Sequence[torch.Tensor], iou_threshold: float = 0.5
) -> float:
    """The fraction of all predicted boxes that overlap some ground-truth box of their image with IoU >=
    ``iou_threshold`` (per image, predicted [J, 4] and true [O, 4] boxes): the counterpart of
    :func:`object_recall`, which more boxes can only raise. Several boxes on one object all count as hits."""
    hits = _hits(predicted_boxes, true_boxes, iou_threshold)
    predicted = sum(int(boxes.shape[0]) for boxes in predicted_boxes)
    if predicted == 0:
        return 0.0  # no box, so none is right
    return sum(int(image_hits.any(dim=1).sum()) for image_hits in hits) / predicted


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of one mask [H, W] bool -> [H, W] int64: 0 off the mask, 1..K on it, numbered by
    decreasing area (ties by the component's first pixel in row-major order)."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [H, W], got {mask.dtype} of shape {tuple(mask.shape)}")
    height, width = mask.shape
    # Every pixel starts with its own id (row-major index + 1) and takes the largest id among its 4 neighbours on
    # the mask until nothing changes: each component ends with the id of its last pixel.
    ids = torch.where(mask, torch.arange(1, height * width + 1).view(height, width), 0)
    while True:
        padded = torch.nn.functional.pad(ids, (1, 1, 1, 1))
        neighbours = torch.stack(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        ).amax(dim=0)
        updated = torch.where(mask, neighbours, 0)
        if torch.equal(updated, ids):
            break
        ids = updated
    values, inverse, counts = torch.unique(ids[mask], return_inverse=True, return_counts=True)
    first = torch.full((len(values),), height * width, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, mask.flatten().nonzero().flatten(), reduce="amin")
    order = sorted(range(len(values)), key=lambda k: (-int(counts[k]), int(first[k])))
    rank = torch.empty(len(values), dtype=torch.int64)
    rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(1, len(values) + 1)
    labels = torch.zeros(height, width, dtype=torch.int64)
    labels[mask] = rank[inverse]
    return labels


def component_boxes(mask: torch.Tensor, max_boxes: int) -> torch.Tensor:
    """The boxes [J, 4] (J <= ``max_boxes``) of the largest 4-connected components of one mask [H, W] bool, largest
    first: several boxes from one map, to compare with a model that gives up to ``max_boxes`` maps."""
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    labels = connected_components(mask)
    count = min(int(labels.max()), max_boxes)
    components = labels[None] == torch.arange(1, count + 1)[:, None, None]
    return masks_to_boxes(components)


def positional_collapse(segments: torch.Tensor) -> float:
    """How much a model's slots are positions rather than objects: the share of all patches whose slot (the argmax
    slot there) is the slot most common at that position across the images. segments: [B, h, w] int, the argmax
    slot per patch of B images. Near 1: each position always goes to the same slot, whatever the image shows; a
    model whose slots follow objects placed at random scores near the most common slot's share instead."""
    if segments.dim() != 3 or segments.is_floating_point() or segments.dtype == torch.bool:
        raise ValueError(
            f"segments must be an integer tensor [B, h, w], got {segments.dtype} of shape {tuple(segments.shape)}"
        )
    if segments.shape[0] == 0:
        raise ValueError("segments holds no images")
    # torch.mode's tie-break is unspecified; count instead and take the smallest most-common slot.
    flat = segments.flatten(1).to(torch.int64)  # [B, P]
    values = flat - flat.min()
    counts = torch.zeros(int(values.max()) + 1, flat.shape[1], dtype=torch.int64)
    counts.scatter_add_(0, values, torch.ones_like(values))
    return float(counts.max(dim=0).values.sum()) / flat.numel()
