"""torch Datasets over in-memory uint8 arrays, one per thing the stages iterate over."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .triggers import Reference, Trigger, apply_trigger


class ImagePairs(Dataset):
    """Two independent augmentations of each image (SimCLR, MIMIC distillation)."""

    def __init__(self, images: np.ndarray, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


class LabeledImages(Dataset):
    """Images with their labels, through one transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        if len(images) != len(labels):
            raise ValueError(f'{len(images)} images but {len(labels)} labels')
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class ShadowImages(Dataset):
    """BadEncoder's shadow set (docs/DESIGN.md §5.2).

    Item: (clean image (3, H, W), triggered copies (R, 3, H, W), augmented references (R, 3, H, W)):
    copy i carries trigger i (or trigger 0 when the file holds one patch) and goes with reference i.
    The un-augmented references are constant and are not repeated per item; the caller transforms
    them once.
    """

    def __init__(self, images: np.ndarray, trigger: Trigger, reference: Reference,
                 test_transform: Callable, reference_transform: Callable):
        self.images, self.trigger, self.reference = images, trigger, reference
        self.test_transform, self.reference_transform = test_transform, reference_transform
        self.reference_images = [Image.fromarray(r) for r in reference.x]

    def trigger_index(self, reference_index: int) -> int:
        return reference_index if len(self.trigger) > 1 else 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        clean = self.test_transform(Image.fromarray(image))
        triggered = torch.stack([
            self.test_transform(Image.fromarray(apply_trigger(image, self.trigger, self.trigger_index(i))))
            for i in range(len(self.reference))])
        augmented = torch.stack([self.reference_transform(r) for r in self.reference_images])
        return clean, triggered, augmented


def triggered_copy(images: np.ndarray, trigger: Trigger, index: int = 0) -> np.ndarray:
    """Every image with trigger `index` applied: the triggered test set of stage 3, docs/DESIGN.md §7 (uint8)."""
    return apply_trigger(images, trigger, index)
