"""Data sets created by name: ``create_dataset("digits", "train")``."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS = Registry("dataset")


class DataFileError(ValueError):
    """A file of a data set that cannot be read (corrupt, truncated, not an image); the message names it."""


def create_dataset(name: str, split: str, root: Optional[str] = None, **options) -> Dataset:
    """Builds the data set registered as ``name`` for ``split``.

    Every data set yields ``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` and ``label`` an int, and
    has the attributes ``num_classes``, ``classes`` (names), ``image_size`` and ``in_chans``. ``root`` is the local
    directory or archive for data sets read from disk; ``options`` are the data set's keyword arguments."""
    return DATASETS.create(name, split=split, root=root, **options)


def list_datasets() -> list[str]:
    """Registered data set names, sorted."""
    return DATASETS.names()


def check_split(split: str, allowed: tuple[str, ...], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(allowed)} for {dataset}, got {split!r}")


def check_no_root(root: Optional[str], dataset: str) -> None:
    if root is not None:
        raise ValueError(f"{dataset} is generated from data bundled with scikit-learn and takes no root, got {root!r}")
