"""The image transforms of the pipeline, defined once (docs/DESIGN.md §4.1, §5.1).

PIL-based, as the original, applied per image in DataLoader workers. Images that need no
augmentation go through `normalize_batch` instead: one tensor operation per batch, on the device.
torchvision is imported when a PIL transform is first applied, not when it is made: its import costs a process
seconds (models/resnet.py says why), and a stage on the tensor path never applies one.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from torchvision import transforms as T

from .tensor_augment import CROP_SCALE, to_float

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


class PILTransform:
    """A torchvision transform pipeline, built the first time it is applied (or its `.transforms` read).

    Every stage makes its PIL transforms whichever path it takes; on the tensor path they are never applied,
    so the process never imports torchvision. `build` is a picklable callable returning the `T.Compose`."""

    def __init__(self, build: Callable[[], T.Compose]):
        self.build, self._compose = build, None

    @property
    def compose(self) -> T.Compose:
        if self._compose is None:
            self._compose = self.build()
        return self._compose

    @property
    def transforms(self) -> list:
        return self.compose.transforms

    def __call__(self, image):
        return self.compose(image)


def _color_augmentation() -> list:
    from torchvision import transforms as T
    return [T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)]


def _simclr_compose(normalization: Normalization, image_size: int, crop_scale: tuple[float, float]) -> T.Compose:
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(image_size, scale=crop_scale), *_color_augmentation(),
                      T.ToTensor(), T.Normalize(*normalization)])


def _finetune_compose(normalization: Normalization) -> T.Compose:
    from torchvision import transforms as T
    return T.Compose([*_color_augmentation(), T.ToTensor(), T.Normalize(*normalization)])


def _test_compose(normalization: Normalization) -> T.Compose:
    from torchvision import transforms as T
    return T.Compose([T.ToTensor(), T.Normalize(*normalization)])


def simclr_transform(normalization: Normalization, image_size: int = 32, crop_scale=CROP_SCALE) -> PILTransform:
    """SimCLR view: RandomResizedCrop (scale CROP_SCALE = 0.08-1 by default), flip, colour jitter (p 0.8),
    grayscale (p 0.2)."""
    return PILTransform(functools.partial(_simclr_compose, normalization, image_size, tuple(crop_scale)))


def finetune_transform(normalization: Normalization) -> PILTransform:
    """BadEncoder's augmentation of the reference inputs: the SimCLR view without the crop."""
    return PILTransform(functools.partial(_finetune_compose, normalization))


def test_transform(normalization: Normalization) -> PILTransform:
    return PILTransform(functools.partial(_test_compose, normalization))


def normalize_batch(images: torch.Tensor | np.ndarray, normalization: Normalization,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W): `test_transform` for a whole batch.

    Computes (x / 255 − mean) / std, the same arithmetic as ToTensor + Normalize.
    """
    images = torch.as_tensor(images)
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = to_float(images)  # (B, 3, H, W), contiguous on the CPU (see tensor_augment.model_layout)
    mean = torch.tensor(normalization[0], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(normalization[1], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


test_transform.__test__ = False  # a transform, not a pytest test, wherever it is imported
