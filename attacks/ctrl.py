"""CTRL (Li et al., "An Embarrassingly Simple Backdoor Attack on Self-supervised Learning", ICCV 2023): a frequency
trigger, and the poisoning of a few pre-training images of the target class with it (docs/DESIGN.md §12.3).

CTRL poisons the data, not the model: `trigger/make_trigger.py --kind ctrl` writes the trigger file (its flags and
checks; the construction is `ctrl_delta` here), `python -m datasets.poison` writes the poisoned copy of a
pre-training split (its flags and files, the choice of the images and the poisoning: `choose_poisoned` and
`poison_images` there), and stage 0 on that copy yields the backdoored encoder.

The trigger: RGB -> YUV, orthonormal 2-D DCT-II of every non-overlapping window x window block of the chosen
channels, + m at the chosen frequencies (u, v) of every block, inverse DCT, YUV -> RGB. Every step is linear, so
the whole map is x -> x + Δ with Δ independent of x (trigger/make_trigger.py's docstring gives the derivation and
how it compares with CTRL's code).
"""
from __future__ import annotations

import numpy as np

YUV_CHANNELS = 'YUV'
# kornia 0.6.5 (CTRL's requirements.txt), kornia/color/yuv.py: rgb_to_yuv and yuv_to_rgb.
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.147, -0.289, 0.436],
                       [0.615, -0.515, -0.100]])
KORNIA_YUV_TO_RGB = np.array([[1.0, 0.0, 1.14],
                              [1.0, -0.396, -0.581],
                              [1.0, 2.029, 0.0]])
YUV_INVERSES = {'exact': np.linalg.inv(RGB_TO_YUV), 'kornia': KORNIA_YUV_TO_RGB}


# ----------------------------------------------------------------------------------------------- the trigger

def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C (n, n): C[k, j] = s_k cos(π (2j + 1) k / (2n)), s_0 = √(1/n), s_k = √(2/n).

    The 2-D DCT of a block X is C X C^T (row frequency first) and, C being orthogonal, its inverse is C^T Y C;
    the same transform as scipy's dct(..., norm='ortho') and torch-dct's dct_2d(..., norm='ortho').
    """
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    scale = np.where(k == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    return scale * np.cos(np.pi * (2 * j + 1) * k / (2 * n))


def ctrl_delta(image_size: int, window: int, frequencies: list[tuple[int, int]], channels: list[int],
               magnitude: float, yuv_to_rgb: np.ndarray) -> np.ndarray:
    """CTRL's additive trigger Δ, float64 (S, S, 3) in RGB grey levels (see the module docstring).

    Per window x window block and YUV channel c in `channels`: Δ_c = C^T (m Σ_(u,v) e_u e_v^T) C with C the
    DCT matrix, the same in every block; then Δ_rgb = yuv_to_rgb · Δ_yuv at every pixel.
    """
    basis = dct_matrix(window)
    coefficients = np.zeros((window, window))
    for u, v in frequencies:
        coefficients[u, v] += magnitude
    block = basis.T @ coefficients @ basis  # inverse 2-D DCT of the added coefficients, (window, window)
    tiled = np.tile(block, (image_size // window, image_size // window))  # (S, S), every block alike
    delta_yuv = np.zeros((image_size, image_size, 3))
    delta_yuv[..., channels] = tiled[..., None]
    return delta_yuv @ yuv_to_rgb.T  # (S, S, 3): per pixel N · Δ_yuv
