"""Generic image folders, ``root/<class>/<image>``, read with Pillow."""

from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .factory import DATASETS, DataFileError
from .transforms import Normalize, default_augmentation

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BAD_IMAGE_POLICIES = ("error", "check", "skip")


@DATASETS.register("image_folder")
class ImageFolderDataset(Dataset):
    """Images under ``root/<split>/<class>/`` (or ``root/<class>/`` with ``split="all"``); classes are the
    sub-directory names in sorted order, labels their positions.

    Each image is converted to RGB (``in_chans=3``) or greyscale (``in_chans=1``), resized to ``image_size`` x
    ``image_size`` (bilinear), scaled to [0, 1] and normalised per channel with ``mean`` and ``std``.
    ``augment=True`` adds a random shift and horizontal flip; ``transform`` replaces it with any callable.

    ``bad_images`` says what an image that cannot be read does: "error" (the default) raises a
    :class:`~visionmoe.data.DataFileError` naming it when it is read; "check" reads every image here, once, and
    raises one naming the unreadable ones before any training starts; "skip" reads every image here and leaves the
    unreadable ones out, with a warning naming them. Checking costs one pass of decoding over the folder."""

    def __init__(
        self,
        split: str,
        root: Optional[str] = None,
        image_size: int = 32,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        augment: bool = False,
        transform: Optional[Callable] = None,
        bad_images: str = "error",
    ):
        if root is None:
            raise ValueError("image_folder needs root: a directory laid out as root/<split>/<class>/<image>")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if augment and transform is not None:
            raise ValueError("pass either augment=True or a transform, not both")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder root {root!r} is not a directory")
        directory = root if split == "all" else os.path.join(root, split)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"no split directory {directory!r}: expected root/<split>/<class>/<image>, or split='all' to read "
                f"root/<class>/<image>"
            )
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if not classes:
            raise ValueError(f"no class sub-directories in {directory!r}: expected {directory}/<class>/<image>")
        samples = []
        for label, name in enumerate(classes):
            class_dir = os.path.join(directory, name)
            files = sorted(
                entry.path
                for entry in os.scandir(class_dir)
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                raise ValueError(f"class directory {class_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            samples.extend((path, label) for path in files)
        self.split = split
        self.root = root
        self.classes = tuple(classes)
        self.num_classes = len(classes)
        self.image_size = image_size
        self.in_chans = in_chans
        self.samples = samples if bad_images == "error" else self._readable(samples, directory, bad_images)
        self.normalize = Normalize(mean, std)
        self.transform = default_augmentation(image_size, flip=True) if augment else transform

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str):
        """The image at ``path``, decoded, converted and resized, or a DataFileError naming it."""
        from PIL import Image

        try:
            with Image.open(path) as opened:
                picture = opened.convert("RGB" if self.in_chans == 3 else "L")
                return picture.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        # Pillow reports damaged files as OSError mostly, but some decoders raise SyntaxError or ValueError.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DataFileError(
                f"cannot read image {path!r}: {error} (the data set option bad_images='check' "
                f"finds every such image up front, 'skip' leaves them out)"
            ) from error

    def _readable(self, samples: List[Tuple[str, int]], directory: str, policy: str) -> List[Tuple[str, int]]:
        """``samples`` without the images that cannot be read: an error naming them for ``policy`` "check", a
        warning naming them for "skip"."""
        readable, bad = [], []
        for path, label in samples:
            try:
                self._read(path)
            except DataFileError as error:
                bad.append((path, error.__cause__))
                continue
            readable.append((path, label))
        if not bad:
            return samples
        named = "; ".join(f"{path!r} ({error})" for path, error in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if policy == "check" or not readable:
            raise DataFileError(f"{len(bad)} of {len(samples)} images in {directory!r} cannot be read: {named}")
        warnings.warn(
            f"skipping {len(bad)} of {len(samples)} images in {directory!r} that cannot be read: {named}", stacklevel=3
        )
        return readable

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        picture = self._read(path)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
        image = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels.unsqueeze(0)
        image = self.normalize(image.contiguous())
        if self.transform is not None:
            image = self.transform(image)
        return image, label
