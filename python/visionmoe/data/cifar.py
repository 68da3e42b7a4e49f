"""CIFAR-10 and CIFAR-100 read from a local copy of the official python-format archives; never downloaded.

``root`` may be the archive itself (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read with tarfile
without extracting), a directory holding the archive or the extracted folder (``cifar-10-batches-py/``,
``cifar-100-python/``), or the extracted folder. The batches are pickles: only open archives you trust.
Splits are the official ``train`` (50000) and ``test`` (10000).
"""

from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .factory import DATASETS, check_split
from .transforms import Normalize, default_augmentation

SPLITS = ("train", "test")


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: bytes
    names_key: bytes
    # Channel statistics of the official training images, the values used throughout the literature.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{number}" for number in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        labels_key=b"labels",
        names_key=b"label_names",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        labels_key=b"fine_labels",
        names_key=b"fine_label_names",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _unpickle(data: bytes, where: str) -> dict:
    try:
        loaded = pickle.loads(data, encoding="bytes")
    except Exception as error:  # a truncated or foreign file can fail inside pickle in many ways
        raise ValueError(f"corrupt CIFAR file {where}: cannot unpickle it ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"corrupt CIFAR file {where}: expected a pickled dict, got {type(loaded).__name__}")
    return loaded


def _read_members(root: str, layout: CifarLayout, names: tuple[str, ...]) -> dict[str, dict]:
    """Unpickles ``layout.folder/<name>`` for every name from the archive or directory that ``root`` points to."""
    if not os.path.exists(root):
        raise FileNotFoundError(
            f"CIFAR root {root!r} does not exist; expected a directory containing {layout.folder}/ or {layout.archive}"
        )
    archive = root if os.path.isfile(root) else os.path.join(root, layout.archive)
    if os.path.isdir(root) and os.path.isdir(os.path.join(root, layout.folder)):
        folder = os.path.join(root, layout.folder)
    elif os.path.isdir(root) and os.path.basename(os.path.normpath(root)) == layout.folder:
        folder = root
    elif os.path.isfile(archive):
        return _read_archive(archive, layout, names)
    else:
        raise FileNotFoundError(
            f"no CIFAR data under {root!r}: expected {os.path.join(root, layout.folder, names[0])} "
            f"or the archive {os.path.join(root, layout.archive)}"
        )
    loaded = {}
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing CIFAR file {path}: expected {layout.folder}/{name}")
        with open(path, "rb") as handle:
            loaded[name] = _unpickle(handle.read(), path)
    return loaded


def _read_archive(archive: str, layout: CifarLayout, names: tuple[str, ...]) -> dict[str, dict]:
    contents: dict[str, Optional[bytes]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = set(tar.getnames())
            for name in names:
                member = f"{layout.folder}/{name}"
                handle = tar.extractfile(member) if member in members else None
                contents[name] = None if handle is None else handle.read()
    except (tarfile.TarError, EOFError, OSError) as error:  # how gzip and tar report truncated or foreign bytes
        raise ValueError(f"corrupt CIFAR archive {archive}: {error}") from error
    loaded = {}
    for name, data in contents.items():
        if data is None:
            raise FileNotFoundError(f"archive {archive} lacks {layout.folder}/{name}")
        loaded[name] = _unpickle(data, f"{archive}:{layout.folder}/{name}")
    return loaded


def _images_and_labels(batch: dict, layout: CifarLayout, where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or layout.labels_key not in batch:
        raise ValueError(f"corrupt CIFAR file {where}: expected the keys b'data' and {layout.labels_key!r}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[layout.labels_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"corrupt CIFAR file {where}: expected data [N, 3072] and N labels, got data {data.shape} and "
            f"{labels.shape[0]} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


class CifarDataset(Dataset):
    """Official CIFAR images ``[3, 32, 32]`` scaled to [0, 1] and normalised with the training-set channel
    statistics, with integer labels. ``augment=True`` adds the standard training augmentation (shift by up to 4
    pixels after zero padding, horizontal flip); ``transform`` replaces it with any callable ``image -> image``."""

    def __init__(
        self,
        variant: str,
        split: str,
        root: Optional[str],
        augment: bool = False,
        transform: Optional[Callable] = None,
    ):
        check_split(split, SPLITS, variant)
        if root is None:
            raise ValueError(
                f"{variant} needs root: a local copy of the official python-format archive (never downloaded)"
            )
        if augment and transform is not None:
            raise ValueError("pass either augment=True or a transform, not both")
        layout = LAYOUTS[variant]
        root = os.fspath(root)
        files = layout.train_files if split == "train" else layout.test_files
        loaded = _read_members(root, layout, files + (layout.meta_file,))
        images, labels = [], []
        for name in files:
            batch_images, batch_labels = _images_and_labels(loaded[name], layout, f"{root} ({layout.folder}/{name})")
            images.append(batch_images)
            labels.append(batch_labels)
        meta = loaded[layout.meta_file]
        if layout.names_key not in meta:
            raise ValueError(
                f"corrupt CIFAR file {layout.folder}/{layout.meta_file} in {root}: no {layout.names_key!r}"
            )
        self.classes = tuple(name.decode() if isinstance(name, bytes) else str(name) for name in meta[layout.names_key])
        self.num_classes = len(self.classes)
        self.images = torch.from_numpy(np.concatenate(images))
        self.labels = torch.from_numpy(np.concatenate(labels))
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes:
            raise ValueError(f"corrupt CIFAR data in {root}: labels outside 0..{self.num_classes - 1}")
        self.split = split
        self.image_size = 32
        self.in_chans = 3
        self.normalize = Normalize(layout.mean, layout.std)
        self.transform = default_augmentation(32, flip=True) if augment else transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.normalize(self.images[index].to(torch.float32) / 255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


@DATASETS.register("cifar10")
def cifar10(split: str, root: Optional[str] = None, **options) -> CifarDataset:
    """CIFAR-10 (10 classes) from ``root``; see :class:`CifarDataset`."""
    return CifarDataset("cifar10", split, root, **options)


@DATASETS.register("cifar100")
def cifar100(split: str, root: Optional[str] = None, **options) -> CifarDataset:
    """CIFAR-100 with its 100 fine labels from ``root``; see :class:`CifarDataset`."""
    return CifarDataset("cifar100", split, root, **options)
