"""Scenes of several real handwritten digits on a blank canvas, with exact boxes and per-object masks.

Each scene is generated on the fly from ``(seed, split, index)`` (no files): a numpy ``PCG64`` generator seeded with
that triple picks how many digits to place, which scans (only from the split's own scans of the fixed ``digits``
splits, so train and test scenes never share a handwritten digit), their sizes and non-overlapping positions.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .digits import DIGIT_CLASSES, SPLITS, load_digit_scans, split_indices, upsample
from .factory import DATASETS, check_no_root, check_split

DEFAULT_LENGTHS = {"train": 2000, "val": 200, "test": 500}
PLACEMENT_TRIES = 50

#: Which classes a scene's digits have. "mixed": each digit's scan is drawn from the whole split, so a scene mixes
#: classes. "same": one class is drawn per scene and every digit is a scan of that class (several instances, one
#: label).
SCENE_CLASSES = ("mixed", "same")

#: The image-level label of an item. "primary": the class of the largest digit (an int, for cross-entropy).
#: "multi_hot": a float32 [num_classes] vector with 1 for every class present (for binary cross-entropy).
SCENE_LABELS = ("primary", "multi_hot")

#: The digit-count groups :func:`digit_count_groups` splits scenes into: one digit, or several.
COUNT_GROUPS = ("1", ">=2")


@DATASETS.register("digit_scenes")
class DigitScenesDataset(Dataset):
    """``min_digits``..``max_digits`` digits, each a scan upsampled to a side drawn from ``digit_size`` (inclusive
    range), placed at random on a ``canvas_size`` square canvas so that their placement windows are at least one
    pixel apart (masks never overlap; a digit that finds no free spot with a non-empty mask after 50 tries is left
    out).

    Pixels are the digit intensity in [0, 1] on a 0 background, mapped to [-1, 1] by ``(x - 0.5) / 0.5``; ``in_chans``
    copies of the grey channel. An object's mask is its pixels with intensity above ``mask_threshold``; its box is the
    tightest box around the mask, ``(x0, y0, x1, y1)`` in pixels with ``x1`` and ``y1`` exclusive.

    ``classes`` (one of :data:`SCENE_CLASSES`) chooses mixed scenes or scenes of several instances of one class.

    Image-level labels for weakly supervised training: items are ``(image, label)`` where ``label`` (one of
    :data:`SCENE_LABELS`) is ``primary_label``, the class of the object with the largest mask (the first placed on
    a tie), or the ``multi_hot`` vector of the classes present; :meth:`targets` gives the full annotation, and
    ``with_targets=True`` makes items ``(image, targets)`` instead (batch those with :func:`collate_scenes`, since
    scenes hold different numbers of objects)."""

    def __init__(
        self,
        split: str,
        root: Optional[str] = None,
        seed: int = 0,
        length: Optional[int] = None,
        canvas_size: int = 64,
        min_digits: int = 2,
        max_digits: int = 4,
        digit_size: tuple[int, int] = (16, 24),
        mask_threshold: float = 0.25,
        in_chans: int = 3,
        with_targets: bool = False,
        classes: str = "mixed",
        label: str = "primary",
    ):
        check_no_root(root, "digit_scenes")
        check_split(split, SPLITS, "digit_scenes")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}"
            )
        smallest, largest = digit_size
        if not 8 <= smallest <= largest <= canvas_size:
            raise ValueError(
                f"digit_size must be a range (low, high) with 8 <= low <= high <= canvas_size={canvas_size}, "
                f"got {digit_size}"
            )
        if classes not in SCENE_CLASSES:
            raise ValueError(f"classes must be one of {SCENE_CLASSES}, got {classes!r}")
        if label not in SCENE_LABELS:
            raise ValueError(f"label must be one of {SCENE_LABELS}, got {label!r}")
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
        length = DEFAULT_LENGTHS[split] if length is None else length
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        self.split = split
        self.seed = seed
        self.length = length
        self.canvas_size = canvas_size
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.digit_size = (smallest, largest)
        self.mask_threshold = mask_threshold
        self.with_targets = with_targets
        self.scene_classes = classes
        self.label = label
        self.source_indices = split_indices(split)
        scan_labels = load_digit_scans()[1][self.source_indices]
        # The split's scans of each class, for scenes of one class.
        self.class_indices = [self.source_indices[scan_labels == c] for c in range(len(DIGIT_CLASSES))]
        self.image_size = canvas_size
        self.in_chans = in_chans
        self.classes = DIGIT_CLASSES
        self.num_classes = len(DIGIT_CLASSES)

    def __len__(self) -> int:
        return self.length

    def _scene(self, index: int) -> tuple[torch.Tensor, dict]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        rng = np.random.Generator(np.random.PCG64([self.seed, SPLITS.index(self.split), index]))
        scans, scan_labels = load_digit_scans()
        size = self.canvas_size
        canvas = torch.zeros(size, size)
        windows: list[tuple[int, int, int, int]] = []
        boxes, masks, labels, sources = [], [], [], []
        wanted = int(rng.integers(self.min_digits, self.max_digits + 1))
        pool = self.source_indices
        if self.scene_classes == "same":
            pool = self.class_indices[int(rng.integers(len(self.class_indices)))]
        for _ in range(wanted):
            for _ in range(PLACEMENT_TRIES):
                source = int(pool[int(rng.integers(len(pool)))])
                side = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
                top = int(rng.integers(0, size - side + 1))
                left = int(rng.integers(0, size - side + 1))
                window = (left, top, left + side, top + side)
                if not all(self._apart(window, other) for other in windows):
                    continue
                digit = upsample(scans[source : source + 1], side)[0].clamp(0.0, 1.0)
                digit_mask = digit > self.mask_threshold
                if bool(digit_mask.any()):  # a faint scan under a high threshold would give an empty mask
                    break
            else:
                continue
            windows.append(window)
            canvas[top : top + side, left : left + side] = digit
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[top : top + side, left : left + side] = digit_mask
            rows = digit_mask.any(dim=1).nonzero().flatten()
            cols = digit_mask.any(dim=0).nonzero().flatten()
            boxes.append([left + int(cols[0]), top + int(rows[0]), left + int(cols[-1]) + 1, top + int(rows[-1]) + 1])
            masks.append(mask)
            labels.append(int(scan_labels[source]))
            sources.append(source)
        if not labels:
            raise ValueError(
                f"scene {index}: no digit has pixels above mask_threshold={self.mask_threshold}; lower the threshold"
            )
        labels_tensor = torch.tensor(labels, dtype=torch.int64)
        masks_tensor = torch.stack(masks)
        areas = masks_tensor.flatten(1).sum(dim=1)
        multi_hot = torch.zeros(self.num_classes)
        multi_hot[labels_tensor] = 1.0
        targets = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "masks": masks_tensor,
            "labels": labels_tensor,
            "multi_hot": multi_hot,
            "primary_label": int(labels_tensor[int(torch.argmax(areas))]),
            "source_indices": torch.tensor(sources, dtype=torch.int64),
        }
        image = ((canvas - 0.5) / 0.5).expand(self.in_chans, -1, -1).clone()
        return image, targets

    @staticmethod
    def _apart(window: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
        """Whether two placement windows (x0, y0, x1, y1) leave at least one pixel between them."""
        return window[2] < other[0] or other[2] < window[0] or window[3] < other[1] or other[3] < window[1]

    def targets(self, index: int) -> dict:
        """Annotation of scene ``index``: ``boxes [K, 4]`` float32 (x0, y0, x1, y1; x1, y1 exclusive), ``masks
        [K, H, W]`` bool, ``labels [K]`` int64, ``multi_hot [num_classes]`` float32 (1 for every class present),
        ``primary_label`` int and ``source_indices [K]`` (indices of the scans used, see ``digits.split_indices``)."""
        return self._scene(index)[1]

    def __getitem__(self, index: int):
        image, targets = self._scene(index)
        if self.with_targets:
            return image, targets
        return image, targets["multi_hot"] if self.label == "multi_hot" else targets["primary_label"]


def digit_count_groups(targets: list[dict]) -> dict[str, torch.Tensor]:
    """Indices [n] int64 of the scenes in each digit-count group of :data:`COUNT_GROUPS` ("1": one digit, ">=2":
    several), and of all scenes under "all", for reporting every metric separately by digit count."""
    counts = torch.tensor([int(t["labels"].shape[0]) for t in targets], dtype=torch.int64)
    return {
        "all": torch.arange(len(counts)),
        "1": (counts == 1).nonzero().flatten(),
        ">=2": (counts >= 2).nonzero().flatten(),
    }


def collate_scenes(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """``DataLoader`` ``collate_fn`` for ``with_targets=True``: images stacked to ``[B, C, H, W]``, targets kept as a
    list of B dicts (their ``K`` differs from scene to scene)."""
    images = torch.stack([image for image, _ in batch])
    return images, [targets for _, targets in batch]
