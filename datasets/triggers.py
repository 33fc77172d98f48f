"""Trigger and reference files (docs/DESIGN.md §2.2, §2.3).

A trigger file holds `t` (K, H, W, 3) and `tm` (K, H, W, 3). Trigger k maps a uint8 image x (before any
normalisation) to

    x' = clip(round(x · tm[k] + t[k]), 0, 255)   as uint8, computed in floating point,

with `tm` in [0, 1] and `t` in [-255, 255]. Every trigger of trigger/make_trigger.py is such a map:
- patch (the paper's): tm in {0, 1}, t in 0..255 where tm = 0 and 0 elsewhere: the patch replaces pixels;
- blend: tm = 1 - α, t = α · pattern: the pattern is mixed in at opacity α;
- ctrl (CTRL's frequency trigger): tm = 1, t = Δ signed: an additive perturbation.

Exactness for the patch. With x, tm, t integers, x · tm + t is an integer in 0..510, exactly representable in
float32 (integers up to 2^24 are) and float64, so round() is the identity; where tm = 0 the value is t <= 255
and where tm = 1 and t = 0 it is x <= 255, so clip() is the identity too and the result equals the original
code's `(x * tm + t).astype(uint8)` bit for bit. (The original wraps around, or is undefined, when a
non-replacing pixel overflows 255; here it saturates.) Precision: numpy computes in float64, torch in float32
(on the device); for fractional triggers the two can differ by one grey level where x · tm + t falls within
float32's rounding error (about 3e-5 at 255) of a half-integer. round() is half-to-even on both paths.

A reference file holds the attacker's target-class inputs `x` (R, H, W, 3) uint8 and their labels `y` in the
target downstream task; `y[0]` is the attack's target label.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .folders import resize_images
from .npz import check_images, read_npz
from .registry import DataError

MAX_ADDITIVE = 255.0  # |t| <= 255: anything larger saturates every pixel whatever the image


@dataclass(frozen=True)
class Trigger:
    patch: np.ndarray  # t: float64 (K, H, W, 3), in [-255, 255] (a pasted patch: 0..255)
    mask: np.ndarray  # tm: float64 (K, H, W, 3), in [0, 1]: 1 keeps the pixel, 0 replaces it, fractions blend
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
    patch, mask = patch.astype(np.float64), mask.astype(np.float64)
    if not np.isfinite(mask).all():
        raise DataError(f"{path}: mask 'tm' holds non-finite values (NaN or inf); it must lie between 0 and 1")
    if mask.min() < 0 or mask.max() > 1:
        raise DataError(f"{path}: mask 'tm' must lie between 0 and 1 (1 keeps a pixel, 0 replaces it, fractions "
                        f'blend), found {mask.min():g}..{mask.max():g}')
    if not np.isfinite(patch).all():
        raise DataError(f"{path}: patch 't' holds non-finite values (NaN or inf); it must lie in -255..255 "
                        '(a pasted patch in 0..255)')
    if np.abs(patch).max() > MAX_ADDITIVE:
        raise DataError(f"{path}: patch 't' must lie in -255..255 (a pasted patch in 0..255), found "
                        f'{patch.min():g}..{patch.max():g}')
    info = tuple(str(s) for s in np.atleast_1d(arrays.get('info', np.array([]))))
    return Trigger(patch, mask, info)


def apply_trigger(images, trigger: Trigger, index: int = 0):
    """clip(round(x · tm[index] + t[index]), 0, 255) as uint8, for uint8 images x (..., H, W, 3).

    numpy arrays are computed in float64, torch tensors in float32 on their device (exact for a pasted patch;
    see the module docstring). The input is left untouched.
    """
    if isinstance(images, torch.Tensor):
        mask = torch.as_tensor(trigger.mask[index], device=images.device, dtype=torch.float32)
        patch = torch.as_tensor(trigger.patch[index], device=images.device, dtype=torch.float32)
        return (images.float() * mask + patch).round_().clamp_(0, 255).to(torch.uint8)
    blended = images * np.asarray(trigger.mask[index], dtype=np.float64) + trigger.patch[index]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def load_reference(path: str | Path, num_classes: int | None = None, image_size: int | None = None,
                   resize_to: int | None = None) -> Reference:
    """Load and check a reference file against the downstream classes and the image size; with `resize_to`, a
    real-world encoder's input size (224), the images of any size are resized to it (`datasets.resize_images`)."""
    arrays = read_npz(path, ('x', 'y'))
    x = arrays['x']
    if x.ndim == 3:
        x = x[None]
    x = check_images(x, path, None if resize_to else image_size)
    y = np.atleast_1d(arrays['y']).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or len(y) == 0:
        raise DataError(f"{path}: 'y' must hold at least one integer label, found {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{path}: {len(x)} reference images but {len(y)} labels")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f'{path}: reference label {int(y.max()) if y.max() >= num_classes else int(y.min())}'
                        f' is outside the downstream classes 0..{num_classes - 1}')
    info = tuple(str(s) for s in np.atleast_1d(arrays.get('info', np.array([]))))
    if resize_to:
        x = resize_images(x, resize_to)
    return Reference(x, y.astype(np.int64), info)
