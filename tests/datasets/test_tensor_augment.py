"""The batched tensor augmentations draw from the same distributions as torchvision's PIL transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from datasets import finetune_transform, simclr_transform
from datasets import tensor_augment as ta
from datasets.synthetic import make_synthetic

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side='right') / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side='right') / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize('op, tv_op, low, high', [
    (ta.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (ta.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (ta.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
    (ta.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_colour_operations_match_torchvision(op, tv_op, low, high):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 8, 8, generator=generator)
    factors = torch.rand(16, generator=generator) * (high - low) + low
    expected = torch.stack([tv_op(images[i], factors[i].item()) for i in range(16)])
    assert torch.allclose(op(images, factors), expected, atol=1e-4)


def test_grayscale_matches_torchvision():
    images = torch.rand(4, 3, 8, 8)
    expected = torch.stack([TF.rgb_to_grayscale(im, 1) for im in images])
    # PIL's luma weights (0.299, 0.587, 0.114); torchvision's tensor path rounds 0.299 to 0.2989
    assert torch.allclose(ta.grayscale(images), expected, atol=2e-4)


def test_crop_parameters_follow_random_resized_crop():
    n = 20000
    boxes = ta.crop_boxes(n, 32, 32, torch.Generator().manual_seed(1)).numpy()
    torch.manual_seed(2)
    image = torch.zeros(3, 32, 32)
    reference = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    for column in range(4):  # top, left, h, w
        assert ks_statistic(boxes[:, column].astype(float), reference[:, column].astype(float)) < 0.03
    assert (boxes[:, 2] >= 1).all() and (boxes[:, 0] + boxes[:, 2] <= 32).all()
    assert (boxes[:, 3] >= 1).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()


def test_crop_scale_bounds_the_crop_area():
    """scale (0.5, 1): every drawn box covers between half and all of the image (± rounding of h and w); the
    PIL transform draws from the same range."""
    boxes = ta.crop_boxes(5000, 32, 32, torch.Generator().manual_seed(1), scale=(0.5, 1.0)).numpy()
    area = boxes[:, 2] * boxes[:, 3] / 32 ** 2
    assert area.min() > 0.5 - 2 * 32 / 32 ** 2 and area.max() <= 1
    default = ta.crop_boxes(5000, 32, 32, torch.Generator().manual_seed(1)).numpy()
    assert (default[:, 2] * default[:, 3] / 32 ** 2).min() < 0.2
    transform = simclr_transform(NORM, 32, crop_scale=(0.5, 1.0)).transforms[0]
    assert isinstance(transform, T.RandomResizedCrop) and tuple(transform.scale) == (0.5, 1.0)
    x = torch.from_numpy(make_synthetic('synthetic_shapes', 4, seed=1)[0])
    views = ta.simclr_views(x, NORM, torch.Generator().manual_seed(7), crop_scale=(0.5, 1.0))
    assert views.shape == (4, 3, 32, 32)


def test_full_crop_box_is_identity():
    images = torch.rand(3, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32]] * 3)
    assert torch.allclose(ta.resized_crop(images, boxes, 32), images, atol=1e-6)


def test_crop_of_a_quarter_upsamples_that_quarter():
    images = torch.zeros(1, 1, 32, 32)
    images[..., :16, :16] = 1.0  # top-left quarter white
    out = ta.resized_crop(images, torch.tensor([[0, 0, 16, 16]]), 32)
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize('kind', ['simclr', 'finetune'])
def test_views_have_the_distribution_of_the_pil_pipeline(kind):
    """Per-image mean, spread and colourfulness of the augmented views agree with torchvision's."""
    x, _ = make_synthetic('synthetic_shapes', 1500, seed=3)
    torch.manual_seed(4)
    pil = simclr_transform(NORM) if kind == 'simclr' else finetune_transform(NORM)
    reference = torch.stack([pil(Image.fromarray(im)) for im in x])
    views = ta.simclr_views if kind == 'simclr' else ta.finetune_views
    ours = views(torch.from_numpy(x), NORM, torch.Generator().manual_seed(5))
    assert ours.shape == reference.shape == (1500, 3, 32, 32)

    def statistics(v: torch.Tensor) -> list[np.ndarray]:
        return [v.mean(dim=(1, 2, 3)).numpy(), v.std(dim=(1, 2, 3)).numpy(),
                (v - v.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3)).numpy()]  # 0 for gray images

    for a, b in zip(statistics(ours), statistics(reference)):
        assert ks_statistic(a, b) < 0.08
    gray_ours = (ours.std(dim=1).amax(dim=(1, 2)) < 1e-4).float().mean().item()
    gray_ref = (reference.std(dim=1).amax(dim=(1, 2)) < 1e-4).float().mean().item()
    assert abs(gray_ours - gray_ref) < 0.05 and 0.12 < gray_ours < 0.28  # RandomGrayscale p = 0.2


def test_generator_makes_views_reproducible():
    x = torch.from_numpy(make_synthetic('synthetic_shapes', 8, seed=1)[0])
    a = ta.simclr_views(x, NORM, torch.Generator().manual_seed(7))
    b = ta.simclr_views(x, NORM, torch.Generator().manual_seed(7))
    c = ta.simclr_views(x, NORM, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resized_crop_matches_pil_to_one_grey_level():
    x, _ = make_synthetic('synthetic_shapes', 40, seed=3)
    boxes = ta.crop_boxes(40, 32, 32, torch.Generator().manual_seed(0))
    ours = ta.resized_crop(torch.from_numpy(x).permute(0, 3, 1, 2).float(), boxes, 32)
    pil = torch.stack([torch.from_numpy(np.array(TF.resized_crop(Image.fromarray(x[i]), *boxes[i].tolist(),
                                                                 [32, 32]))).permute(2, 0, 1).float()
                       for i in range(40)])
    assert (ours - pil).abs().max() <= 1.0 + 1e-4  # PIL rounds to uint8
