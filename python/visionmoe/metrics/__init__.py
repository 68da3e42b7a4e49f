"""Reports on what a trained model does, as pure functions of tensors: which classes an MoE model's experts serve
and how often two routings agree (:mod:`.routing`), how well attention maps find objects (zero-shot object
discovery as CorLoc, object recall and precision, and how much slots collapse to positions, :mod:`.discovery`) and
segment them (weakly supervised segmentation as mIoU, instances as FG-ARI and mean best overlap,
:mod:`.segmentation`). The tracker that records a model's routing during training is
:class:`visionmoe.train.RoutingConsistencyTracker`.
"""

from .discovery import (
    box_iou,
    component_boxes,
    connected_components,
    corloc,
    masks_to_boxes,
    mass_masks,
    normalise_maps,
    object_precision,
    object_recall,
    positional_collapse,
)
from .routing import expert_class_information, expert_class_usage, routing_consistency
from .segmentation import best_overlaps, foreground_ari, label_map, mean_iou, segmentation_confusion, semantic_target

__all__ = [
    "best_overlaps",
    "box_iou",
    "component_boxes",
    "connected_components",
    "corloc",
    "expert_class_information",
    "expert_class_usage",
    "foreground_ari",
    "label_map",
    "mass_masks",
    "masks_to_boxes",
    "mean_iou",
    "normalise_maps",
    "object_precision",
    "object_recall",
    "positional_collapse",
    "routing_consistency",
    "segmentation_confusion",
    "semantic_target",
]
