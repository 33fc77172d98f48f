"""What the defences' tests share: tiny argument lists, images and views, a tiny encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import SimCLR

SHAPES_NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # synthetic_shapes
CIFAR_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
DEVICE = torch.device('cpu')


def tiny_args(data_root, teacher, results_dir, *extra, defence='ft'):
    """256 training images at ratio 0.25: D holds 64 images, two steps of 32 per epoch."""
    return ['--defence', defence, '--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root),
            '--teacher', str(teacher), '--ratio', '0.25', '--batch_size', '32', '--epochs', '1',
            '--results_dir', str(results_dir), '--num_workers', '0', '--device', 'cpu', '--no_progress',
            *[str(e) for e in extra]]


def images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def views(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randn(n, 3, 32, 32, generator=generator)


@pytest.fixture()
def encoder() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(width=8).eval()


def random_images(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    teacher = SimCLR(width=8).eval().requires_grad_(False)
    torch.manual_seed(1)
    return SimCLR(width=8), teacher
