"""Object-discovery and segmentation metrics of visionmoe.metrics on hand-made cases, with the arithmetic."""

import math

import pytest
import torch

from visionmoe.metrics import (box_iou, corloc, label_map, masks_to_boxes, mean_iou, normalise_maps, object_recall,
                               segmentation_confusion, semantic_target)


def test_masks_to_boxes_tight_exclusive_boxes_and_empty_masks():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4 -> (x0, y0, x1, y1) = (2, 1, 5, 3)
    masks[1, 4, 0] = True  # one pixel at row 4, column 0 -> (0, 4, 1, 5)
    masks[1, 0, 5] = True  # and one at row 0, column 5: the box spans both -> (0, 0, 6, 5)
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, torch.tensor([[2.0, 1, 5, 3], [0, 0, 6, 5], [0, 0, 0, 0]]))


def test_masks_to_boxes_keeps_leading_dimensions():
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[1, 2, 3, 3] = True
    boxes = masks_to_boxes(masks)
    assert boxes.shape == (2, 3, 4)
    torch.testing.assert_close(boxes[1, 2], torch.tensor([3.0, 3, 4, 4]))
    assert boxes.abs().sum() == 4 * 2 + 3 + 3  # every other mask is empty


def test_masks_to_boxes_rejects_non_bool_masks():
    with pytest.raises(ValueError, match="masks"):
        masks_to_boxes(torch.zeros(4, 4))


def test_box_iou_hand_computed():
    boxes1 = torch.tensor([[0.0, 0, 4, 4], [0, 0, 0, 0]])
    boxes2 = torch.tensor([[2.0, 2, 6, 6], [0, 0, 4, 2], [10, 10, 12, 12]])
    iou = box_iou(boxes1, boxes2)
    # [0,4)^2 vs [2,6)^2: intersection 2*2 = 4, union 16 + 16 - 4 = 28.
    # [0,4)^2 vs [0,4)x[0,2): intersection 8, union 16 + 8 - 8 = 16 -> 0.5. Disjoint -> 0. Empty box -> 0.
    torch.testing.assert_close(iou, torch.tensor([[4 / 28, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_box_iou_of_two_empty_boxes_is_zero_not_nan():
    empty = torch.zeros(1, 4)
    assert box_iou(empty, empty).item() == 0.0


def test_box_iou_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(torch.zeros(1, 4), torch.zeros(1, 3))


def test_corloc_single_box_and_any_of_several():
    truth = [torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([[0.0, 0, 4, 4], [8, 8, 12, 12]]),
             torch.tensor([[0.0, 0, 4, 4]])]
    predicted = [
        torch.tensor([[0.0, 0, 4, 2]]),  # IoU 8 / 16 = 0.5 -> counts (>= 0.5)
        torch.tensor([[8.0, 8, 12, 13]]),  # with the second object: 16 / 20 = 0.8 -> counts
        torch.tensor([[2.0, 2, 6, 6]]),  # IoU 4 / 28 -> misses
    ]
    assert corloc(predicted, truth) == pytest.approx(2 / 3)
    assert corloc(predicted, truth, iou_threshold=0.6) == pytest.approx(1 / 3)  # only the 0.8 overlap is left
    # Several boxes per image: the third image now also has a hitting box among its two.
    predicted[2] = torch.tensor([[2.0, 2, 6, 6], [0, 0, 4, 4]])
    assert corloc(predicted, truth) == pytest.approx(1.0)


def test_object_recall_counts_objects_not_images():
    truth = [torch.tensor([[0.0, 0, 4, 4], [8, 8, 12, 12]]), torch.tensor([[0.0, 0, 2, 2]])]
    # Image 0: one box hits the first object only; image 1: no box at all. 1 of 3 objects found.
    predicted = [torch.tensor([[0.0, 0, 4, 4], [20.0, 20, 24, 24]]), torch.zeros(0, 4)]
    assert object_recall(predicted, truth) == pytest.approx(1 / 3)
    assert corloc(predicted, truth) == pytest.approx(1 / 2)


def test_corloc_checks_its_arguments():
    with pytest.raises(ValueError, match="same images"):
        corloc([torch.zeros(1, 4)], [])
    with pytest.raises(ValueError, match="iou_threshold"):
        corloc([torch.zeros(1, 4)], [torch.zeros(1, 4)], iou_threshold=0.0)


def test_normalise_maps_rescales_each_map_and_zeroes_constant_ones():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])
    # First map: (x - 1) / (5 - 1).
    torch.testing.assert_close(normalise_maps(maps), torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0, 0], [0, 0.0]]]))


def test_label_map_takes_the_largest_map_above_threshold():
    maps = torch.tensor([[[0.9, 0.2], [0.4, 0.6]],
                         [[0.1, 0.7], [0.3, 0.8]]])
    classes = torch.tensor([3, 5])
    # (0,0): map 0 wins with 0.9 -> 3 + 1; (0,1): map 1, 0.7 -> 5 + 1; (1,0): best 0.4 < 0.5 -> background;
    # (1,1): map 1, 0.8 -> 6.
    torch.testing.assert_close(label_map(maps, classes, threshold=0.5), torch.tensor([[4, 6], [0, 6]]))


def test_semantic_target_and_overlap_check():
    masks = torch.zeros(2, 2, 3, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 1, 1:] = True
    torch.testing.assert_close(semantic_target(masks, torch.tensor([0, 7])), torch.tensor([[1, 0, 0], [0, 8, 8]]))
    masks[1, 0, 0] = True
    with pytest.raises(ValueError, match="overlap"):
        semantic_target(masks, torch.tensor([0, 7]))


def test_mean_iou_hand_computed():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    predicted = torch.tensor([[0, 0, 0, 1], [0, 2, 1, 1]])
    confusion = segmentation_confusion(predicted, target, num_labels=4)
    # Rows true, columns predicted. Background: 3 right, 1 predicted as label 2; label 1: 3 right, 1 as background.
    expected = torch.tensor([[3, 0, 1, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(confusion, expected)
    miou, iou = mean_iou(confusion)
    # Background: TP 3, FP 1 (a label-1 pixel), FN 1 (the pixel predicted as 2) -> 3 / 5. Label 1: TP 3, FP 0,
    # FN 1 -> 3 / 4. Label 2: TP 0, FP 1 -> 0. Label 3 never occurs: NaN, left out. Mean (0.6 + 0.75 + 0) / 3.
    assert iou[:3].tolist() == pytest.approx([0.6, 0.75, 0.0])
    assert math.isnan(iou[3].item())
    assert miou == pytest.approx((0.6 + 0.75 + 0.0) / 3)


def test_segmentation_confusion_sums_over_images():
    target = torch.zeros(2, 2, 2, dtype=torch.int64)
    predicted = torch.zeros(2, 2, 2, dtype=torch.int64)
    predicted[1, 0, 0] = 1
    assert segmentation_confusion(predicted, target, 2).tolist() == [[7, 1], [0, 0]]


def test_segmentation_metrics_check_their_arguments():
    with pytest.raises(ValueError, match="predicted"):
        segmentation_confusion(torch.tensor([0, 5]), torch.tensor([0, 1]), num_labels=2)
    with pytest.raises(ValueError, match="one shape"):
        segmentation_confusion(torch.tensor([0]), torch.tensor([0, 1]), num_labels=2)
    with pytest.raises(ValueError, match="no pixels"):
        mean_iou(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="classes"):
        label_map(torch.zeros(2, 2, 2), torch.tensor([0.0, 1.0]), 0.5)
