"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans of the UCI optical-digits set), offline.

Fixed splits: the 1797 scans are permuted once with ``numpy.random.RandomState(SPLIT_SEED)`` (the legacy generator,
whose stream numpy keeps stable across versions and machines) and cut into 70 % train (1258), 10 % val (180) and
20 % test (359). ``digit_scenes`` draws its source digits from the same splits.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .factory import DATASETS, check_no_root, check_split
from .transforms import default_augmentation

SPLIT_SEED = 20240607
SPLITS = ("train", "val", "test")
TRAIN_FRACTION = 0.7
VAL_FRACTION = 0.1
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


@functools.lru_cache(maxsize=1)
def load_digit_scans() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scans as ``[1797, 8, 8]`` float32 intensities in [0, 1] (the raw 0..16 values / 16) and their
    labels ``[1797]`` int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    scans = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return scans, labels


def split_indices(split: str) -> torch.Tensor:
    """Indices into :func:`load_digit_scans` of the scans in ``split`` (train, val or test), disjoint by split."""
    check_split(split, SPLITS, "digits")
    count = load_digit_scans()[0].shape[0]
    order = np.random.RandomState(SPLIT_SEED).permutation(count)
    train_end = int(round(count * TRAIN_FRACTION))
    val_end = train_end + int(round(count * VAL_FRACTION))
    bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, count)}
    start, end = bounds[split]
    return torch.from_numpy(order[start:end].astype(np.int64))


def upsample(scans: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``[N, h, w]`` intensities to ``[N, size, size]``."""
    return F.interpolate(scans.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


@DATASETS.register("digits")
class DigitsDataset(Dataset):
    """Handwritten digits upsampled to ``image_size`` (bilinear), ``in_chans`` copies of the grey channel,
    normalised with the mean and standard deviation of the training split's pixels.

    Items are ``(image [in_chans, image_size, image_size] float32, label int in 0..9)``. ``augment=True`` adds a
    random shift (crop after padding) and no horizontal flip, since mirrored digits change meaning; ``transform``
    replaces it with any callable ``image -> image``."""

    def __init__(
        self,
        split: str,
        root: Optional[str] = None,
        image_size: int = 32,
        in_chans: int = 3,
        augment: bool = False,
        transform: Optional[Callable] = None,
    ):
        check_no_root(root, "digits")
        check_split(split, SPLITS, "digits")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 (the scans are 8x8), got {image_size}")
        if augment and transform is not None:
            raise ValueError("pass either augment=True or a transform, not both")
        scans, labels = load_digit_scans()
        train_pixels = upsample(scans[split_indices("train")], image_size)
        self.mean = float(train_pixels.mean())
        self.std = float(train_pixels.std())
        indices = split_indices(split)
        self.images = ((upsample(scans[indices], image_size) - self.mean) / self.std).unsqueeze(1)
        self.labels = labels[indices]
        self.source_indices = indices
        self.split = split
        self.image_size = image_size
        self.in_chans = in_chans
        self.classes = DIGIT_CLASSES
        self.num_classes = len(DIGIT_CLASSES)
        self.transform = default_augmentation(image_size, flip=False) if augment else transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].expand(self.in_chans, -1, -1).clone()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
