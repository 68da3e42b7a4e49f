"""Image augmentations written with torch operations (torchvision is not a dependency).

Every transform maps an image tensor ``[C, H, W]`` to a tensor of the same layout and takes an optional
``torch.Generator``: with one, the result depends only on the generator's state; without one, torch's global random
state is used (which a training checkpoint saves and restores, so single-process data loading stays reproducible).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor [C, H, W], got {shape}")


class Compose:
    """Applies transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for transform in self.transforms:
            image = transform(image, generator=generator)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomCrop:
    """Pads each side by ``padding`` pixels with ``fill`` and crops a random ``size`` x ``size`` window.

    ``image [C, H, W] -> [C, size, size]``. ``size`` defaults to the input size (the classic CIFAR shift
    augmentation)."""

    def __init__(self, size: Optional[int] = None, padding: int = 4, fill: float = 0.0):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if size is not None and size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.padding = padding
        self.fill = fill

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_image(image)
        size_h = size_w = self.size
        if self.size is None:
            size_h, size_w = image.shape[1], image.shape[2]
        pad = self.padding
        padded = F.pad(image, (pad, pad, pad, pad), value=self.fill) if pad else image
        height, width = padded.shape[1], padded.shape[2]
        if size_h > height or size_w > width:
            raise ValueError(f"crop size {self.size} exceeds the padded image size {height}x{width}")
        top = int(torch.randint(0, height - size_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size_w + 1, (1,), generator=generator))
        return padded[:, top : top + size_h, left : left + size_w]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, fill={self.fill})"


class RandomHorizontalFlip:
    """Mirrors the image left-right with probability ``p``.

    Not used for digits by default: a mirrored 2, 3, 4, 5, 7 or 9 is no longer that digit."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_image(image)
        if float(torch.rand((), generator=generator)) < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """Per-channel ``(image - mean) / std``; ``mean`` and ``std`` have one value per channel (or one for all)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.mean.numel() != self.std.numel():
            raise ValueError(f"mean and std must have the same length, got {self.mean.numel()} and {self.std.numel()}")
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {std}")

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_image(image)
        channels = self.mean.numel()
        if channels != 1 and channels != image.shape[0]:
            raise ValueError(f"Normalize has {channels} channel statistics but the image has {image.shape[0]} channels")
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def default_augmentation(image_size: int, flip: bool) -> Compose:
    """The training augmentation the data sets use with ``augment=True``: a random shift of up to one eighth of
    the image (crop after padding), plus a horizontal flip where mirroring keeps the class (``flip``)."""
    transforms: list = [RandomCrop(image_size, padding=max(1, image_size // 8))]
    if flip:
        transforms.append(RandomHorizontalFlip())
    return Compose(transforms)
