"""The project's own offline datasets, generated deterministically from a seed (no network).

- `synthetic_shapes` (pre-training, 10 classes): a shape or texture (disc, ring, square, frame,
  triangle, cross, horizontal/vertical/diagonal stripes, checkerboard) in random colours, position and
  size. Classes differ by structure, never by colour, because SimCLR's augmentations jitter colour.
- `synthetic_digits` (downstream, 10 classes): the digits 0-9 drawn from a 5x7 bitmap font at random
  scale, position and colours - another kind of image than the pre-training set, like SVHN is for CIFAR10.

Both are 32x32 RGB uint8 in the npz layout of real datasets (docs/DESIGN.md §2.1). 10 000 images take about a second.
"""
from __future__ import annotations

import numpy as np

from .registry import SHAPES, DataError, get_info

SIZE = 32

FONT_5X7 = {  # rows of 5 bits, top to bottom
    0: ('01110', '10001', '10011', '10101', '11001', '10001', '01110'),
    1: ('00100', '01100', '00100', '00100', '00100', '00100', '01110'),
    2: ('01110', '10001', '00001', '00010', '00100', '01000', '11111'),
    3: ('11111', '00010', '00100', '00010', '00001', '10001', '01110'),
    4: ('00010', '00110', '01010', '10010', '11111', '00010', '00010'),
    5: ('11111', '10000', '11110', '00001', '00001', '10001', '01110'),
    6: ('00110', '01000', '10000', '11110', '10001', '10001', '01110'),
    7: ('11111', '00001', '00010', '00100', '01000', '01000', '01000'),
    8: ('01110', '10001', '10001', '01110', '10001', '10001', '01110'),
    9: ('01110', '10001', '10001', '01111', '00001', '00010', '01100'),
}


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10).astype(np.int64)


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours (n, 3) with a clear brightness difference."""
    background = rng.uniform(0, 255, (n, 3))
    foreground = rng.uniform(0, 255, (n, 3))
    too_close = np.abs(foreground.mean(1) - background.mean(1)) < 70
    foreground[too_close] = 255 - background[too_close]
    return foreground, background


def _compose(mask: np.ndarray, rng: np.random.Generator, noise: float = 8.0,
             chunk: int = 1000) -> np.ndarray:
    """Paint boolean masks (n, H, W) in random colours, add pixel noise, return uint8 (n, H, W, 3).

    Painted `chunk` images at a time to bound memory; the noise is drawn in the same order as in one
    piece, so the images do not depend on `chunk`.
    """
    foreground, background = _colours(len(mask), rng)
    out = np.empty(mask.shape + (3,), dtype=np.uint8)
    for start in range(0, len(mask), chunk):
        part = slice(start, start + chunk)
        m = mask[part, ..., None].astype(np.float64)  # (c, H, W, 1)
        image = m * foreground[part, None, None] + (1 - m) * background[part, None, None]
        image += rng.normal(0, noise, image.shape)
        out[part] = np.clip(np.rint(image), 0, 255)
    return out


def _shape_masks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    params = [rng.uniform(low, high, (n, 1, 1))  # centre x, centre y, radius, stripe period, phase
              for low, high in ((10, 22), (10, 22), (6, 10), (5, 9), (0, 10))]
    out = np.zeros((n, SIZE, SIZE), dtype=bool)
    for label in range(len(SHAPES)):  # each image gets only its own class's mask computed
        chosen = labels == label
        if chosen.any():
            out[chosen] = _shape_mask(label, yy, xx, *(p[chosen] for p in params))
    return out


def _shape_mask(label: int, yy: np.ndarray, xx: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                r: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """The mask (m, H, W) of shape class `label` for m images with parameters of shape (m, 1, 1)."""
    dx, dy = xx - cx, yy - cy
    stripes = lambda v: np.floor((v + phase) / (period / 2)) % 2 == 0  # noqa: E731
    if label == 0:  # disc
        return np.hypot(dx, dy) < r
    if label == 1:  # ring
        dist = np.hypot(dx, dy)
        return (dist < r) & (dist > 0.55 * r)
    if label == 2:  # square
        return np.maximum(np.abs(dx), np.abs(dy)) < r
    if label == 3:  # frame
        box = np.maximum(np.abs(dx), np.abs(dy))
        return (box < r) & (box > 0.55 * r)
    if label == 4:  # triangle
        return (dy < r) & (dy > -r) & (np.abs(dx) < (dy + r) / 2)
    if label == 5:  # cross
        return ((np.abs(dx) < r / 3) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 3) & (np.abs(dx) < r))
    if label == 6:  # horizontal stripes
        return stripes(yy)
    if label == 7:  # vertical stripes
        return stripes(xx)
    if label == 8:  # checkerboard
        return stripes(xx) ^ stripes(yy + period / 4 - phase)
    return stripes((xx + yy) / np.sqrt(2))  # diagonal stripes


def _digit_masks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    glyphs = np.array([[[c == '1' for c in row] for row in FONT_5X7[d]] for d in range(10)])  # (10, 7, 5)
    out = np.zeros((n, SIZE, SIZE), dtype=bool)
    scales = rng.integers(2, 5, n)  # glyph 10x14 .. 20x28 pixels
    for i, (label, scale) in enumerate(zip(labels, scales)):
        glyph = np.kron(glyphs[label], np.ones((scale, scale), dtype=bool))
        h, w = glyph.shape
        top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
        out[i, top:top + h, left:left + w] = glyph
    return out


GENERATORS = {'synthetic_shapes': _shape_masks, 'synthetic_digits': _digit_masks}


def make_synthetic(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (n, 32, 32, 3), y int64 (n,)) of a synthetic set, the same for the same (n, seed)."""
    if name not in GENERATORS:
        raise DataError(f"unknown synthetic dataset '{name}', expected one of {sorted(GENERATORS)}")
    if n < 1:
        raise DataError(f'{name}: the number of images must be at least 1, got {n}')
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(n, rng)
    return _compose(GENERATORS[name](labels, rng), rng), labels


def synthetic_splits(name: str, sizes: dict[str, int] | None = None,
                     seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split of a synthetic set; each split has its own seed so train and test differ."""
    sizes = sizes or get_info(name).splits
    return {split: make_synthetic(name, n, seed=seed * 1000 + index)
            for index, (split, n) in enumerate(sorted(sizes.items()))}
