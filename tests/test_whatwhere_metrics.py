"""Object-discovery and segmentation metrics of visionmoe.metrics on hand-made cases, with the arithmetic."""

import math

import pytest
import torch

from visionmoe.metrics import (
    best_overlaps,
    box_iou,
    component_boxes,
    connected_components,
    corloc,
    foreground_ari,
    label_map,
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
    truth = [
        torch.tensor([[0.0, 0, 4, 4]]),
        torch.tensor([[0.0, 0, 4, 4], [8, 8, 12, 12]]),
        torch.tensor([[0.0, 0, 4, 4]]),
    ]
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
    maps = torch.tensor([[[0.9, 0.2], [0.4, 0.6]], [[0.1, 0.7], [0.3, 0.8]]])
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


def test_object_precision_counts_predicted_boxes_that_hit():
    true = [torch.tensor([[0.0, 0, 4, 4], [10, 10, 14, 14]]), torch.tensor([[0.0, 0, 8, 8]])]
    predicted = [
        # image 0: one exact hit, one box on nothing, one box on the second digit (IoU 16 / 16 = 1) -> 2 of 3 hit
        torch.tensor([[0.0, 0, 4, 4], [20, 20, 24, 24], [10, 10, 14, 14]]),
        # image 1: [0,4)^2 against [0,8)^2: IoU 16 / 64 = 0.25 < 0.5 -> 0 of 1
        torch.tensor([[0.0, 0, 4, 4]]),
    ]
    assert object_precision(predicted, true) == pytest.approx(2 / 4)
    assert object_recall(predicted, true) == pytest.approx(2 / 3)  # both digits of image 0, not image 1's
    # Two boxes on one digit both count as hits for precision (recall counts the digit once).
    assert object_precision([torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4]])], true[:1]) == 1.0
    # No predicted box at all: precision 0 (nothing right), not a division by zero.
    assert object_precision([torch.zeros(0, 4)], true[:1]) == 0.0


def test_connected_components_numbered_by_area():
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 0, 1], [1, 0, 1, 0, 0]], dtype=torch.bool)
    # Components (4-connected; (3, 0) and (3, 2) touch nothing): the top-left L and the right column, 3 pixels
    # each; the L's first pixel (0, 0) comes before the column's (0, 4), so the L is 1 and the column 2; then the
    # two single pixels in row-major order: (3, 0) -> 3, (3, 2) -> 4.
    expected = torch.tensor([[1, 1, 0, 0, 2], [0, 1, 0, 0, 2], [0, 0, 0, 0, 2], [3, 0, 4, 0, 0]])
    assert torch.equal(connected_components(mask), expected)
    # A diagonal neighbour is not 4-connected.
    diagonal = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    assert torch.equal(connected_components(diagonal), torch.tensor([[1, 0], [0, 2]]))
    assert torch.equal(connected_components(torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 3, dtype=torch.long))


def test_component_boxes_keeps_the_largest_components():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[0:2, 0:3] = True  # 6 pixels -> (0, 0, 3, 2)
    mask[4:6, 5:8] = True  # 6 pixels, later -> (5, 4, 8, 6)
    mask[0, 7] = True  # 1 pixel -> (7, 0, 8, 1)
    torch.testing.assert_close(component_boxes(mask, 2), torch.tensor([[0.0, 0, 3, 2], [5, 4, 8, 6]]))
    assert component_boxes(mask, 5).shape == (3, 4)
    assert component_boxes(torch.zeros(4, 4, dtype=torch.bool), 3).shape == (0, 4)
    with pytest.raises(ValueError, match="max_boxes"):
        component_boxes(mask, 0)


def test_positional_collapse_by_hand():
    # Three images of 1 x 2 patches. Position 0 holds slots 5, 5, 2 -> most common 5, 2 of 3 patches agree;
    # position 1 holds 1, 3, 1 -> most common 1, 2 of 3. Score (2 + 2) / 6.
    segments = torch.tensor([[[5, 1]], [[5, 3]], [[2, 1]]])
    assert positional_collapse(segments) == pytest.approx(4 / 6)
    # Slots that are fixed positions: every image has the same slot layout -> 1.
    assert positional_collapse(torch.tensor([[[0, 1], [2, 3]]]).repeat(4, 1, 1)) == 1.0
    # Two images of two slots that swap: each position holds each slot once (tie -> either counts once) -> 2 / 4.
    assert positional_collapse(torch.tensor([[[0, 1]], [[1, 0]]])) == 0.5
    with pytest.raises(ValueError, match="segments"):
        positional_collapse(torch.zeros(2, 2))


