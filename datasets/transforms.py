"""The image transforms of the pipeline, defined once (docs/DESIGN.md §4.1, §5.1).

PIL-based, as the original, applied per image in DataLoader workers. Images that need no
augmentation go through `normalize_batch` instead: one tensor operation per batch, on the device.
torchvision is imported when a PIL transform is built, not with this module: its import costs a stage process
seconds (models/resnet.py says why), and the tensor path never needs it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torchvision import transforms as T

from .tensor_augment import CROP_SCALE, to_float

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def _color_augmentation() -> list:
    from torchvision import transforms as T
    return [T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)]


def simclr_transform(normalization: Normalization, image_size: int = 32, crop_scale=CROP_SCALE) -> T.Compose:
    """SimCLR view: RandomResizedCrop (scale CROP_SCALE = 0.08-1 by default), flip, colour jitter (p 0.8),
    grayscale (p 0.2)."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(crop_scale)), *_color_augmentation(),
                      T.ToTensor(), T.Normalize(*normalization)])


def finetune_transform(normalization: Normalization) -> T.Compose:
    """BadEncoder's augmentation of the reference inputs: the SimCLR view without the crop."""
    from torchvision import transforms as T
    return T.Compose([*_color_augmentation(), T.ToTensor(), T.Normalize(*normalization)])


def test_transform(normalization: Normalization) -> T.Compose:
    from torchvision import transforms as T
    return T.Compose([T.ToTensor(), T.Normalize(*normalization)])


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
