"""Reports on what a trained model does, as pure functions of tensors: which classes an MoE model's experts serve
and how often two routings agree (:mod:`.routing`), how well attention maps find objects (zero-shot object
discovery as CorLoc, :mod:`.discovery`) and segment them (weakly supervised segmentation as mIoU,
:mod:`.segmentation`). The tracker that records a model's routing during training is
:class:`visionmoe.train.RoutingConsistencyTracker`.
"""

from .discovery import box_iou, corloc, masks_to_boxes, normalise_maps, object_recall
from .routing import expert_class_information, expert_class_usage, routing_consistency
from .segmentation import label_map, mean_iou, segmentation_confusion, semantic_target

__all__ = [
    "box_iou",
    "corloc",
    "expert_class_information",
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