def test_foreground_ari_by_hand():
    masks = torch.zeros(2, 1, 6, dtype=torch.bool)
    masks[0, 0, 0:2] = True  # object 0: pixels 0, 1
    masks[1, 0, 3:5] = True  # object 1: pixels 3, 4; pixels 2 and 5 are background, ignored
    # A perfect split under other ids, whatever the background holds: ARI 1.
    assert foreground_ari(torch.tensor([[7, 7, 0, 3, 3, 7]]), masks) == 1.0
    # Everything in one segment: index = C(2,2) + C(2,2) = 2 pairs together in both; true pairs 1 + 1 = 2,
    # predicted pairs C(4,2) = 6, all pairs C(4,2) = 6: expected 2 * 6 / 6 = 2, maximum (2 + 6) / 2 = 4,
    # ARI (2 - 2) / (4 - 2) = 0.
    assert foreground_ari(torch.tensor([[1, 1, 1, 1, 1, 1]]), masks) == 0.0
    # Segments {0, 3} and {1, 4} (each mixes the two objects): contingency [[1, 1], [1, 1]]: index 0; true pairs 2,
    # predicted pairs 2, expected 2 * 2 / 6 = 2/3, maximum 2: ARI (0 - 2/3) / (2 - 2/3) = -0.5.
    assert foreground_ari(torch.tensor([[0, 1, 9, 0, 1, 9]]), masks) == pytest.approx(-0.5)
    # One object, one segment on it: the index is its maximum -> 1 (as scikit-learn); split in two -> 0.
    single = masks[:1]
    assert foreground_ari(torch.tensor([[4, 4, 0, 0, 0, 0]]), single) == 1.0
    assert foreground_ari(torch.tensor([[4, 5, 0, 0, 0, 0]]), single) == 0.0
    assert math.isnan(foreground_ari(torch.zeros(1, 6, dtype=torch.long), masks[:0]))
    with pytest.raises(ValueError, match="masks"):
        foreground_ari(torch.zeros(1, 6, dtype=torch.long), torch.ones(2, 1, 6, dtype=torch.bool))


def test_best_overlaps_by_hand():
    masks = torch.zeros(2, 1, 6, dtype=torch.bool)
    masks[0, 0, 0:2] = True  # object 0: pixels 0, 1
    masks[1, 0, 3:6] = True  # object 1: pixels 3, 4, 5
    segments = torch.tensor([[0, 0, 0, 1, 1, 2]])
    # Object 0: segment 0 = pixels {0, 1, 2}: IoU 2 / 3. Object 1: segment 1 = {3, 4}: IoU 2 / 3; segment 2 = {5}:
    # 1 / 3; segment 0: 0. Best: 2/3 each.
    torch.testing.assert_close(best_overlaps(segments, masks), torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(
        best_overlaps(torch.tensor([[0, 0, 1, 2, 2, 2]]), masks), torch.tensor([1.0, 1.0], dtype=torch.float64)
    )


def test_mass_masks_keep_the_top_sixty_percent_of_the_mass():
    maps = torch.tensor([[[0.4, 0.1], [0.3, 0.2]], [[0.25, 0.25], [0.25, 0.25]], [[0.0, 0.0], [0.0, 0.0]]])
    # Map 0, sorted 0.4, 0.3, 0.2, 0.1: mass above each 0, 0.4, 0.7, 0.9; kept while < 0.6 -> 0.4 and 0.3
    # (0.4 alone is short of 0.6, 0.4 + 0.3 = 0.7 reaches it).
    # Map 1: above 0, 0.25, 0.5, 0.75 -> three values kept, and the fourth ties at the cut, so all four.
    # Map 2: no mass, nothing kept.
    expected = torch.tensor(
        [[[True, False], [True, False]], [[True, True], [True, True]], [[False, False], [False, False]]]
    )
    assert torch.equal(mass_masks(maps, 0.6), expected)
    # Unnormalised maps: the same fractions of their own totals.
    assert torch.equal(mass_masks(10 * maps[:1], 0.6), expected[:1])
    assert torch.equal(mass_masks(maps[:1], 0.4), torch.tensor([[[True, False], [False, False]]]))
    with pytest.raises(ValueError, match="mass"):
        mass_masks(maps, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        mass_masks(-maps[:1] - 1, 0.6)
