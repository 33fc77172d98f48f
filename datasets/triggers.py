"""Trigger and reference files (SPEC §2.2, §2.3).

A trigger file holds patches `t` (K, H, W, 3) float and masks `tm` (K, H, W, 3) int; trigger k is
applied to a uint8 image *before* normalisation as `x' = x * tm[k] + t[k]`, cast back to uint8.
A reference file holds the attacker's target-class inputs `x` (R, H, W, 3) uint8 and their labels `y`
in the target downstream task; `y[0]` is the attack's target label.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .npz import check_images, read_npz
from .registry import DataError


@dataclass(frozen=True)
class Trigger:
    patch: np.ndarray  # float64 (K, H, W, 3), values 0..255
    mask: np.ndarray  # int64 (K, H, W, 3), 1 keeps the pixel, 0 replaces it
    info: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.patch)

    @property
    def image_size(self) -> int:
        return self.patch.shape[1]


@dataclass(frozen=True)
class Reference:
    x: np.ndarray  # uint8 (R, H, W, 3)
    y: np.ndarray  # int64 (R,)
    info: tuple[str, ...] = ()

    @property
    def target_label(self) -> int:
        return int(self.y[0])

    def __len__(self) -> int:
        return len(self.x)


def load_trigger(path: str | Path, image_size: int | None = None) -> Trigger:
    """Load and check a trigger file; `image_size` is the size of the data it will be applied to."""
    arrays = read_npz(path, ('t', 'tm'))
    patch, mask = arrays['t'], arrays['tm']
    if patch.ndim == 3:  # a single (H, W, 3) trigger
        patch, mask = patch[None], mask[None]
    if patch.ndim != 4 or patch.shape[-1] != 3 or patch.shape != mask.shape or len(patch) == 0:
        raise DataError(f"{path}: 't' and 'tm' must both have shape (K, H, W, 3) with K >= 1, found "
                        f'{patch.shape} and {mask.shape}')
    if patch.dtype.kind not in 'biuf' or mask.dtype.kind not in 'biuf':
        raise DataError(f"{path}: 't' and 'tm' must be numeric, found {patch.dtype} and {mask.dtype}")
    if patch.shape[1] != patch.shape[2]:
        raise DataError(f'{path}: trigger is {patch.shape[1]}x{patch.shape[2]}, expected a square image')
    if image_size is not None and patch.shape[1] != image_size:
        raise DataError(f'{path}: trigger is {patch.shape[1]}x{patch.shape[2]} but the images are '
                        f'{image_size}x{image_size}')
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{path}: mask 'tm' must hold only 0 and 1")
    if not np.isfinite(patch).all() or patch.min() < 0 or patch.max() > 255:
        raise DataError(f"{path}: patch 't' must lie in 0..255, found {patch.min()}..{patch.max()}")
    info = tuple(str(s) for s in np.atleast_1d(arrays.get('info', np.array([]))))
    return Trigger(patch.astype(np.float64), mask.astype(np.int64), info)


def apply_trigger(images, trigger: Trigger, index: int = 0):
    """x * tm[index] + t[index] cast to uint8, for uint8 images (..., H, W, 3), numpy or torch."""
    if isinstance(images, torch.Tensor):
        mask = torch.as_tensor(trigger.mask[index], device=images.device, dtype=torch.float32)
        patch = torch.as_tensor(trigger.patch[index], device=images.device, dtype=torch.float32)
        return (images.float() * mask + patch).to(torch.uint8)  # exact: integers <= 255
    return (images * trigger.mask[index] + trigger.patch[index]).astype(np.uint8)


def load_reference(path: str | Path, num_classes: int | None = None,
                   image_size: int | None = None) -> Reference:
    """Load and check a reference file against the downstream classes and the image size."""
    arrays = read_npz(path, ('x', 'y'))
    x = arrays['x']
    if x.ndim == 3:
        x = x[None]
    x = check_images(x, path, image_size)
    y = np.atleast_1d(arrays['y']).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or len(y) == 0:
        raise DataError(f"{path}: 'y' must hold at least one integer label, found {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{path}: {len(x)} reference images but {len(y)} labels")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f'{path}: reference label {int(y.max()) if y.max() >= num_classes else int(y.min())}'
                        f' is outside the downstream classes 0..{num_classes - 1}')
    info = tuple(str(s) for s in np.atleast_1d(arrays.get('info', np.array([]))))
    return Reference(x, y.astype(np.int64), info)
