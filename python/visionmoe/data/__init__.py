"""Data sets that work offline, and torch-only augmentations.

``create_dataset(name, split, root=None, **options)`` builds one of :func:`list_datasets`:

- ``"digits"``: scikit-learn's bundled handwritten digits at 32x32, fixed train/val/test splits;
- ``"digit_scenes"``: several of those digits on a canvas with boxes and masks, generated from a seed;
- ``"cifar10"`` / ``"cifar100"``: a local copy of the official python-format archives (``root``);
- ``"image_folder"``: ``root/<split>/<class>/<image>`` read with Pillow.

Items are ``(image [C, H, W] float32, label int)``; data sets carry ``num_classes``, ``classes``, ``image_size`` and
``in_chans``.
"""

from . import cifar, digit_scenes, digits, image_folder, transforms
from .cifar import CifarDataset
from .digit_scenes import (
    COUNT_GROUPS,
    SCENE_CLASSES,
    SCENE_LABELS,
    DigitScenesDataset,
    collate_scenes,
    digit_count_groups,
)
from .digits import DigitsDataset
from .factory import DATASETS, DataFileError, create_dataset, list_datasets
from .image_folder import ImageFolderDataset
from .transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, default_augmentation

__all__ = [
    "COUNT_GROUPS",
    "DATASETS",
    "CifarDataset",
    "Compose",
    "DataFileError",
    "DigitScenesDataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "SCENE_CLASSES",
    "SCENE_LABELS",
    "cifar",
    "collate_scenes",
    "create_dataset",
    "default_augmentation",
    "digit_count_groups",
    "digit_scenes",
    "digits",
    "image_folder",
    "list_datasets",
    "transforms",
]
