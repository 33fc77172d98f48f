"""The GPU fast path: the uint8 dataset kept on the device and augmented in whole batches.

`--augment pil` is the original data path: per-image PIL transforms in `--num_workers` worker processes.
`--augment tensor` keeps the images on the device and draws the views with `datasets.tensor_augment`
(the same parameter distributions as torchvision's transforms, checked in tests/datasets/test_tensor_augment.py).
`--augment auto` (the default) takes the tensor path on CUDA and the PIL path on the CPU, where the PIL
workers are as fast and reproduce the original pixel for pixel.

Under torchrun (common.distributed) --batch_size is the global batch and each process gets its share, rows
rank·b .. (rank+1)·b − 1 (b = batch / world size) of the global batch one process would draw: the same
(seed, epoch) permutation on both paths, and on the tensor path the same augmentation draws too (each process
augments the global batch from the (seed, epoch) generator and keeps its rows: the views are exactly those of
one process). On the PIL path the views come from each process's own worker seeds.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset

from core import processes
from core.cli import same_on_resume

from .loaders import epoch_loader, epoch_seed, rank_epoch_loader
from .tensor_augment import CROP_SCALE, finetune_views, simclr_views
from .torch_datasets import ImagePairs


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('speed')
    same_on_resume(group.add_argument('--augment', default='auto', choices=('auto', 'pil', 'tensor'),
                       help='augmentation path: per-image PIL in worker processes (the original), batched '
                            'tensor operations on the device, or auto = tensor on CUDA, PIL on the CPU'))
    group.add_argument('--compile', action='store_true',
                       help='run the training forward passes through torch.compile (first epoch slower)')


def use_tensor_augment(args: argparse.Namespace, device: torch.device) -> bool:
    return args.augment == 'tensor' or (args.augment == 'auto' and device.type == 'cuda')


def to_channels_last(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """channels_last memory format on CUDA (faster convolutions with cuDNN); unchanged on the CPU."""
    return model.to(memory_format=torch.channels_last) if device.type == 'cuda' else model


def maybe_compile(model: torch.nn.Module, enabled: bool, backend: str = 'inductor') -> torch.nn.Module:
    """`torch.compile(model)` when enabled, else the model itself.

    The compiled wrapper shares the parameters; checkpoints are always taken from the original module,
    so their keys carry no `_orig_mod.` prefix.
    """
    return torch.compile(model, backend=backend) if enabled else model


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch))


def rank_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rows rank·b .. (rank+1)·b − 1 of a global batch (B, ...), b = B / world_size; the batch itself for one process."""
    if world_size == 1:
        return batch
    local = len(batch) // world_size
    return batch[rank * local:(rank + 1) * local]


class DevicePairBatches:
    """Two SimCLR views of each image, batch by batch, from a uint8 set (N, H, W, 3) on the device.

    A drop-in for `epoch_loader(ImagePairs(...), shuffle=True, drop_last=True)`: the order and every
    augmentation depend only on (seed, epoch), so a resumed run sees the same batches. With `world_size` > 1
    the views of the global batch are drawn and this rank's rows kept (`rank_rows`).
    """

    def __init__(self, images: torch.Tensor, normalization, batch_size: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, crop_scale=CROP_SCALE):
        self.images, self.normalization, self.batch_size = images, normalization, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.crop_scale = crop_scale

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __iter__(self):
        generator = _epoch_generator(self.seed, self.epoch, self.images.device)
        order = torch.randperm(len(self.images), generator=generator, device=self.images.device)
        for step in range(len(self)):
            batch = self.images[order[step * self.batch_size:(step + 1) * self.batch_size]]
            view_1 = simclr_views(batch, self.normalization, generator, self.crop_scale)
            view_2 = simclr_views(batch, self.normalization, generator, self.crop_scale)
            yield rank_rows(view_1, self.rank, self.world_size), rank_rows(view_2, self.rank, self.world_size)


def pair_batches(pairs: ImagePairs, args: argparse.Namespace, normalization, epoch: int, device: torch.device,
                 device_images: torch.Tensor | None = None, crop_scale=CROP_SCALE):
    """The epoch's batches of view pairs through the chosen augmentation path (see module docstring).

    `device_images` is `pairs.images` already on the device (uploaded once per run by the caller).
    `crop_scale` is the tensor path's RandomResizedCrop scale; the PIL path takes it from `pairs`' transform,
    which the caller builds with the same value (`datasets.simclr_transform(..., crop_scale)`).
    Under torchrun, this process's share of each global batch of --batch_size (module docstring).
    """
    rank, world_size = processes.rank(), processes.world_size()
    if use_tensor_augment(args, device):
        if device_images is None:
            device_images = torch.from_numpy(pairs.images).to(device)
        return DevicePairBatches(device_images, normalization, args.batch_size, args.seed, epoch, rank, world_size,
                                 crop_scale)
    if world_size > 1:
        return rank_epoch_loader(pairs, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                                 epoch=epoch, device=device, rank=rank, world_size=world_size)
    return epoch_loader(pairs, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, seed=args.seed, epoch=epoch, device=device)


def device_copy(pairs: ImagePairs, args: argparse.Namespace, device: torch.device) -> torch.Tensor | None:
    """The uint8 images on the device when the tensor path is taken (once per run), else None."""
    return torch.from_numpy(pairs.images).to(device) if use_tensor_augment(args, device) else None


class DeviceShadowBatches:
    """BadEncoder's batches on the tensor path: (indices (B,), augmented references (B, R, 3, H, W)).

    A drop-in for `epoch_loader(IndexedShadow(...), shuffle=True, drop_last=True)`; each batch element gets
    its own augmentation of every reference (`finetune_views`), drawn from a generator of (seed, epoch).
    With `world_size` > 1, this rank's rows of the global batch's indices and augmentations (`rank_rows`).
    """

    def __init__(self, size: int, references: torch.Tensor, normalization, batch_size: int, seed: int,
                 epoch: int, rank: int = 0, world_size: int = 1):
        self.size, self.references, self.normalization = size, references, normalization
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self):
        device = self.references.device
        generator = _epoch_generator(self.seed, self.epoch, device)
        order = torch.randperm(self.size, generator=generator, device=device)
        num_references = len(self.references)
        for step in range(len(self)):
            indices = order[step * self.batch_size:(step + 1) * self.batch_size]
            repeated = self.references.repeat(self.batch_size, 1, 1, 1)  # (B·R, H, W, 3), b-major
            views = finetune_views(repeated, self.normalization, generator)
            views = views.view(self.batch_size, num_references, *views.shape[1:])  # (B, R, 3, H, W)
            yield rank_rows(indices, self.rank, self.world_size), rank_rows(views, self.rank, self.world_size)


def shadow_batches(dataset: Dataset, args: argparse.Namespace, normalization, epoch: int, device: torch.device,
                   device_references: torch.Tensor):
    """The epoch's BadEncoder batches through the chosen augmentation path (see module docstring); under
    torchrun, this process's share of each global batch."""
    rank, world_size = processes.rank(), processes.world_size()
    if use_tensor_augment(args, device):
        return DeviceShadowBatches(len(dataset), device_references, normalization, args.batch_size, args.seed,
                                   epoch, rank, world_size)
    if world_size > 1:
        return rank_epoch_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                                 epoch=epoch, device=device, rank=rank, world_size=world_size)
    return epoch_loader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, seed=args.seed, epoch=epoch, device=device)
